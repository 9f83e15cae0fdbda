"""scripts/shape.py (``make shape``) fails the build on each kind of leak: it is fed small projects, one leak
each, and must name it and exit 1; the same project without the leak passes; and this project passes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SHAPE = ROOT / "scripts" / "shape.py"

PYPROJECT = """
[project.entry-points."pkg.strategies"]
snap = "pkg.strategies.snap:SnapStrategy"

[project.entry-points."pkg.layouts"]
chunks = "pkg.repo.chunks.layout:ChunksLayout"

[project.entry-points."pkg.stores"]
directory = "pkg.repo.stores.local:LocalStore"
s3 = "pkg.repo.stores.s3:S3Store"

[tool.shape]
package = "pkg"
max-lines = 40
sized = ["pkg"]
named = ["pkg.strategies", "pkg.layouts", "pkg.stores"]
not-names = "(format|fmt|kind)$"
interfaces = ["pkg/repo/stores/base.py"]

[tool.shape.homes]
"pkg.strategies" = ["pkg/strategies/"]
"pkg.stores" = ["pkg/repo/stores/"]
"pkg.layouts:chunks" = ["pkg/repo/chunks/"]
"""

GOOD = {
    "pkg/__init__.py": "",
    "pkg/core.py": """
        from pkg.repo.stores.base import Store


        def plan(layout_reads_exports: bool, store: Store) -> str:
            return "pull" if layout_reads_exports else "push"
        """,
    "pkg/strategies/__init__.py": "",
    "pkg/strategies/snap.py": """
        class SnapStrategy:
            name = "snap"

            def same(self, other: str) -> bool:
                return other == "snap"  # at home: fine
        """,
    "pkg/repo/__init__.py": "",
    "pkg/repo/chunks/__init__.py": "",
    "pkg/repo/chunks/layout.py": """
        from pkg.repo.stores.base import Store


        class ChunksLayout:
            def __init__(self, store: Store) -> None:
                self.store = store

            def same_kind(self, other: object) -> bool:
                return isinstance(other, ChunksLayout)  # its own class, at home: fine
        """,
    "pkg/repo/stores/__init__.py": "",
    "pkg/repo/stores/base.py": """
        class Store:
            pass
        """,
    "pkg/repo/stores/local.py": """
        from pkg.repo.stores.base import Store


        class LocalStore(Store):
            pass
        """,
    "pkg/repo/stores/s3.py": """
        from pkg.repo.stores.base import Store


        class S3Store(Store):
            def parse(self, url: str) -> str:
                return url.removeprefix("s3://")  # at home: fine
        """,
    "pkg/image.py": """
        def is_qcow2(fmt: str, kind: str) -> bool:
            return fmt == "chunks" or kind in ("directory", "nbd")  # formats and kinds are no plugin
        """,
}


def run(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return subprocess.run(
        [sys.executable, str(SHAPE), str(tmp_path)], capture_output=True, text=True, timeout=60
    )


def test_a_good_project_passes(tmp_path: Path) -> None:
    done = run(tmp_path, GOOD)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(": ok")
    assert "0 import cycles, 0 isinstance leaks, 0 plugin names or URLs in the core" in done.stdout


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        pytest.param(
            "pkg/core.py",
            """
            def helper() -> None:
                from pkg import image  # a lazy import closes the cycle image -> core -> image

                image.is_qcow2("raw", "file")


            def plan() -> str:
                return "push"
            """,
            "cycle: pkg.core -> pkg.image (line 2), pkg.image -> pkg.core (line 1)",
            id="lazy-import-cycle",
        ),
        pytest.param(
            "pkg/core.py",
            """
            from pkg.repo.stores.local import LocalStore as Plain


            def listing(store: object) -> bool:
                return isinstance(store, (int, Plain))
            """,
            "isinstance(store, (int, Plain)) tests for the store plugin 'directory''s class LocalStore",
            id="isinstance-of-an-aliased-store",
        ),
        pytest.param(
            "pkg/core.py",
            """
            from pkg.repo.chunks import layout


            def chunked(repo: object) -> bool:
                return type(repo) is layout.ChunksLayout
            """,
            "isinstance: type(repo) is layout.ChunksLayout tests for the layout plugin 'chunks'",
            id="type-is-a-layout",
        ),
        pytest.param(
            "pkg/repo/stores/s3.py",
            """
            from pkg.repo.chunks.layout import ChunksLayout
            from pkg.repo.stores.base import Store


            class S3Store(Store):
                def knows(self, repo: object) -> bool:
                    return isinstance(repo, ChunksLayout)  # another plugin's home is not its own
            """,
            "isinstance: isinstance(repo, ChunksLayout) tests for the layout plugin 'chunks'",
            id="isinstance-in-another-plugins-home",
        ),
        pytest.param(
            "pkg/core.py",
            """
            def prune_note(repo_name: str) -> str:
                return "run gc" if repo_name == "chunks" else ""
            """,
            "name: repo_name == 'chunks' compares the layout name 'chunks' outside its home",
            id="layout-name",
        ),
        pytest.param(
            "pkg/core.py",
            """
            def undo(header: dict[str, str]) -> bool:
                return header["strategy"] in ("other", "snap")
            """,
            "compares the strategy name 'snap' outside its home",
            id="strategy-name-in-a-tuple",
        ),
        pytest.param(
            "pkg/core.py",
            """
            def pick(name: str) -> int:
                match name:
                    case "s3" | "gs":
                        return 1
                return 0
            """,
            "name: case 's3' | 'gs' compares the store name 's3' outside its home",
            id="match-case",
        ),
        pytest.param(
            "pkg/core.py",
            """
            def remote(location: str) -> bool:
                return location.startswith("s3://")
            """,
            "url: location.startswith('s3://') parses the store 's3''s URLs outside its home",
            id="url-prefix",
        ),
        pytest.param(
            "pkg/core.py",
            """
            PREFIX = "s3:/"
            """,
            "url: 's3:/' parses the store 's3''s URLs",
            id="url-literal",
        ),
        pytest.param(
            "pkg/core.py", "X = 1\n" * 41, "pkg/core.py:41: size: 41 lines, over 40: split it", id="size"
        ),
    ],
)
def test_each_leak_fails_with_one_line_naming_it(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    files = {**GOOD, rel: text}
    if "cycle" in expected:
        files["pkg/image.py"] = "from pkg.core import plan\n\nDEFAULT = plan()\n"
    done = run(tmp_path, files)
    assert done.returncode == 1, done.stdout + done.stderr
    leaks = done.stdout.strip().splitlines()[:-1]
    assert len(leaks) == 1 and expected in leaks[0], done.stdout
    assert leaks[0].startswith(f"{rel.split(':')[0]}:") or "cycle" in expected
    assert done.stdout.strip().endswith("FAIL")


def test_a_plugin_outside_every_declared_home_fails(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    files = {**GOOD, "pkg/elsewhere.py": "class GsStore:\n    pass\n"}
    pyproject = PYPROJECT.replace(
        's3 = "pkg.repo.stores.s3:S3Store"', 's3 = "pkg.repo.stores.s3:S3Store"\ngs = "pkg.elsewhere:GsStore"'
    )
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text).lstrip())
    (tmp_path / "pyproject.toml").write_text(pyproject)
    done = subprocess.run(
        [sys.executable, str(SHAPE), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "home: pkg.stores 'gs' (pkg.elsewhere:GsStore) is not in a home declared for it" in done.stdout


def test_this_project_has_its_shape() -> None:
    done = subprocess.run(
        [sys.executable, str(SHAPE), str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
