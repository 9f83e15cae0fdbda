"""The public API stays importable: ``vmsnap.__all__`` (stated again in docs/api.md), every import in the
README's and the docs' Python examples, and every name the first two rounds' modules defined
(``api_history.json``: read from the sources at the first round's end, f5455c8, and the second round's end on
main, 3252145) — from its old module, with a DeprecationWarning naming its new home when it moved.

The examples themselves run against a real VM in tests/integration/test_readme_examples.py.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import warnings
from pathlib import Path

import pytest

import vmsnap
from vmsnap import moved

ROOT = Path(__file__).resolve().parents[2]
HISTORY = json.loads((Path(__file__).with_name("api_history.json")).read_text())["modules"]
OLD_NAMES = [(module, name) for module, names in sorted(HISTORY.items()) for name in names]

FIRST_ROUND_IMPORTS = """
from vmsnap.backup import Backup, BackupConfig
from vmsnap.machine import QemuMachine
from vmsnap.repository import Repository
from vmsnap.strategies.backup import BlockdevBackupStrategy
from vmsnap.agent import frozen
from vmsnap.lab.guest import LabGuest, fsck_image
from vmsnap.runner import SshRunner
from vmsnap.strategies.lvm import LvmSnapshotStrategy
from vmsnap.imageio import guest_sha256
from vmsnap.model import Disk, ExportSource
from vmsnap.registry import transport_class
"""
"""Every import of the first round's README and docs (README.md, docs/*.md at f5455c8; the second round's
docs had the same)."""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def imports_of(code: str) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.ImportFrom) and n.module]


def run_imports(nodes: list[ast.ImportFrom]) -> list[warnings.WarningMessage]:
    """Import each name as ``from MODULE import NAME`` would; the DeprecationWarnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for node in nodes:
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                getattr(module, alias.name)
    return [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_all_is_the_public_api_and_docs_api_md_states_it() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in vmsnap.__all__:
            value = getattr(vmsnap, name)
            home = vmsnap.LAZY.get(name)
            if home is not None:
                assert value is getattr(importlib.import_module(home), name), name
    api = (ROOT / "docs/api.md").read_text()
    named = set(re.findall(r"^\| `([A-Za-z_0-9]+)`", api, re.MULTILINE))
    assert named == set(vmsnap.__all__) - {"__version__"}
    for name, home in vmsnap.LAZY.items():
        assert re.search(rf"^\| `{name}` \| `{re.escape(home)}` \|", api, re.MULTILINE), name


@pytest.mark.parametrize("path", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_every_import_in_the_examples_of_the_readme_and_docs_works_without_warning(path: str) -> None:
    text = (ROOT / path if path == "README.md" else ROOT / "docs" / path).read_text()
    nodes = [node for block in python_blocks(text) for node in imports_of(block)]
    deprecated = run_imports(nodes)
    assert deprecated == [], [str(w.message) for w in deprecated]


def test_the_first_rounds_examples_import_with_warnings_naming_the_new_homes() -> None:
    nodes = imports_of(FIRST_ROUND_IMPORTS)
    messages = sorted(str(w.message) for w in run_imports(nodes))
    assert messages == sorted(
        [
            "vmsnap.machine.QemuMachine is deprecated: import QemuMachine from vmsnap.vm.machine",
            "vmsnap.repository.Repository is deprecated: import Repository from vmsnap.repo.repository",
            "vmsnap.strategies.backup.BlockdevBackupStrategy is deprecated: "
            "import BlockdevBackupStrategy from vmsnap.strategies.blockdev_backup.strategy",
            "vmsnap.agent.frozen is deprecated: import frozen from vmsnap.vm.freeze",
            "vmsnap.imageio.guest_sha256 is deprecated: import guest_sha256 from vmsnap.image.digest",
            "vmsnap.registry.transport_class is deprecated: import transport_class from vmsnap.transports",
        ]
    )


def test_the_warning_points_at_the_line_that_imports() -> None:
    with pytest.warns(DeprecationWarning, match="import QemuMachine from vmsnap.vm.machine") as caught:
        from vmsnap.machine import QemuMachine  # noqa: F401
    assert caught[0].filename == __file__


@pytest.mark.parametrize(("module", "name"), OLD_NAMES, ids=[f"{m}:{n}" for m, n in OLD_NAMES])
def test_every_name_of_the_first_two_rounds_still_imports(module: str, name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imported = importlib.import_module(module)
        removed = moved.REMOVED.get(module, {}).get(name)
        if removed is not None:
            with pytest.raises(moved.RemovedNameError, match=f"{module}.{name} was removed: use "):
                getattr(imported, name)
            return
        value = getattr(imported, name)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    home = moved.new_home(module, name)
    if home is None:
        assert deprecations == [], deprecations  # still where it was
        return
    new_module, _, new_name = home.rpartition(".")
    assert deprecations == [f"{module}.{name} is deprecated: import {new_name} from {new_module}"]
    assert value is getattr(importlib.import_module(new_module), new_name)


def test_moved_names_only_what_older_releases_had() -> None:
    for module, names in moved.MOVED.items():
        assert set(names) <= set(HISTORY.get(module, [])), module
    for module, names in moved.REMOVED.items():
        assert set(names) <= set(HISTORY.get(module, [])), module
