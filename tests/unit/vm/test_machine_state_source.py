"""Finding a bare QEMU's machine state without a VM: a relative pflash path, QEMU's directory unknown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmsnap.vm.machine_state import MachineStateError, qemu_state_source


class _Monitor:
    """What qemu_state_source asks of a QMP monitor: a writable firmware flash, no disks."""

    def __init__(self, file: str) -> None:
        self.file = file

    def query_block(self) -> list[dict[str, Any]]:
        return [
            {
                "device": "pflash1",
                "qdev": "/machine/system.flash1",
                "inserted": {"file": self.file, "ro": False},
            }
        ]

    def disks(self) -> list[Any]:
        return []


def test_a_relative_pflash_path_without_qemu_s_directory_is_refused(tmp_path: Path) -> None:
    # nothing listens on the socket: QEMU's process, hence its working directory, is unknown
    with pytest.raises(MachineStateError, match=r"relative path vm_VARS\.fd"):
        qemu_state_source(tmp_path / "none.qmp", _Monitor("vm_VARS.fd"))  # type: ignore[arg-type]
    source = qemu_state_source(tmp_path / "none.qmp", _Monitor("/srv/vm_VARS.fd"))  # type: ignore[arg-type]
    assert source.files["nvram.fd"] == Path("/srv/vm_VARS.fd")
    assert source.state.argv is None and source.state.refused
