"""Taking over a dead lease is one conditional operation (issue 21, item 4): two processes that both found
the same dead lease — stopped right there, then let go one after the other — never both hold it, in a local
directory and on S3 (SeaweedFS). Before, each deleted the dead lease and put its own, so the second deleted
the first one's fresh lease and both held it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.repo.heal.interleave import END, Stepper
from vmsnap.repo.repository import Repository


@pytest.fixture(params=["local", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        url = str(tmp_path / "repo")
    else:
        request.getfixturevalue("s3_env")
        url = f"s3://vmsnap-test/{request.getfixturevalue('s3_prefix')}"
    Repository.init(url)
    return url


@pytest.fixture
def steppers(tmp_path: Path) -> Iterator[dict[str, Stepper]]:
    trace: list[tuple[str, str]] = []
    # one pretend host: a lease of a process that died on it is dead at once there
    started = {
        name: Stepper.start(name, tmp_path, trace, host="host-a") for name in ("dead", "first", "second")
    }
    yield started
    for stepper in started.values():
        stepper.close()


def test_two_processes_taking_over_a_dead_lease_never_both_hold_it(
    repo: str, tmp_path: Path, steppers: dict[str, Stepper]
) -> None:
    command = {"op": "hold", "repo": repo, "state": str(tmp_path / "state"), "lease": 120.0, "vm": "vm1"}
    dead, first, second = steppers["dead"], steppers["first"], steppers["second"]
    dead.begin(command)
    dead.run_to("worker-holding")
    dead.process.kill()  # it dies holding the lease (by its pid; this host sees it is gone)
    dead.process.wait()
    dead.step = None
    first.begin(command)
    second.begin(command)
    first.run_to("lease-taking-over")  # both found the dead lease, and stand right before taking it over
    second.run_to("lease-taking-over")
    first.run_to("worker-holding")  # the first takes it over, and holds it
    second.run_to(END)
    assert second.result is not None and second.result.get("error") == "LeaseError", second.result
    assert "holds locks/writers/vm1" in second.result["message"]
    first.run_to(END)
    assert first.result == {"ok": {"held": "vm1"}}  # its lease was still its own when it let go
