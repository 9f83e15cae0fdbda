"""Claims of the README that the code states as data, read from the code: the dependencies and extras, the
plugin entry points and the strategies and transports they register, the package layout, what `make test`
runs, the pytest marker for lab-guest tests."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from vmsnap.strategies import strategy_names
from vmsnap.transports import transport_names

ROOT = Path(__file__).resolve().parents[2]
README = " ".join((ROOT / "README.md").read_text().split())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dependencies_and_extras() -> None:
    needs = [re.split(r"[<>=\[ ]", d)[0] for d in PROJECT["project"]["dependencies"]]
    assert "it needs attrs, sh, qemu.qmp, rich, zstandard, cryptography" in README
    assert "serves) and blake3;" in README
    assert needs == ["attrs", "sh", "qemu.qmp", "rich", "zstandard", "cryptography", "blake3"]
    s3 = [re.split(r"[<>=\[ ]", d)[0] for d in PROJECT["project"]["optional-dependencies"]["s3"]]
    assert s3 == ["boto3", "awscrt"] and "`s3` (boto3, and awscrt for CRC32C checksums)" in README
    extras = set(PROJECT["project"]["optional-dependencies"]) - {"test", "dev"}
    assert extras == {"s3", "libvirt", "qcow", "guest", "bench"}
    for extra in extras:
        assert f"`{extra}`" in README, extra
    assert PROJECT["project"]["requires-python"] == ">=3.11" and "(>= 3.11)" in README


def test_plugins_register_through_the_entry_points_the_readme_names() -> None:
    points = PROJECT["project"]["entry-points"]
    assert set(points["vmsnap.strategies"]) == {"internal", "external", "backup", "lvm", "btrfs"}
    assert set(points["vmsnap.transports"]) == {"copy", "nbd", "rsync"}
    assert "`vmsnap.strategies` entry-point group (transports through `vmsnap.transports`)" in README
    assert {"internal", "external", "backup", "lvm", "btrfs"} <= set(strategy_names())
    assert set(transport_names()) >= {"copy", "nbd", "rsync"}
    for name in ("backup", "external", "internal", "lvm", "btrfs"):
        assert f"| `{name}`" in README, name


def test_the_layout_tree_names_what_is_there() -> None:
    block = (ROOT / "README.md").read_text().split("## Layout and tests")[1].split("```")[1]
    for word in ("errors", "model", "registry", "runner", "files", "processes", "mounts", "demo", "moved"):
        assert (ROOT / "vmsnap" / f"{word}.py").is_file(), word
    for line in block.splitlines():
        folder = re.match(r"\s+([a-z_]+)/\s", line)
        if folder:
            assert (ROOT / "vmsnap" / folder.group(1)).is_dir(), line
    for folder in ("tests/unit", "tests/integration", "tests/lab", "tests/plugin"):
        assert folder in block and (ROOT / folder).is_dir(), folder


def test_make_test_lints_and_the_guest_marker_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:")[1].split("\n\n")[0]
    for command in ("ruff check", "ruff format --check", "mypy --strict"):
        assert command in lint, command
    assert re.search(r"^test: lint\b", makefile, re.MULTILINE)
    markers = PROJECT["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("guest:") for m in markers)
    assert "PYTEST_ARGS='-m \"not guest\"'" in README
