"""Freezing a guest's filesystems for a snapshot, with a thaw that always happens — also when vmsnap dies.

:func:`frozen` freezes through the guest agent for the body of a ``with`` and thaws afterwards, whatever
happened. Before freezing it starts the machine's *thaw guard* (:mod:`vmsnap.vm.guards`: beside vmsnap for a
bare QEMU or a libvirt domain, on the hypervisor for a VM on another host): told "done" after the thaw, it
exits; when vmsnap dies (even by SIGKILL), hangs, or hands the thaw over, it thaws the guest itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from vmsnap.errors import AgentCommandError, AgentError, AgentNotRespondingError, FreezeError
from vmsnap.vm.agent import DEFAULT_TIMEOUT, FREEZE_TIMEOUT, FreezeReport, GuestAgent
from vmsnap.vm.guards import MAX_FROZEN, GuardPlan, ThawGuard
from vmsnap.vm.thawguard import DEFAULT_GIVE_UP

__all__ = ["DEFAULT_GIVE_UP", "Freezable", "ThawGuard", "frozen", "frozen_agent"]

_log = logging.getLogger(__name__)


class Freezable(Protocol):
    """What :func:`frozen` asks of a machine (every :class:`~vmsnap.vm.machine.Machine` has it)."""

    name: str

    def agent(self) -> GuestAgent | None: ...

    def guard_plan(self) -> GuardPlan | None: ...


class _ReportHolder:
    """Lets ``frozen()`` hand out a report before the window is known and complete it on thaw."""

    def __init__(self, report: FreezeReport) -> None:
        self.report = report

    def finish(self, thawed: int, window_ms: float, thaw_error: str | None = None) -> None:
        # FreezeReport is frozen for callers; the context manager is the one place that completes it
        object.__setattr__(self.report, "thawed_count", thawed)
        object.__setattr__(self.report, "window_ms", window_ms)
        object.__setattr__(self.report, "thaw_error", thaw_error)


@contextlib.contextmanager
def frozen(
    machine: Freezable,
    mountpoints: Sequence[str] | None = None,
    *,
    timeout: float = FREEZE_TIMEOUT,
    guard: bool = True,
    guard_log: Path | None = None,
    max_frozen: float = MAX_FROZEN,
) -> Iterator[FreezeReport]:
    """Freeze ``machine``'s guest filesystems for the body of the ``with``; thaw in every case.

    Before freezing, the machine's thaw guard (``machine.guard_plan()``) is started: if this process dies
    while the guest is frozen, even by SIGKILL, the guard thaws the guest within seconds; it also thaws when
    this process stops beating for :data:`~vmsnap.vm.guards.LEASE` s or the guest has been frozen ``timeout``
    + ``max_frozen`` s. After thawing, ``guest-fsfreeze-status`` must say "thawed".

    :param mountpoints: freeze only these (``guest-fsfreeze-freeze-list``); default: every filesystem
    :param timeout: seconds for the freeze (hooks included) and for the thaw
    :param guard: start the thaw guard (when the machine has one: ``machine.guard_plan()``)
    :param guard_log: a file (on this host) where the guard notes what it did
    :param max_frozen: seconds beyond ``timeout`` after which the guard thaws whatever this process says
    :raise FreezeError: no agent, the agent does not answer, it refused the freeze (the guest is thawed;
        when the agent stopped answering mid-freeze, the guard thaws it as soon as the agent answers), the
        guard could not start or another run's guard watches the guest (nothing frozen), or the guest was
        thawed by someone else before the body ended (its snapshot is not quiesced)
    """
    agent = machine.agent()
    if agent is None:
        raise FreezeError(
            f"{machine.name} has no guest agent channel, so its filesystems cannot be frozen",
            hint="give the VM a qemu-ga channel, or back up without freezing (--quiesce off)",
        )
    thaw_guard = None
    plan = machine.guard_plan() if guard else None
    if plan is not None:
        thaw_guard = ThawGuard(plan, log=guard_log, deadline=timeout + max_frozen)
    with _freeze(agent, mountpoints, timeout=timeout, guard=thaw_guard) as report:
        yield report


@contextlib.contextmanager
def _freeze(
    agent: GuestAgent, mountpoints: Sequence[str] | None, *, timeout: float, guard: ThawGuard | None
) -> Iterator[FreezeReport]:
    try:
        agent.ping(timeout=min(timeout, DEFAULT_TIMEOUT))
    except AgentError as err:  # nothing was sent that could freeze: a plain error
        agent.close()
        raise FreezeError(f"cannot freeze: {err.message}", hint=err.hint) from err
    if guard is not None:
        guard.start()
    # set only once the agent said "thawed": until then (whatever ends this function, KeyboardInterrupt from
    # a SIGTERM included) the guest may be frozen or freezing, and the guard is handed the thaw, not told
    # "done"
    thaw_confirmed = False
    thaw_tried = False
    try:
        started = time.monotonic()
        try:
            if mountpoints:
                count = agent.fsfreeze_freeze_list(mountpoints, timeout=timeout)
            else:
                count = agent.fsfreeze_freeze(timeout=timeout)
        except AgentCommandError as err:
            thaw_tried = True
            thaw_confirmed = _thaw_checked(agent)
            raise FreezeError(f"freezing the guest failed: {err.desc}") from err
        except AgentNotRespondingError as err:
            # the freeze was sent and may still complete: whoever can reach the agent later must thaw
            if guard is not None:
                raise FreezeError(
                    f"freezing the guest failed: {err.message}",
                    hint=f"the thaw guard (pid {guard.pid}) thaws the guest as soon as its agent answers",
                ) from err
            agent.close()
            thaw_tried = True
            agent.thaw_quietly()
            raise FreezeError(f"freezing the guest failed: {err.message}") from err
        frozen_at = time.monotonic()
        # let go of a socket agent while frozen (QEMU serves it to one client at a time): should this process
        # hang or its connection stall now, the guard can still get in and thaw
        agent.close()
        holder = _ReportHolder(
            FreezeReport(
                frozen_count=count,
                freeze_ms=(frozen_at - started) * 1000.0,
                guard_pid=guard.pid if guard is not None else None,
            )
        )
        body_failed = True
        try:
            yield holder.report
            body_failed = False
        finally:
            thaw_tried = True
            thawed, hook_error = agent.thaw_and_check(timeout=timeout)
            thaw_confirmed = True
            holder.finish(thawed, (time.monotonic() - frozen_at) * 1000.0, hook_error)
            if hook_error is not None:
                _log.warning("the guest is thawed but a thaw hook failed: %s", hook_error)
            elif count and not thawed and not body_failed:
                raise FreezeError(
                    "the guest was thawed before the snapshot was complete (by someone else, or by the "
                    "thaw guard once the freeze had lasted too long): it is not quiesced",
                    hint="run the backup again; check what else talks to the guest agent",
                )
    finally:
        if thaw_confirmed:
            if guard is not None:
                guard.done()
        else:
            # a socket agent serves one client: let go of it (a command of ours may be half-answered)
            agent.close()
            if guard is not None:
                guard.hand_over()
            elif not thaw_tried:  # interrupted mid-freeze with no guard: one try
                agent.thaw_quietly()
                agent.close()


def _thaw_checked(agent: GuestAgent) -> bool:
    """After a refused freeze (the agent thaws what it had frozen): thaw if it still says "frozen"; True
    when it then says "thawed"."""
    try:
        if agent.fsfreeze_status() == "frozen":
            with contextlib.suppress(AgentCommandError):  # a failing thaw hook: the status tells
                agent.fsfreeze_thaw()
        return agent.fsfreeze_status() == "thawed"
    except AgentError:
        return False


@contextlib.contextmanager
def frozen_agent(
    agent: GuestAgent, mountpoints: Sequence[str] | None = None, *, timeout: float = FREEZE_TIMEOUT
) -> Iterator[FreezeReport]:
    """Freeze through ``agent`` for the body of the ``with``; always thaw afterwards.

    A freeze that fails (a hook said no, a filesystem refused) is thawed before :class:`FreezeError`
    is raised, so the guest is never left frozen by us. The report's ``window_ms`` is filled on thaw.
    Unlike :func:`frozen`, no thaw guard covers the death of this process: use :func:`frozen` with the
    machine wherever there is one.
    """
    with _freeze(agent, mountpoints, timeout=timeout, guard=None) as report:
        yield report
