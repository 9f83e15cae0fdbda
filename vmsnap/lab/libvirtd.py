"""A libvirtd for the lab, the libvirt tests and the peer benchmark, started by hand (no systemd needed).

:class:`Libvirtd` starts ``virtlogd`` and ``libvirtd`` on a private socket (by default in a mount namespace
of their own, so it coexists with any other libvirtd) and stops exactly those pids; :func:`define_domain`
defines a q35 domain with no guest OS over qcow2 data disks.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.sax.saxutils import quoteattr

from vmsnap import processes
from vmsnap.errors import LibvirtError, UnsupportedError
from vmsnap.lab.image.contents import AGENT_PORT
from vmsnap.lab.qemu import kvm_usable
from vmsnap.runner import LocalRunner, child_environment
from vmsnap.sockets import unix_listening as listening

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# QEMU (and swtpm, for domains with an emulated TPM) run as root on images in private 0700 temp dirs; there
# is no SELinux/AppArmor to label for
QEMU_SETTINGS: Mapping[str, str] = {
    "user": '"root"',
    "group": '"root"',
    "swtpm_user": '"root"',
    "swtpm_group": '"root"',
    "dynamic_ownership": "0",
    "remember_owner": "0",
    "security_driver": '"none"',
}
DRIVER_PID = Path("/run/libvirt/qemu/driver.pid")
PUBLIC_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
# persistent domain XML, and per-domain state (checkpoint/snapshot metadata, domain-N-name dirs)
PRIVATE_CONFIG = Path("/etc/libvirt/qemu")
PRIVATE_STATE = Path("/var/lib/libvirt/qemu")


def ensure_qemu_conf(conf: Path = QEMU_CONF, settings: Mapping[str, str] = QEMU_SETTINGS) -> list[str]:
    """Append the ``settings`` that ``conf`` lacks; return the lines added.

    Under an exclusive ``flock`` on ``conf`` itself: test workers starting their libvirtds at the same
    moment add the lines once.

    :raise LibvirtError: ``conf`` sets one of them to another value (vmsnap never overrides a host's choice)
    """
    with conf.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        missing = []
        for key, value in settings.items():
            match = re.search(rf"^\s*{re.escape(key)}\s*=\s*(\S+)", text, re.MULTILINE)
            if match is None:
                missing.append(f"{key} = {value}")
            elif match.group(1) != value:
                raise LibvirtError(
                    f"{conf} sets {key} = {match.group(1)}; a lab libvirtd needs {key} = {value}",
                    hint=f"change it in {conf}, or use a host libvirtd that already runs",
                )
        if missing:
            handle.write("\n# vmsnap lab libvirtd (vmsnap/lab/libvirtd.py)\n" + "\n".join(missing) + "\n")
    return missing


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def running_libvirtd_uri() -> str | None:
    """The URI of a libvirtd already running here (the host's, or another lab's on a private socket), or None.

    Only one libvirtd may own ``/run/libvirt/qemu``, so a second one must not be started beside it.
    """
    pid = _read_pid(DRIVER_PID)
    if pid is None or not processes.alive(pid):
        return None
    if PUBLIC_SOCKET.exists():
        return "qemu:///system"
    # a lab libvirtd: its socket directory is in the config file named on its command line
    for flag, value in itertools.pairwise(processes.cmdline(pid) or []):
        if flag in ("-f", "--config"):
            with contextlib.suppress(OSError):
                found = re.search(r'^\s*unix_sock_dir\s*=\s*"([^"]+)"', Path(value).read_text(), re.M)
                if found and Path(found.group(1), "libvirt-sock").exists():
                    return f"qemu:///system?socket={found.group(1)}/libvirt-sock"
    return None


class Libvirtd:
    """A libvirtd to use in a ``with`` block, started here and stopped after (or, if asked, the running one).

    The daemons this object starts run in the foreground as its children (``Popen``), with pid files in
    ``workdir``; leaving the block stops exactly those pids. Domains are the caller's to remove: QEMU
    processes outlive libvirtd.

    By default (``private``) virtlogd and libvirtd run in a mount namespace of their own in which
    ``/run/libvirt``, ``/etc/libvirt/qemu`` (domain definitions) and ``/var/lib/libvirt/qemu`` (domain
    state) are directories under ``workdir``: only one system libvirtd may own ``/run/libvirt``, so a
    private one neither meets nor disturbs another libvirtd on the host (the host's, or another test
    session's), and each sees only its own domains. ``qemu.conf``, logs and disk images stay shared.

    :param parent: where the temp dir goes (short: unix socket paths are limited to 108 bytes)
    :param timeout: seconds to wait for libvirtd to answer
    :param private: run in a private mount namespace; when False, use a libvirtd that already runs here
        (see :func:`running_libvirtd_uri`) or start one in the host's namespace
    """

    def __init__(self, *, parent: Path = Path("/tmp"), timeout: float = 30.0, private: bool = True) -> None:
        self.parent = parent
        self.timeout = timeout
        self.private = private
        self.uri = ""
        self.workdir: Path | None = None
        self.log: Path | None = None
        self.started: list[subprocess.Popen[bytes]] = []
        self._daemon: subprocess.Popen[bytes] | None = None
        self._namespace: subprocess.Popen[bytes] | None = None

    @property
    def qemu_run_dir(self) -> Path:
        """Where this libvirtd keeps running domains' pid and status files (see :func:`stop_domain_qemu`)."""
        if self.private and self.workdir is not None:
            return self.workdir / "run" / "qemu"
        return Path("/run/libvirt/qemu")

    @property
    def pids(self) -> list[int]:
        """The pids of the processes this object started and will stop."""
        holder = [self._namespace.pid] if self._namespace is not None else []
        return [p.pid for p in self.started] + holder

    @property
    def ours(self) -> bool:
        """True when this object started libvirtd (and will stop it)."""
        return self._daemon is not None

    def start(self) -> Libvirtd:
        """Find or start libvirtd and wait until it answers.

        :raise UnsupportedError: libvirtd or libvirt-python is not installed, or not running as root
        :raise LibvirtError: the daemon did not start or answer (with the end of its log)
        """
        binary = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        if not os.path.exists(binary) or shutil.which("virtlogd") is None:
            raise UnsupportedError(
                "libvirtd is not installed",
                hint="apt-get install libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients",
            )
        libvirt = _libvirt()
        if os.geteuid() != 0:
            raise UnsupportedError("a lab libvirtd runs in system mode, as root", hint="run as root")
        if self.private:
            try:
                self._start_own(libvirt, binary)
            except BaseException:
                self.stop()
                raise
            return self
        for _attempt in range(3):
            existing = running_libvirtd_uri()
            if existing is not None:
                self.uri = existing
                return self
            try:
                self._start_own(libvirt, binary)
                return self
            except LibvirtError:
                if running_libvirtd_uri() is None:
                    self.stop()
                    raise
                # another libvirtd took /run/libvirt/qemu first: use that one (keep our virtlogd, it may
                # already log for it)
                if self._daemon is not None:
                    processes.stop_child(self._daemon)
                    self.started.remove(self._daemon)
                    self._daemon = None
            except BaseException:
                self.stop()
                raise
        raise LibvirtError("libvirtd could not be started or found", hint="see /run/libvirt and retry")

    def _start_own(self, libvirt: Any, binary: str) -> None:
        ensure_qemu_conf()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="vmsnap-lv.", dir=self.parent))
        self.log = self.workdir / "libvirtd.log"
        conf = self.workdir / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.workdir}"\nunix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
            f'auth_unix_ro = "none"\nauth_unix_rw = "none"\nlog_outputs = "3:file:{self.log}"\n'
        )
        Path("/run/libvirt").mkdir(mode=0o755, exist_ok=True)
        enter: list[str] = []
        virtlogd_socket = VIRTLOGD_SOCKET
        if self.private:
            run = self.workdir / "run"
            run.mkdir(mode=0o755, exist_ok=True)
            enter = self._enter_namespace(run)
            virtlogd_socket = run / VIRTLOGD_SOCKET.name
        if self.private or not listening(virtlogd_socket, timeout=2):
            with contextlib.suppress(FileNotFoundError):
                virtlogd_socket.unlink()  # left by a virtlogd that is gone
            self._spawn([*enter, "virtlogd", "-p", str(self.workdir / "virtlogd.pid")], "virtlogd")
            self._wait_for(lambda: listening(virtlogd_socket, timeout=2), "virtlogd", virtlogd_socket)
        self._daemon = self._spawn(
            [*enter, binary, "-f", str(conf), "-p", str(self.workdir / "libvirtd.pid")], "libvirtd"
        )
        self.uri = f"qemu:///system?socket={self.workdir}/libvirt-sock"
        self._wait_for(lambda: _answers(libvirt, self.uri), "libvirtd", self.log)

    def _enter_namespace(self, run: Path) -> list[str]:
        """Make a mount namespace (held by a ``sleep`` we start) with ``run`` bound on /run/libvirt and
        private directories on the QEMU driver's domain definitions and state (``PRIVATE_CONFIG``,
        ``PRIVATE_STATE``), so that no other libvirtd sees this one's domains, nor this one theirs.

        :return: the argv prefix that runs a program in it (nsenter execs the program: same pid)
        """
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            raise UnsupportedError(
                "a private libvirtd needs unshare and nsenter", hint="apt-get install util-linux"
            )
        self._namespace = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=child_environment(),
        )
        holder = self._namespace.pid
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + self.timeout
        while True:  # until unshare has made the namespace and exec'd sleep in it
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{holder}/ns/mnt") != ours:
                    break
            if self._namespace.poll() is not None or time.monotonic() > deadline:
                raise LibvirtError(
                    f"unshare --mount did not make a namespace (exit {self._namespace.poll()})"
                )
            time.sleep(0.01)
        enter = ["nsenter", "-t", str(holder), "-m", "--"]
        assert self.workdir is not None
        for source, target in (
            (run, Path("/run/libvirt")),
            (self.workdir / "etc-qemu", PRIVATE_CONFIG),
            (self.workdir / "lib-qemu", PRIVATE_STATE),
        ):
            source.mkdir(mode=0o755, exist_ok=True)
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            LocalRunner().run([*enter, "mount", "--bind", str(source), str(target)], timeout=30)
        return enter

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        with open(self.workdir / f"{name}.out", "wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_environment(),
            )
        self.started.append(process)
        return process

    def _wait_for(self, ready: Any, name: str, log: Path) -> None:
        deadline = time.monotonic() + self.timeout
        process = self.started[-1]
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                assert self.workdir is not None
                tail = ""
                for path in (log, self.workdir / f"{name}.out"):
                    with contextlib.suppress(OSError):
                        tail += path.read_text(errors="replace")[-1500:]
                state = (
                    f"exited with {process.returncode}" if process.poll() is not None else "did not answer"
                )
                raise LibvirtError(f"{name} {state}: {tail.strip()}", hint="see the log above")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the daemons this object started (by pid, newest first) and remove its temp dir."""
        for process in reversed(self.started):
            processes.stop_child(process)
        self.started.clear()
        self._daemon = None
        if self._namespace is not None:  # the namespace (and its bind mount) ends with its last process
            processes.stop_child(self._namespace)
            self._namespace = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def open(self) -> Any:
        """A new ``virConnect`` to this libvirtd (close it when done)."""
        libvirt = _libvirt()
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot connect to {self.uri}: {err}") from err

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as err:
        raise UnsupportedError(
            "libvirt-python is not installed", hint="apt-get install python3-libvirt"
        ) from err
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _answers(libvirt: Any, uri: str) -> bool:
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


def domain_xml(name: str, disks: Mapping[str, Path], *, agent_socket: Path | None = None) -> str:
    """A q35 domain with no OS and qcow2 data disks (``vd*`` on virtio-blk, ``sd*`` on virtio-scsi).

    :param disks: target device name (``vda``, ``sdb`` …) → image path
    :param agent_socket: add a guest agent channel bound to this unix socket
    """
    parts = []
    for dev, path in disks.items():
        bus = "virtio" if dev.startswith("vd") else "scsi"
        parts.append(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file={quoteattr(str(path))}/><target dev={quoteattr(dev)} bus='{bus}'/></disk>"
        )
    if agent_socket is not None:
        parts.append(
            f"<channel type='unix'><source mode='bind' path={quoteattr(str(agent_socket))}/>"
            f"<target type='virtio' name='{AGENT_PORT}'/></channel>"
        )
    return (
        f"<domain type='{'kvm' if kvm_usable() else 'qemu'}'><name>{name}</name>"
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        "<cpu mode='custom' match='exact' check='none'><model fallback='allow'>qemu64</model></cpu>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"{''.join(parts)}<controller type='scsi' model='virtio-scsi'/>"
        "<video><model type='none'/></video><memballoon model='none'/></devices></domain>"
    )


def define_domain(
    conn: Any, name: str, disks: Mapping[str, Path], *, agent_socket: Path | None = None
) -> Any:
    """Define (not start) a q35 domain with no guest OS over ``disks``; return its ``virDomain``.

    :param conn: a ``virConnect``
    :param disks: target device name → qcow2 image path (see :func:`domain_xml`)
    :raise LibvirtError: libvirt refused the definition
    """
    libvirt = _libvirt()
    try:
        return conn.defineXML(domain_xml(name, disks, agent_socket=agent_socket))
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot define domain {name}: {err}") from err


def remove_domain(dom: Any, *, name: str | None = None, run_dir: Path = Path("/run/libvirt/qemu")) -> None:
    """Destroy (if running) and undefine ``dom`` with its snapshot and checkpoint metadata; never raises.

    When libvirtd is gone, the domain's QEMU (found by libvirt's pid file and checked by its command line)
    is stopped by pid instead, so no QEMU outlives the caller.

    :param name: the domain's name, for the fallback when libvirtd no longer answers
    :param run_dir: its libvirtd's ``qemu_run_dir``, for that fallback
    """
    libvirt = _libvirt()
    with contextlib.suppress(libvirt.libvirtError):
        name = name or dom.name()
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        if name is not None:
            stop_domain_qemu(name, run_dir)
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    )
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(flags)


def stop_domain_qemu(name: str, run_dir: Path = Path("/run/libvirt/qemu")) -> bool:
    """Stop the QEMU that libvirt ran for domain ``name`` (SIGTERM, then SIGKILL); True if one was running.

    For a domain whose libvirtd is gone: the pid comes from libvirt's pid file and must belong to a
    ``qemu-system`` process started with ``-name guest=NAME``, so nothing else is ever signalled.
    """
    pid = _read_pid(run_dir / f"{name}.pid")
    if pid is None or not processes.alive(pid):
        return False
    argv = processes.cmdline(pid)
    if not argv:
        return False
    names = [value.split(",")[0] for flag, value in itertools.pairwise(argv) if flag == "-name"]
    if not argv[0].endswith("qemu-system-x86_64") or names != [f"guest={name}"]:
        return False
    processes.terminate(pid, timeout=10)
    return True


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
