"""Every error vmsnap raises, under one root, each saying what failed and what to do next.

The tree::

    VmsnapError                      exit 1 unless noted
     ├── UsageError                  bad input from the caller (names, options, paths); exit 2
     ├── NotFoundError               unknown VM, disk, snapshot, backup
     ├── UnsupportedError            a strategy or transport cannot handle this disk / source
     ├── PluginError                 unknown or broken strategy / transport plugin
     ├── CommandError                an external command failed: argv, exit code, stdout, stderr, host
     ├── CommandTimeoutError         an external command ran past its timeout
     ├── QMPError
     │    ├── QMPConnectionError     socket missing, dead, or not speaking QMP
     │    ├── QMPCommandError        QEMU answered a command with an error: command, error class, desc
     │    └── BlockJobError          a block job failed, was cancelled, or did not finish in time
     ├── AgentError
     │    ├── AgentNotRespondingError  no agent behind the socket, or it stopped answering
     │    ├── AgentCommandError        the agent answered a command with an error
     │    └── FreezeError              freeze or thaw failed (the guest is left thawed when we can)
     ├── SnapshotError               a strategy's create / delete / rollback failed
     ├── TransferError               a transport could not copy a snapshot out (bad source, full target)
     ├── LibvirtError                libvirtd unreachable, or it refused an operation (snapshot, commit…)
     └── RepositoryError             the backup repository is missing, of another format, or damaged
          ├── ChecksumMismatchError
          │    └── DamagedChunkError  a stored chunk is missing, truncated or altered (names who uses it)
          ├── ChainError             an incremental chain is broken (missing parent, bad backing link)
          ├── StoreError             the store (directory, S3 bucket) failed: unreachable, refused, full
          ├── KeyFileError           an encrypted repository's key file is missing, unreadable or wrong
          └── LeaseError             another writer or a gc holds the lease this operation needs

Messages are templates in the class (``message``) filled with the keyword arguments, plus a ``hint``
that tells the user what to do; both are available as attributes for callers that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class VmsnapError(Exception):
    """Root of every vmsnap error. ``str(err)`` is one line: what failed, then what to do."""

    exit_code: ClassVar[int] = 1
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


class UsageError(VmsnapError):
    """The caller asked for something malformed (a name with '/', an unknown option value)."""

    exit_code = 2


class NotFoundError(VmsnapError):
    """Something named does not exist: a VM, a disk, a snapshot, a backup."""


class UnsupportedError(VmsnapError):
    """A strategy or transport cannot handle what it was given; the message names what was found."""


class PluginError(VmsnapError):
    """A strategy or transport name is unknown, duplicated, or its module failed to import."""


class SnapshotError(VmsnapError):
    """A strategy could not create, export, delete or roll back a snapshot."""


class TransferError(VmsnapError):
    """A transport could not copy a snapshot out: the source is unreadable or the target cannot be written."""


class LibvirtError(VmsnapError):
    """libvirt refused a connection or an operation (snapshot, block commit, backup job); its text is kept."""

    default_hint = "check that libvirtd runs and that the --connect URI is right (virsh -c URI list --all)"


class CommandError(VmsnapError):
    """An external command exited with a code it was not expected to.

    :param argv: the command as run
    :param exit_code: its exit status (kept as ``returncode``; ``exit_code`` is vmsnap's own)
    :param stdout: what it printed (text, possibly truncated for display)
    :param stderr: what it printed on stderr
    :param host: where it ran ("local", "ssh:host", "guest:name")
    """

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int,
        stdout: str,
        stderr: str,
        *,
        host: str = "local",
        hint: str | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.host = host
        last = _last_line(stderr) or _last_line(stdout) or "no output"
        where = "" if host == "local" else f" on {host}"
        super().__init__(
            f"{self.argv[0] if self.argv else '?'} failed{where} with exit code {exit_code}: {last}",
            hint=hint if hint is not None else "run with --debug to see the full command and its output",
        )


class CommandTimeoutError(VmsnapError):
    """An external command did not finish within its timeout; it was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, *, host: str = "local") -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        self.host = host
        super().__init__(
            f"{self.argv[0] if self.argv else '?'} ran past {timeout:g} s on {host}; killed",
            hint="check that the storage is responsive, or raise the timeout",
        )


class QMPError(VmsnapError):
    """Talking to QEMU over QMP failed."""


class QMPConnectionError(QMPError):
    """The QMP socket is missing, refuses connections, or does not speak QMP."""

    default_hint = "check that QEMU runs with -qmp unix:PATH,server=on,wait=off and that the path is right"


class QMPCommandError(QMPError):
    """QEMU answered a QMP command with an error.

    :param command: the QMP command name
    :param error_class: QEMU's error class (GenericError, DeviceNotFound, …)
    :param desc: QEMU's human-readable description
    """

    def __init__(
        self, command: str, error_class: str, desc: str, *, arguments: Any = None, hint: str | None = None
    ) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.arguments = arguments
        super().__init__(f"QMP {command} failed ({error_class}): {desc}", hint=hint or "")


class BlockJobError(QMPError):
    """A block job failed, was cancelled, or did not reach the wanted state in time."""

    def __init__(self, job_id: str, message: str, *, hint: str | None = None) -> None:
        self.job_id = job_id
        super().__init__(f"block job {job_id}: {message}", hint=hint or "")


class AgentError(VmsnapError):
    """Talking to the QEMU guest agent failed."""


class AgentNotRespondingError(AgentError):
    """Nothing answers on the agent socket, or the agent stopped answering."""

    default_hint = (
        "check that qemu-ga runs in the guest and that QEMU has a virtio-serial port "
        "org.qemu.guest_agent.0 on that socket; use --quiesce off to back up without freezing"
    )


class AgentCommandError(AgentError):
    """The guest agent answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"guest agent {command} failed ({error_class}): {desc}")


class FreezeError(AgentError):
    """Freezing (or thawing) the guest's filesystems failed. vmsnap thaws what it can before raising."""

    default_hint = "see the guest's qemu-ga log and fsfreeze-hook output; --quiesce off skips freezing"


class RepositoryError(VmsnapError):
    """The backup repository is missing, of another format version, or damaged."""


class ChecksumMismatchError(RepositoryError):
    """Data read back does not match the checksum recorded in the manifest."""


class ChainError(RepositoryError):
    """An incremental chain is broken: a parent is missing or a backing link points elsewhere."""


class DamagedChunkError(ChecksumMismatchError):
    """A stored chunk is missing, truncated or does not match its id (the message names its users)."""


class StoreError(RepositoryError):
    """The store behind a repository failed: unreachable endpoint, refused credentials, missing bucket,
    a full filesystem. The message never carries a secret."""


class KeyFileError(RepositoryError):
    """An encrypted repository's key file is missing, unreadable, not private, or not this repository's."""


class LeaseError(RepositoryError):
    """Another process holds what this operation needs (a VM's writer lease, or the gc lock)."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
