"""The one wrapper of ``nbdkit``: a :class:`~vmsnap.image.readers.BlockReader` served read-only over NBD by
nbdkit's Python plugin (:mod:`vmsnap.image.nbdkit_plugin`), forked into the background so that it outlives
the process that started it, and recorded like a storage daemon (``daemon.json``, 0600) so that any later
process can stop it by pid (:mod:`vmsnap.image.daemon`).

Its private directory (``<parent>/nbdkit-XXXXXXXX/``, 0700) holds ``daemon.json``, ``nbd.sock``,
``nbdkit.pid`` and ``plugin.log`` (one line per failed read). It serves the default export:
``nbd+unix:///?socket=…/nbd.sock``.

nbdkit's environment (:func:`nbdkit_environment`, set with ``env`` on its command line) is this process's
with two changes:

- ``PATH`` starts with the directory of the interpreter vmsnap runs on (a venv's base interpreter):
  nbdkit's embedded Python finds its standard library and site directories from the first ``python3`` on
  ``PATH``, and another Python of the same version first there (pyenv, conda) would give it that
  installation's library and lose Debian's ``dist-packages`` (where ``python3-cryptography`` lives).
- No secrets (:data:`vmsnap.runner.SECRET_VARIABLES`, stripped by the runner): AWS credentials that this
  process has in its environment reach nbdkit's reader (a repository on S3) through ``aws-credentials``
  (0600) in the private directory, named by ``AWS_SHARED_CREDENTIALS_FILE``, under the profile this process
  uses (``AWS_PROFILE``, else ``default``); the file goes with the directory when nbdkit stops.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import TransferError, UsageError, VmsnapError
from vmsnap.files import write_atomic
from vmsnap.image.daemon import DaemonRecord, RecordedDaemon, read_pid
from vmsnap.image.readers import reader_options

PROGRAM = "nbdkit"
PRIVATE_PREFIX = "nbdkit-"
PID_FILE = "nbdkit.pid"
PLUGIN = Path(__file__).with_name("nbdkit_plugin.py")
"""The plugin script nbdkit's Python runs."""


CREDENTIALS_FILE = "aws-credentials"


def python_home_bin() -> Path:
    """The directory of the interpreter vmsnap runs on (a venv's base interpreter, symlinks resolved)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(base)).parent


def nbdkit_environment(directory: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables nbdkit gets besides (or instead of) the runner's environment (see the module
    docstring); ``env`` is this process's by default. Writes ``directory/aws-credentials`` when ``env``
    holds AWS credentials.
    """
    source = os.environ if env is None else env
    first = str(python_home_bin())
    rest = [part for part in source.get("PATH", os.defpath).split(os.pathsep) if part and part != first]
    changes = {"PATH": os.pathsep.join([first, *rest])}
    key_id, secret = source.get("AWS_ACCESS_KEY_ID"), source.get("AWS_SECRET_ACCESS_KEY")
    if key_id and secret:
        profile = source.get("AWS_PROFILE") or source.get("AWS_DEFAULT_PROFILE") or "default"
        lines = [f"[{profile}]", f"aws_access_key_id = {key_id}", f"aws_secret_access_key = {secret}"]
        token = source.get("AWS_SESSION_TOKEN") or source.get("AWS_SECURITY_TOKEN")
        if token:
            lines.append(f"aws_session_token = {token}")
        path = directory / CREDENTIALS_FILE
        write_atomic(path, ("\n".join(lines) + "\n").encode())
        changes["AWS_SHARED_CREDENTIALS_FILE"] = str(path)
    return changes


def default_syspath() -> list[Path]:
    """Directories nbdkit's embedded Python needs to import vmsnap and its dependencies: the directory
    that holds the ``vmsnap`` package, then this interpreter's site-packages (a venv's, when vmsnap runs in
    one)."""
    package_root = Path(__file__).resolve().parent.parent.parent
    paths = [package_root]
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key])
        if path.is_dir() and path not in paths:
            paths.append(path)
    return paths


@attrs.define
class NbdkitServer(RecordedDaemon):
    """``nbdkit python`` serving a reader; a context manager that stops it on exit (register :meth:`stop` on
    an ExitStack and ``pop_all()`` to keep it running past this process).

    :param reader: the reader factory's import string (``module:callable``)
    :param options: the factory's keyword arguments (strings; visible in ``ps``: no secrets)
    :param threads: nbdkit's worker threads (parallel requests)
    :param syspath: directories for the plugin's ``sys.path`` (default :func:`default_syspath`)
    :param start_timeout: seconds the forked server gets to become ready (it writes its pid file then)
    :param parent: where the private directory is made (default: the system's temp directory)
    :param stop_timeout: seconds between SIGTERM and SIGKILL
    :param runner: runs nbdkit; must be this host
    """

    program = PROGRAM
    private_prefix = PRIVATE_PREFIX
    pid_file = PID_FILE
    title = "nbdkit"

    reader: str
    options: Mapping[str, Any] = attrs.Factory(dict)
    threads: int = 8
    syspath: Sequence[Path] = attrs.Factory(default_syspath)
    start_timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        if ":" not in self.reader or self.reader.startswith("-"):
            raise UsageError(f"reader {self.reader!r} is not module:callable")
        reader_options(dict(self.options))  # fail before starting anything
        if not 1 <= self.threads <= 64:
            raise UsageError(f"nbdkit threads {self.threads} out of range 1..64")

    @property
    def socket(self) -> Path:
        return self.directory / "nbd.sock"

    @property
    def uri(self) -> str:
        """``nbd+unix:///?socket=…`` (the default export)."""
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def log(self) -> Path:
        """The plugin's log of failed reads."""
        return self.directory / "plugin.log"

    def argv(self, environment: Mapping[str, str] | None = None) -> list[str]:
        """nbdkit's command line (inside :meth:`start`), after ``env`` and the ``environment`` it sets."""
        directory = self.directory
        settings = [f"{key}={value}" for key, value in (environment or {}).items()]
        argv = [
            *(["env", *settings] if settings else []),
            PROGRAM,
            "--unix",
            str(self.socket),
            "--pidfile",
            str(directory / PID_FILE),
            "--readonly",
            "--threads",
            str(self.threads),
            "python",
            str(PLUGIN),
        ]
        argv += [f"syspath={path}" for path in self.syspath]
        argv += [f"reader={self.reader}", f"log={self.log}"]
        argv += [f"{key}={value}" for key, value in reader_options(dict(self.options)).items()]
        return argv

    def _launch(self, directory: Path) -> DaemonRecord:
        """Run nbdkit; ready once it accepts connections (its pid file appears then). The reader is opened
        before nbdkit forks, so a reader that cannot open its backup fails here, with its error.

        :raise TransferError: nbdkit (or the reader) refused to start
        """
        try:
            self.runner.run(self.argv(nbdkit_environment(directory)), timeout=120)
        except VmsnapError as err:
            stderr = str(getattr(err, "stderr", "") or err.message)
            lines = [line.strip() for line in stderr.splitlines() if line.strip()]
            detail = lines[-1] if lines else "no output"
            raise TransferError(
                f"nbdkit could not serve reader {self.reader}: {detail}",
                hint="check the backup named in the reader's options; nbdkit-plugin-python must be installed",
            ) from err
        pid = _wait_for_pid(directory / PID_FILE, self.start_timeout)
        if pid is None:
            raise TransferError(
                f"nbdkit did not become ready within {self.start_timeout:g} s (no pid file in {directory})",
                hint=f"see {self.log} and the system log for nbdkit's error",
            )
        return self._recorded(directory, pid, nbd_socket=self.socket, exports=[""])


def _wait_for_pid(path: Path, timeout: float) -> int | None:
    """The pid nbdkit writes once it accepts connections (its parent exits at the fork, before that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = read_pid(path)
        if pid is not None:
            return pid
        time.sleep(0.005)
    return None
