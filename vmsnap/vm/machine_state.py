"""What a VM needs to come back besides its disks, captured with each backup.

- A bare QEMU: its command line (read from the process behind the QMP socket, ``SO_PEERCRED``; never kept
  when it carries a secret: :func:`~vmsnap.vm.qemu_cmdline.find_secret` names the option), its working
  directory, its disks' node names and files (to swap them for a restore's), and the content of its
  writable firmware flash (``-drive if=pflash,unit=1``: the UEFI variables).
- A libvirt domain: its definition is kept already (``domain.xml``); added here are its UEFI variables
  (``<os><nvram>``) and its emulated TPM's state (swtpm's state directory, as a tar of its files).

**Consistent with the disks**: the files are read while the VM is paused (QMP ``stop``) at the snapshot
instant: the backup pauses the vCPUs, snapshots every disk and reads these files, then resumes. With the
vCPUs stopped no firmware variable is written (pflash writes are the guest's MMIO) and no TPM command is
sent, so the variables, the TPM's persistent state and the disks are of the same instant. The pause lasts
the snapshot plus reading the files (about half a MiB of variables and a few KiB of TPM state); a VM
without such files is not paused for them.

The captured state is kept beside the backup as objects (:data:`RECORD`, :data:`NVRAM`, :data:`TPM`), read
back by ``restore --define``, ``instant-restore --define`` and ``verify --boot``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import RepositoryError, VmsnapError
from vmsnap.vm.qemu_cmdline import CommandLineError, find_secret, parse_argv, qemu_process
from vmsnap.vm.qmp import QMPMonitor, is_firmware_flash

RECORD = "machine.json"
"""The record of the machine's state (JSON, :meth:`MachineState.to_json`)."""
NVRAM = "nvram.fd"
"""The UEFI variables: a libvirt domain's ``<nvram>`` file, or a bare QEMU's writable pflash."""
TPM = "tpm-state.tar"
"""An emulated TPM's persistent state: the files of swtpm's state directory, as a tar."""
FORMAT = 1

Kind = Literal["qemu", "libvirt"]
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")
"""libvirt's default ``swtpm_storage_dir``: a domain's TPM state is in ``<dir>/<uuid>/tpm2`` (or tpm1.2)."""


class MachineStateError(VmsnapError):
    """The machine's firmware variables or TPM state could not be read (or put back)."""


@attrs.frozen
class RecordedDisk:
    """A disk of a bare QEMU as its command line names it: what ``verify --boot`` swaps for an overlay."""

    name: str
    node_name: str
    file: str
    qdev: str = ""


@attrs.frozen
class MachineState:
    """A machine's state as kept with one backup.

    :param kind: "qemu" (bare QEMU) or "libvirt"
    :param argv: a bare QEMU's command line, or None (not kept: see ``refused``)
    :param refused: why the command line was not kept (names the option that carries a secret)
    :param cwd: the QEMU process's working directory (relative paths in ``argv`` are relative to it)
    :param disks: a bare QEMU's disks as its command line names them
    :param nvram: where the UEFI variables were (a libvirt ``<nvram>`` path, a bare QEMU's pflash file)
    :param tpm: a libvirt domain's emulated TPM: ``{"version": "2.0", "dir": ...}``
    :param files: the captured contents, by object name (:data:`NVRAM`, :data:`TPM`)
    """

    kind: Kind
    argv: tuple[str, ...] | None = None
    refused: str | None = None
    cwd: str | None = None
    disks: tuple[RecordedDisk, ...] = ()
    nvram: str | None = None
    tpm: Mapping[str, str] | None = None
    files: Mapping[str, bytes] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The :data:`RECORD` object (the files are kept as objects of their own)."""
        return {
            "format": FORMAT,
            "kind": self.kind,
            "argv": list(self.argv) if self.argv is not None else None,
            "refused": self.refused,
            "cwd": self.cwd,
            "disks": [attrs.asdict(d) for d in self.disks],
            "nvram": self.nvram,
            "tpm": dict(self.tpm) if self.tpm is not None else None,
            "files": sorted(self.files),
        }

    def objects(self) -> dict[str, bytes]:
        """Every object to keep beside the backup, by name."""
        record = json.dumps(self.to_json(), indent=1, sort_keys=True).encode()
        return {RECORD: record, **self.files}

    @classmethod
    def from_json(cls, data: Any, files: Mapping[str, bytes] | None = None) -> MachineState:
        """Parse a :data:`RECORD` object.

        :raise RepositoryError: it is malformed or of another format
        """
        try:
            if data.get("format") != FORMAT or data["kind"] not in ("qemu", "libvirt"):
                raise ValueError(f"format {data.get('format')!r}, kind {data.get('kind')!r}")
            argv = data.get("argv")
            return cls(
                kind=data["kind"],
                argv=tuple(str(a) for a in argv) if argv is not None else None,
                refused=data.get("refused"),
                cwd=data.get("cwd"),
                disks=tuple(RecordedDisk(**{k: str(v) for k, v in d.items()}) for d in data.get("disks", [])),
                nvram=data.get("nvram"),
                tpm={str(k): str(v) for k, v in data["tpm"].items()} if data.get("tpm") else None,
                files=dict(files or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise RepositoryError(
                f"the kept machine state is damaged: {err}", hint="take a new backup"
            ) from err


@attrs.frozen
class MachineStateSource:
    """Where a machine's state is, found before the backup freezes anything; :meth:`capture` reads it.

    :param state: the state without its files (command line, paths)
    :param files: object name → the host file to read at the snapshot instant
    :param tpm_dir: swtpm's state directory, read as :data:`TPM`
    """

    state: MachineState
    files: Mapping[str, Path] = attrs.field(factory=dict)
    tpm_dir: Path | None = None

    @property
    def needs_pause(self) -> bool:
        """True when files the running VM writes are read (they must be of the snapshot instant)."""
        return bool(self.files) or self.tpm_dir is not None

    def capture(self) -> MachineState:
        """The state with its files read (call it while the VM is paused at the snapshot instant).

        :raise MachineStateError: a file cannot be read
        """
        contents: dict[str, bytes] = {}
        for name, path in self.files.items():
            try:
                contents[name] = path.read_bytes()
            except OSError as err:
                raise MachineStateError(f"cannot read the machine's {name} at {path}: {err}") from err
        if self.tpm_dir is not None:
            contents[TPM] = tar_directory(self.tpm_dir)
        return attrs.evolve(self.state, files=contents)


def tar_directory(directory: Path) -> bytes:
    """The regular files of ``directory`` (not lock files) as an uncompressed tar, names relative to it.

    :raise MachineStateError: the directory cannot be read
    """
    out = io.BytesIO()
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(directory.iterdir()):
                if path.is_file() and not path.is_symlink() and not path.name.endswith(".lock"):
                    info = tar.gettarinfo(str(path), arcname=path.name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
    except OSError as err:
        raise MachineStateError(f"cannot read the TPM state in {directory}: {err}") from err
    return out.getvalue()


def untar_directory(data: bytes, directory: Path, *, mode: int = 0o600) -> list[Path]:
    """Write the files of a :func:`tar_directory` tar into ``directory`` (made 0700); returns them.

    :raise MachineStateError: the tar is damaged or names something other than plain file names
    """
    written = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            members = tar.getmembers()
            for member in members:
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise MachineStateError(f"the kept TPM state holds {member.name!r}, not a plain file")
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for member in members:
                source = tar.extractfile(member)
                assert source is not None
                target = directory / member.name
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
                with os.fdopen(fd, "wb") as out:
                    out.write(source.read())
                written.append(target)
    except tarfile.TarError as err:
        raise MachineStateError(f"the kept TPM state is damaged: {err}") from err
    return written


# -- bare QEMU ----------------------------------------------------------------------------------------


def qemu_state_source(qmp_socket: Path, monitor: QMPMonitor) -> MachineStateSource:
    """A bare QEMU's state: its command line (unless it carries a secret, cannot be parsed, or its process
    cannot be found: ``refused`` says why), disks and writable pflash.

    :raise MachineStateError: the writable pflash is named by a relative path and QEMU's working directory
        cannot be read (vmsnap would read another file)
    """
    argv: list[str] | None = None
    cwd: str | None = None
    why: str | None = None
    try:
        pid, argv = qemu_process(qmp_socket, timeout=2.0)
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{pid}/cwd")
        parse_argv(argv)
    except CommandLineError as err:
        why = err.message
    secret = find_secret(argv) if argv is not None else None
    if secret is not None:
        why = f"it carries a secret in {secret}"
    disks = []
    files: dict[str, Path] = {}
    nvram = None
    for block in monitor.query_block():
        inserted = block.get("inserted") or {}
        if inserted and is_firmware_flash(block) and not inserted.get("ro"):
            nvram = str(inserted.get("file", ""))
            if not os.path.isabs(nvram) and cwd is None:
                raise MachineStateError(
                    f"the VM's firmware variables are at the relative path {nvram} and the working directory "
                    f"of its QEMU cannot be read: {why or 'its process is not on this host'}",
                    hint="start QEMU with an absolute path for its pflash, or back it up on its own host",
                )
            files[NVRAM] = Path(cwd or "/", nvram)
    for disk in monitor.disks():
        disks.append(RecordedDisk(disk.name, disk.node_name, str(disk.file), _qdev_id(disk.qdev)))
    state = MachineState(
        kind="qemu",
        argv=tuple(argv) if argv is not None and why is None else None,
        refused=why,
        cwd=cwd,
        disks=tuple(disks),
        nvram=nvram,
    )
    return MachineStateSource(state, files)


def _qdev_id(qdev: str | None) -> str:
    """The ``id=`` of a device from its QOM path (``/machine/peripheral/root/virtio-backend`` → ``root``)."""
    if not qdev:
        return ""
    parts = qdev.strip("/").split("/")
    if "peripheral" in parts:
        index = parts.index("peripheral")
        return parts[index + 1] if index + 1 < len(parts) else ""
    return ""


# -- libvirt ------------------------------------------------------------------------------------------


def nvram_path(nvram: Any) -> str:
    """The file an ``<nvram>`` element names: its text, or its ``<source file=…>`` (``type='file'``) or
    ``<source dev=…>`` (``type='block'``); "" without one (none, or network storage)."""
    if nvram is None:
        return ""
    text = (nvram.text or "").strip()
    source = nvram.find("source")
    if text or source is None:
        return text
    return str(source.get("file") or source.get("dev") or "")


def libvirt_state_source(xml_root: Any) -> MachineStateSource | None:
    """A libvirt domain's UEFI variables (``<os><nvram>``) and emulated TPM state, from its live XML;
    None when it has neither.

    :param xml_root: the parsed domain XML (an ``ElementTree`` element)
    """
    files: dict[str, Path] = {}
    nvram = nvram_path(xml_root.find("os/nvram"))
    if nvram:
        files[NVRAM] = Path(nvram)
    tpm_dir = None
    tpm = None
    backend = xml_root.find("devices/tpm/backend[@type='emulator']")
    if backend is not None:
        version = backend.get("version", "2.0")
        source = backend.find("source[@type='dir']")
        uuid = (xml_root.findtext("uuid") or "").strip()
        if source is not None and source.get("path"):
            tpm_dir = Path(str(source.get("path")))
        else:
            tpm_dir = SWTPM_DIR / uuid / ("tpm2" if version == "2.0" else "tpm1.2")
        tpm = {"version": version, "dir": str(tpm_dir)}
    if not files and tpm_dir is None:
        return None
    state = MachineState(kind="libvirt", nvram=nvram or None, tpm=tpm)
    return MachineStateSource(state, files, tpm_dir)
