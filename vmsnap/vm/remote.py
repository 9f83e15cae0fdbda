"""Another hypervisor over OpenSSH: one master connection, its unix sockets (QMP, guest agent, NBD exports)
forwarded to local sockets, and an :class:`~vmsnap.runner.SshRunner` that runs commands over the same master.

::

    with RemoteHost("root@hv2", forwards=["/run/vm1.qmp", "/run/vm1.qga"]) as hv2:
        machine = QemuMachine(hv2.local("/run/vm1.qmp"), hv2.local("/run/vm1.qga"), name="vm1",
                              runner=hv2.runner)
        with hv2.forwarded("/run/qemu-nbd/vm1.sock") as nbd_socket:   # an export, while it exists
            ...

How: ``ssh -M -S CTL -N -o BatchMode=yes -o ExitOnForwardFailure=yes -L LOCAL:REMOTE …`` in the
foreground of a child process we keep by pid; further sockets are added to the running master with
``ssh -S CTL -O forward -L LOCAL:REMOTE`` and dropped with ``-O cancel``. Keys, ``known_hosts`` and
``~/.ssh/config`` are OpenSSH's own (``identity``/``known_hosts``/``options`` override them); BatchMode means
no password or host-key prompt, ever: a host that needs one fails at once. The control socket and the local
sockets live in a private 0700 directory that is removed with the connection.

A unix-socket forward does not reach the remote socket until a client connects, so a missing remote socket
would only show as a connection that closes at once: :meth:`RemoteHost.forward` checks with ``test -S``
first and says which socket is missing on which host.

libvirt on another host needs none of this: ``qemu+ssh://user@host/system`` (libvirt runs its own ssh, with
the same keys); a job's ``host`` on a ``domain`` entry becomes that URI.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from vmsnap.errors import CommandError, NotFoundError, UsageError
from vmsnap.runner import SshRunner, child_environment

MAX_SOCKET_PATH = 100
"""sun_path holds 108 bytes; stay below that with room for ssh's temporary names."""


class RemoteHost:
    """An OpenSSH master connection to ``destination`` with forwarded unix sockets (a context manager).

    :param destination: ``host`` or ``user@host`` (an ``~/.ssh/config`` alias works)
    :param port: SSH port (None: OpenSSH's default)
    :param identity: private key (``-i``); None: OpenSSH's keys and agent
    :param known_hosts: a known_hosts file to use instead of the user's (then strictly checked)
    :param options: more ``-o`` options, e.g. ``{"ConnectTimeout": "5"}``
    :param config: an ssh_config file to use instead of the user's (``ssh -F``), e.g. one with a dedicated
        backup key, its known_hosts and host aliases
    :param forwards: remote socket paths to forward when the connection opens
    :param connect_timeout: seconds to wait for the master and its forwards
    :param socket_dir: where the private directory is created (default: the system's temp directory)
    """

    def __init__(
        self,
        destination: str,
        *,
        port: int | None = None,
        identity: Path | None = None,
        known_hosts: Path | None = None,
        options: Mapping[str, str] | None = None,
        config: Path | None = None,
        forwards: Sequence[str | os.PathLike[str]] = (),
        connect_timeout: float = 15.0,
        socket_dir: Path | None = None,
    ) -> None:
        if not destination or destination.startswith("-") or any(c.isspace() for c in destination):
            raise UsageError(f"invalid SSH destination {destination!r}", hint="write host or user@host")
        self.destination = destination
        self.port = port
        self.identity = identity
        self.known_hosts = known_hosts
        self.options = dict(options or {})
        self.config = config
        self.connect_timeout = connect_timeout
        self._initial = [str(f) for f in forwards]
        self._socket_dir = socket_dir
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._forwards: dict[str, Path] = {}
        self._names = itertools.count()
        self._lock = threading.Lock()

    # -- the ssh command lines ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``ssh:<destination>``, as runners name where commands ran."""
        return f"ssh:{self.destination}"

    @property
    def control_path(self) -> Path:
        """The master's control socket.

        :raise UsageError: the connection is not open
        """
        return self._private_dir() / "ctl"

    def _private_dir(self) -> Path:
        if self._dir is None:
            raise UsageError(
                f"the SSH connection to {self.destination} is not open", hint="use it in a with block"
            )
        return self._dir

    def _common(self) -> list[str]:
        argv = ["-F", str(self.config)] if self.config is not None else []
        argv += ["-o", "BatchMode=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity is not None:
            argv += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        for key, value in self.options.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def master_argv(self) -> list[str]:
        """The master's command line (runs in the foreground of its own process)."""
        argv = ["ssh", "-M", "-S", str(self.control_path), "-N", *self._common()]
        argv += [
            "-o",
            "ControlPersist=no",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
        ]
        argv += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        argv += ["-o", f"ConnectTimeout={int(self.connect_timeout)}"]
        for remote in self._initial:
            argv += ["-L", f"{self._forwards[remote]}:{remote}"]
        return [*argv, "--", self.destination]

    def _control(self, *args: str) -> list[str]:
        return ["ssh", "-S", str(self.control_path), *self._common(), *args, "--", self.destination]

    @property
    def runner(self) -> SshRunner:
        """Runs commands on the host over the master connection (no new authentication per command)."""
        options = {**self.options, "ControlPath": str(self.control_path), "ControlMaster": "no"}
        return SshRunner(
            self.destination,
            port=self.port or 22,
            identity=self.identity,
            known_hosts=self.known_hosts,
            options=options,
        )

    # -- open and close ----------------------------------------------------------------------------------

    def __enter__(self) -> RemoteHost:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> RemoteHost:
        """Start the master and its initial forwards; wait until they are up.

        :raise UsageError: the private socket directory's path is too long for unix sockets
        :raise CommandError: ssh failed (unreachable, key refused, host key unknown, a forward refused)
        :raise NotFoundError: a socket to forward does not exist on the host
        """
        if self._process is not None:
            return self
        self._dir = Path(tempfile.mkdtemp(prefix="vmsnap-ssh-", dir=self._socket_dir))
        try:
            os.chmod(self._dir, 0o700)
            if len(str(self._dir / "ctl.XXXXXXXXXXXXXXXX")) > MAX_SOCKET_PATH:
                raise UsageError(
                    f"socket directory {self._dir} is too long a path for unix sockets",
                    hint="set TMPDIR to a short directory such as /tmp",
                )
            for remote in self._initial:
                self._forwards[remote] = self._new_local()
            log = self._dir / "ssh.log"
            with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                self._process = subprocess.Popen(
                    self.master_argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=out,
                    env=child_environment(),
                )
            self._wait_ready(log)
            self._check_remote(self._initial)
        except BaseException:
            self.close()
            raise
        return self

    def _new_local(self) -> Path:
        return self._private_dir() / f"s{next(self._names)}.sock"

    def _wait_ready(self, log: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.01
        while True:
            code = self._process.poll()
            if code is not None:
                raise CommandError(
                    self.master_argv(),
                    code,
                    "",
                    log.read_text(errors="replace"),
                    host=self.host,
                    hint=f"check that {self.destination} is reachable, that its host key is known and "
                    "that a key logs in without a password (BatchMode: vmsnap never prompts)",
                )
            if self.control_path.exists() and all(p.exists() for p in self._forwards.values()):
                check = subprocess.run(
                    self._control("-O", "check"),
                    capture_output=True,
                    check=False,
                    timeout=30,
                    env=child_environment(),
                )
                if check.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise CommandError(
                    self.master_argv(),
                    -1,
                    "",
                    log.read_text(errors="replace") or "no answer",
                    host=self.host,
                    hint=f"the SSH connection to {self.destination} did not come up within "
                    f"{self.connect_timeout:g} s",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _check_remote(self, sockets: Sequence[str]) -> None:
        if not sockets:
            return
        script = 'for p; do test -S "$p" || printf "%s\\n" "$p"; done'
        missing = self.runner.run(["sh", "-c", script, "sh", *sockets], timeout=60).stdout.split("\n")
        missing = [m for m in missing if m]
        if missing:
            raise NotFoundError(
                f"no unix socket {missing[0]} on {self.destination}",
                hint="check the path (it is the other host's), and that the VM runs there",
            )

    def close(self) -> None:
        """Stop the master (``-O exit``, then by pid), and remove the private directory and its sockets."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None and self._dir is not None and self.control_path.exists():
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(
                        self._control("-O", "exit"),
                        capture_output=True,
                        check=False,
                        timeout=10,
                        env=child_environment(),
                    )
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._forwards.clear()

    @property
    def pid(self) -> int | None:
        """The master's process id while it runs."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    # -- forwards ----------------------------------------------------------------------------------------

    def local(self, remote_socket: str | os.PathLike[str]) -> Path:
        """The local socket that reaches ``remote_socket``.

        :raise NotFoundError: it is not forwarded
        """
        path = self._forwards.get(str(remote_socket))
        if path is None:
            raise NotFoundError(f"{remote_socket} on {self.destination} is not forwarded")
        return path

    def forward(self, remote_socket: str | os.PathLike[str], *, check: bool = True) -> Path:
        """Forward one more remote unix socket over the running master; returns the local socket.

        :param check: first make sure the socket exists there (``test -S``)
        :raise NotFoundError: it does not exist on the host
        :raise CommandError: the master refused the forward
        """
        remote = str(remote_socket)
        if not remote.startswith("/"):
            raise UsageError(f"remote socket {remote!r} must be an absolute path")
        with self._lock:
            if remote in self._forwards:
                return self._forwards[remote]
            local = self._new_local()
        if check:
            self._check_remote([remote])
        argv = self._control("-O", "forward", "-L", f"{local}:{remote}")
        result = subprocess.run(argv, capture_output=True, check=False, timeout=30, env=child_environment())
        if result.returncode != 0:
            raise CommandError(
                argv, result.returncode, "", result.stderr.decode(errors="replace"), host=self.host
            )
        with self._lock:
            self._forwards[remote] = local
        return local

    def cancel(self, remote_socket: str | os.PathLike[str]) -> None:
        """Stop forwarding ``remote_socket`` and remove its local socket (nothing if it is not forwarded)."""
        remote = str(remote_socket)
        with self._lock:
            local = self._forwards.pop(remote, None)
        if local is None or self._process is None:
            return
        argv = self._control("-O", "cancel", "-L", f"{local}:{remote}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, capture_output=True, check=False, timeout=30, env=child_environment())
        with contextlib.suppress(FileNotFoundError):
            local.unlink()

    @contextlib.contextmanager
    def forwarded(self, remote_socket: str | os.PathLike[str], *, check: bool = True) -> Iterator[Path]:
        """:meth:`forward` for the body of a ``with``, then :meth:`cancel`."""
        local = self.forward(remote_socket, check=check)
        try:
            yield local
        finally:
            self.cancel(remote_socket)

    def __repr__(self) -> str:
        return f"RemoteHost({self.destination!r}, pid={self.pid}, forwards={len(self._forwards)})"
