"""Value types, the error tree and the plugin registry."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

import vmsnap
from vmsnap import errors
from vmsnap.model import validate_name
from vmsnap.registry import STRATEGY_GROUP, TRANSPORT_GROUP, load, names
from vmsnap.vm.qmp import disks_from_query_block


@pytest.mark.parametrize("name", ["vm1", "web-01.example", "a_b+c"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-rf", "a..b", "x" * 129, "sp ace"])
def test_names_that_would_escape_a_directory_are_refused(name: str) -> None:
    with pytest.raises(errors.UsageError) as info:
        validate_name(name, "VM name")
    assert info.value.exit_code == 2
    assert "VM name" in str(info.value)


def test_every_error_is_a_vmsnap_error_with_one_line() -> None:
    samples = [
        errors.CommandError(["lvcreate", "x"], 5, "", "  Volume group not found\n"),
        errors.QMPCommandError("transaction", "GenericError", "no node"),
        errors.BlockJobError("j1", "failed: ENOSPC"),
        errors.AgentNotRespondingError("the guest agent did not answer guest-ping in time"),
        errors.AgentCommandError("guest-fsfreeze-freeze", "GenericError", "hook failed"),
        errors.ChecksumMismatchError("disk0: sha256 differs"),
    ]
    for err in samples:
        assert isinstance(err, vmsnap.VmsnapError)
        assert "\n" not in str(err)
    assert "Volume group not found" in str(samples[0])
    assert "qemu-ga" in str(samples[3])


def _own(group: str) -> list[str]:
    """The names vmsnap's own distribution registers (the test venv also holds tests/plugin)."""
    return sorted(
        ep.name for ep in entry_points(group=group) if ep.dist is not None and ep.dist.name == "vmsnap"
    )


def test_registry_lists_the_five_strategies_and_three_transports() -> None:
    assert _own(STRATEGY_GROUP) == ["backup", "btrfs", "external", "internal", "lvm"]
    assert _own(TRANSPORT_GROUP) == ["copy", "nbd", "rsync"]
    assert set(_own(STRATEGY_GROUP)) <= set(names(STRATEGY_GROUP))


def test_registry_typo_suggests_the_name() -> None:
    with pytest.raises(errors.PluginError) as info:
        load(STRATEGY_GROUP, "externl")
    assert "did you mean 'external'" in str(info.value)
    assert f"available: {', '.join(names(STRATEGY_GROUP))}" in str(info.value)
    assert "backup, btrfs, external, internal, lvm" in str(info.value)


def test_parse_query_block() -> None:
    blocks = [
        {
            "device": "",
            "qdev": "/machine/peripheral/vda/virtio-backend",
            "inserted": {
                "node-name": "fmt-vda",
                "file": "/img/top.qcow2",
                "drv": "qcow2",
                "ro": False,
                "image": {
                    "filename": "/img/top.qcow2",
                    "virtual-size": 1024,
                    "format": "qcow2",
                    "backing-image": {"filename": "/img/base.qcow2", "virtual-size": 1024},
                },
            },
        },
        {"device": "ide1-cd0", "qdev": "/machine/unattached/device[20]", "removable": True},
    ]
    nodes = [
        {"node-name": "fmt-vda", "drv": "qcow2", "file": "/img/top.qcow2"},
        {"node-name": "file-vda", "drv": "file", "file": "/img/top.qcow2"},
    ]
    (disk,) = disks_from_query_block(blocks, nodes)
    assert disk.name == "vda"
    assert disk.file_node == "file-vda"
    assert [str(p) for p in disk.backing_chain] == ["/img/base.qcow2"]
