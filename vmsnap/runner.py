"""Where external commands run: this host, or another host over SSH (:mod:`vmsnap.vm.agent_runner`: a guest).

Strategies and transports get a :class:`Runner` and never call ``subprocess`` themselves. Every command is an
argv list; the only place that quotes is :class:`SshRunner`, because ssh hands its command to a remote shell.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import threading
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import sh

from vmsnap.errors import CommandError, CommandTimeoutError, UsageError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3600.0

SECRET_VARIABLES = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "VMSNAP_KEY_FILE",
    }
)
"""Variables no command vmsnap starts inherits: AWS credentials (the store reads them in vmsnap's own
process; a child that needs them gets them another way, see :mod:`vmsnap.image.nbdkit`) and where the
repository key is."""


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a command vmsnap starts: ``env`` (default: this process's) without
    :data:`SECRET_VARIABLES`."""
    source = os.environ if env is None else env
    return {key: value for key, value in source.items() if key not in SECRET_VARIABLES}


@attrs.frozen
class CommandResult:
    """How a command ended.

    :param argv: the command as run
    :param exit_code: its exit status (one of the ``ok_codes`` it was run with)
    :param stdout: standard output, decoded as UTF-8 (undecodable bytes replaced)
    :param stderr: standard error, likewise
    :param host: where it ran
    """

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    host: str = "local"


@runtime_checkable
class Runner(Protocol):
    """Runs argv lists somewhere and says where (``host``)."""

    @property
    def host(self) -> str: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        """Run ``argv`` to completion.

        :param argv: program and arguments; never a shell string
        :param ok_codes: exit codes that count as success
        :param input: bytes or text fed to standard input
        :param timeout: seconds before the command is killed (None: no limit)
        :raise CommandError: when it exits with a code not in ``ok_codes`` (or cannot be started)
        :raise CommandTimeoutError: when it runs past ``timeout``
        """
        ...

    def which(self, name: str) -> str | None:
        """The full path of program ``name`` where this runner runs, or None."""
        ...


def check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, str) or not argv:
        raise UsageError("a command must be a non-empty argv list, not a shell string")
    return tuple(str(a) for a in argv)


def _kill_on_timeout(command: Any, expired: threading.Event) -> None:
    expired.set()
    with contextlib.suppress(Exception):  # it may have exited just now
        command.kill()


def decode_output(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def _logged(err: CommandError) -> CommandError:
    """``err``, after logging the command's whole output (``--debug``)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "exit %d: %s\n--- stdout ---\n%s\n--- stderr ---\n%s",
            err.returncode,
            shlex.join(err.argv),
            err.stdout.rstrip(),
            err.stderr.rstrip(),
        )
    return err


def _failed(args: tuple[str, ...], err: Any) -> CommandError:
    return CommandError(args, err.exit_code, decode_output(err.stdout), decode_output(err.stderr))


@attrs.define
class LocalRunner:
    """Runs commands on this host (through the ``sh`` package, argv lists only).

    :param env: the commands' environment (default: this process's); either way without
        :data:`SECRET_VARIABLES` (:func:`child_environment`)
    :param cwd: their working directory
    """

    env: Mapping[str, str] | None = None
    cwd: Path | None = None

    @property
    def host(self) -> str:
        return "local"

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        args = check_argv(argv)
        try:
            program: Any = sh.Command(args[0])
        except sh.CommandNotFound as err:
            raise CommandError(
                args,
                127,
                "",
                f"{args[0]}: command not found",
                hint=f"install the package that provides {args[0]}",
            ) from err
        kwargs: dict[str, object] = {
            "_ok_code": list(ok_codes),
            "_return_cmd": True,
            "_tty_out": False,
            "_tty_in": False,
            "_decode_errors": "replace",
        }
        if input is not None:
            kwargs["_in"] = input
        kwargs["_env"] = child_environment(self.env)
        if self.cwd is not None:
            kwargs["_cwd"] = str(self.cwd)
        log.debug("run: %s", shlex.join(args))
        # sh's own timeouts poll every 0.1 s; a timer that kills the process costs nothing per command
        expired = threading.Event()
        try:
            done = program(*args[1:], _bg=True, _bg_exc=False, **kwargs)
            timer = (
                threading.Timer(timeout, _kill_on_timeout, (done, expired)) if timeout is not None else None
            )
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                done.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        except sh.SignalException as err:  # killed: by our timer, or else reported as a shell would
            if expired.is_set():
                log.debug("killed after %g s: %s", timeout or 0, args[0])
                raise CommandTimeoutError(args, float(timeout or 0)) from err
            raise _logged(
                CommandError(args, err.exit_code, decode_output(err.stdout), decode_output(err.stderr))
            ) from err
        except sh.ErrorReturnCode as err:
            raise _logged(
                CommandError(args, err.exit_code, decode_output(err.stdout), decode_output(err.stderr))
            ) from err
        result = CommandResult(
            args, int(done.exit_code), decode_output(done.stdout), decode_output(done.stderr), "local"
        )
        log.debug("exit %d: %s", result.exit_code, args[0])
        return result

    def which(self, name: str) -> str | None:
        return shutil.which(name)


@attrs.define
class SshRunner:
    """Runs commands on another host with OpenSSH in batch mode (no password prompts, ever).

    The remote side gets one command line built with :func:`shlex.join`, so arguments with spaces or
    quotes arrive intact. Keys and host-key checking come from ``identity``/``known_hosts`` or ssh's config.

    :param destination: ``host`` or ``user@host``
    :param port: SSH port
    :param identity: private key file (``ssh -i``)
    :param known_hosts: a known_hosts file to use instead of the user's
    :param options: extra ``-o`` options, e.g. ``{"ConnectTimeout": "5"}``
    """

    destination: str
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None
    options: Mapping[str, str] = attrs.Factory(dict)
    local: LocalRunner = attrs.Factory(LocalRunner)

    @property
    def host(self) -> str:
        return f"ssh:{self.destination}"

    def ssh_argv(self) -> list[str]:
        """The ``ssh`` command up to (not including) the remote command; rsync's ``-e`` uses it too."""
        if self.destination.startswith("-"):
            raise UsageError(f"invalid SSH destination {self.destination!r}")
        argv = ["ssh", "-o", "BatchMode=yes", "-p", str(self.port)]
        if self.identity is not None:
            argv += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        for key, value in self.options.items():
            argv += ["-o", f"{key}={value}"]
        return [*argv, self.destination]

    def remote_argv(self, argv: Sequence[str]) -> list[str]:
        """The local command line that runs ``argv`` on the other host (for a process that must outlive a
        :meth:`run`, such as a thaw guard there, started with ``subprocess``)."""
        return [*self.ssh_argv(), "--", shlex.join(check_argv(argv))]

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        args = check_argv(argv)
        full = self.remote_argv(args)
        try:
            result = self.local.run(full, ok_codes=(*ok_codes, 255), input=input, timeout=timeout)
        except CommandError as err:
            raise CommandError(args, err.returncode, err.stdout, err.stderr, host=self.host) from err
        except CommandTimeoutError as err:
            raise CommandTimeoutError(args, err.timeout, host=self.host) from err
        if result.exit_code == 255 and 255 not in ok_codes:
            raise CommandError(
                args,
                255,
                result.stdout,
                result.stderr,
                host=self.host,
                hint=f"ssh could not reach {self.destination}: check the host, the key and known_hosts",
            )
        return CommandResult(args, result.exit_code, result.stdout, result.stderr, self.host)

    def which(self, name: str) -> str | None:
        result = self.run(["sh", "-c", 'command -v -- "$1"', "sh", name], ok_codes=(0, 1, 127))
        path = result.stdout.strip()
        return path if result.exit_code == 0 and path else None


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
