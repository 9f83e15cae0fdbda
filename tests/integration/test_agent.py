"""Guest agent client error paths against real sockets (the real qemu-ga is exercised in tests/lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_image
from vmsnap.errors import AgentNotRespondingError, FreezeError
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.freeze import frozen_agent


def test_missing_agent_socket(tmp_path: Path) -> None:
    agent = GuestAgent.from_socket(tmp_path / "none.qga")
    with pytest.raises(AgentNotRespondingError, match="does not exist"):
        agent.ping()
    assert not agent.is_responding(timeout=1)


def test_agent_socket_with_no_agent_behind_it(tmp_path: Path) -> None:
    """QEMU accepts on the chardev, but no guest runs qemu-ga: a bounded wait, then a clear error."""
    image = make_image(tmp_path / "d.qcow2")
    with QemuProcess(tmp_path, [DriveSpec(image, "disk0")], agent=True).start() as vm:
        agent = GuestAgent.from_socket(vm.agent_socket, timeout=1.5)
        with pytest.raises(AgentNotRespondingError) as info:
            agent.ping()
        assert "did not answer" in str(info.value)
        assert "qemu-ga" in str(info.value)  # the hint says what to check
        # frozen() on a dead agent fails as a FreezeError, never hangs
        with pytest.raises(FreezeError), frozen_agent(agent, timeout=1.5):
            pass
        agent.close()
