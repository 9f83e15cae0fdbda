"""A bare QEMU's command line: read from the process behind a QMP socket, refused when it carries a secret,
and rebuilt to boot a copy of the VM on other disks (``vmsnap verify --boot``).

QEMU's options are ``-flag`` or ``-flag VALUE`` (``--flag`` is the same); a value is either JSON (``{...}``)
or QemuOpts, ``key=value`` pairs separated by commas (a comma inside a value doubled), the first of which may
be a bare word (``-netdev user,id=n0``). :func:`parse_opts` and :func:`render_opts` read and write QemuOpts.

:func:`find_secret` names the first option that carries a secret itself (a password, an ``-object secret``'s
``data``, a URL with a password): such a command line is never stored. A secret given by file
(``-object secret,file=…``) or by reference (``password-secret=ID``) is no secret in the command line.

:func:`rebuild` makes the command line of a throwaway copy: see its docstring for what it replaces.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap import processes
from vmsnap.errors import UnsupportedError, VmsnapError

AGENT_PORT = "org.qemu.guest_agent.0"

#: QEMU options that take no value (everything else starting with "-" takes exactly one)
FLAGS = frozenset(
    {
        "nodefaults", "no-user-config", "nodefconfig", "S", "daemonize", "nographic", "no-reboot",
        "no-shutdown", "enable-kvm", "snapshot", "no-hpet", "no-acpi", "usb", "full-screen", "no-frame",
        "s", "only-migratable", "no-fd-bootchk", "win2k-hack", "rtc-td-hack", "no-quit", "alt-grab",
        "ctrl-grab", "preconfig", "enable-sync-profile", "mem-prealloc", "old-param", "semihosting",
    }
)  # fmt: skip

_BOOLEAN = frozenset({"on", "off", "yes", "no", "true", "false"})
_URL_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


class CommandLineError(VmsnapError):
    """A QEMU command line vmsnap cannot keep or cannot boot a copy from (the message names the option)."""


@attrs.frozen
class Option:
    """One option of a QEMU command line: ``-flag`` (value None) or ``-flag VALUE``."""

    flag: str
    value: str | None = None

    def argv(self) -> list[str]:
        return [f"-{self.flag}"] if self.value is None else [f"-{self.flag}", self.value]


def parse_argv(argv: Sequence[str]) -> tuple[str, list[Option]]:
    """(program, options) of a QEMU argv.

    :raise CommandLineError: a word that is no option, or an option missing its value
    """
    if not argv:
        raise CommandLineError("an empty QEMU command line")
    options: list[Option] = []
    words = iter(argv[1:])
    for word in words:
        if not word.startswith("-") or word == "-":
            raise CommandLineError(f"{word!r} in the QEMU command line is no option")
        flag = word[2:] if word.startswith("--") else word[1:]
        if flag in FLAGS:
            options.append(Option(flag))
            continue
        value = next(words, None)
        if value is None:
            raise CommandLineError(f"option -{flag} of the QEMU command line has no value")
        options.append(Option(flag, value))
    return argv[0], options


def parse_opts(text: str) -> list[tuple[str | None, str]]:
    """QemuOpts ``text`` as (key, value) pairs in order; a bare word is (None, word). ``,,`` is a comma."""
    items: list[tuple[str | None, str]] = []
    current: list[str] = []
    i = 0
    parts: list[str] = []
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    for part in parts:
        key, sep, value = part.partition("=")
        items.append((key, value) if sep else (None, part))
    return items


def render_opts(items: Sequence[tuple[str | None, str]]) -> str:
    """The QemuOpts text of (key, value) pairs (commas in values doubled)."""
    out = []
    for key, value in items:
        escaped = value.replace(",", ",,")
        out.append(escaped if key is None else f"{key}={escaped}")
    return ",".join(out)


def _opts_dict(text: str) -> dict[str, str]:
    return {key: value for key, value in parse_opts(text) if key is not None}


def _first_word(text: str) -> str:
    items = parse_opts(text)
    return items[0][1] if items and items[0][0] is None else ""


def _values(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key, leaf value) of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _values(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for item in value:
            yield from _values(item, path)
    else:
        yield path, value


def _secret_in(pairs: Iterator[tuple[str, Any]], kind: str) -> str | None:
    for key, value in pairs:
        last = key.rsplit(".", 1)[-1].lower()
        text = str(value)
        if last in ("password", "passwd") and text.lower() not in _BOOLEAN:
            return f"{last}="
        if last == "data" and kind in ("secret", "secret_keyring"):
            return "data="
        if _URL_PASSWORD.search(text):
            return f"{last}= (a URL with a password)"
    return None


def find_secret(argv: Sequence[str]) -> str | None:
    """The first option of ``argv`` that carries a secret in the command line, as ``-flag (key=)``; None
    when there is none."""
    try:
        _, options = parse_argv(argv)
    except CommandLineError:
        options = [Option(word.lstrip("-")) for word in argv[1:]]
    for option in options:
        if option.value is None:
            continue
        value = option.value
        if value.startswith("{"):
            try:
                data = json.loads(value)
            except ValueError:
                data = None
            if isinstance(data, dict):
                kind = str(data.get("qom-type", data.get("driver", "")))
                found = _secret_in(_values(data), kind)
                if found:
                    return f"-{option.flag} ({found})"
                continue
        items = parse_opts(value)
        kind = items[0][1] if items and items[0][0] is None else _opts_dict(value).get("qom-type", "")
        found = _secret_in(((k, v) for k, v in items if k is not None), kind)
        if found is None and _URL_PASSWORD.search(value):
            found = "a URL with a password"
        if found:
            return f"-{option.flag} ({found})"
    return None


# -- reading it from the process ----------------------------------------------------------------------


def peer_pid(path: Path, *, timeout: float = 5.0) -> int:
    """The pid of the process listening on the unix socket ``path`` (``SO_PEERCRED`` of a connection to
    it; QEMU need not accept the connection: a QMP socket serves one client at a time).

    :raise CommandLineError: nothing listens there
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError as err:
            raise CommandLineError(f"cannot reach {path} to find its QEMU process: {err}") from err
    pid, _uid, _gid = struct.unpack("3i", raw)
    return int(pid)


def qemu_argv(qmp_socket: Path) -> list[str]:
    """The command line of the QEMU serving ``qmp_socket`` on this host.

    :raise CommandLineError: no process listens there, or it is no ``qemu-system-*``
    """
    pid = peer_pid(qmp_socket)
    argv = processes.cmdline(pid)
    if not argv or not Path(argv[0]).name.startswith("qemu-system-"):
        raise CommandLineError(
            f"the process behind {qmp_socket} (pid {pid}) is no qemu-system-*: {(argv or ['?'])[0]}"
        )
    return argv


# -- rebuilding it for a throwaway copy -------------------------------------------------------------


@attrs.frozen
class BootDisk:
    """A disk of the recorded VM and the overlay the copy runs on.

    :param node_name: its format node in the recorded VM (what ``-device … drive=`` names)
    :param file: its image in the recorded VM
    :param overlay: the copy's image (qcow2)
    :param qdev: its device id in the recorded VM, if any
    """

    node_name: str
    file: str
    overlay: Path
    qdev: str = ""


@attrs.frozen
class BootPlan:
    """What :func:`rebuild` puts in place of the recorded VM's own.

    :param disks: the recorded disks and their overlays
    :param qmp: the copy's QMP socket
    :param agent: the copy's guest agent socket
    :param console: the copy's serial console log
    :param name: the copy's ``-name``
    :param uuid: the copy's ``-uuid``
    :param ports: guest TCP port → host port on 127.0.0.1 (forwarded by a restricted user-mode NIC)
    :param pflash_vars: the recorded firmware variables file → the copy's copy of it
    """

    disks: tuple[BootDisk, ...]
    qmp: Path
    agent: Path
    console: Path
    name: str
    uuid: str
    ports: Mapping[int, int] = attrs.field(factory=dict)
    pflash_vars: Mapping[str, Path] = attrs.field(factory=dict)


_DROP = frozenset(
    {"daemonize", "pidfile", "D", "runas", "chroot", "S", "incoming", "loadvm", "qmp", "qmp-pretty",
     "monitor", "mon", "display", "vnc", "spice", "sdl", "curses", "nographic", "trace", "writeconfig",
     "mem-path", "name", "uuid", "serial", "net", "nic", "netdev"}
)  # fmt: skip
_REFUSE = {
    "readconfig": "reads a configuration file vmsnap cannot check",
    "fsdev": "shares a host directory: the booted copy would write into it",
    "virtfs": "shares a host directory: the booted copy would write into it",
    "tpmdev": "has an emulated TPM whose state vmsnap does not capture for bare QEMU",
    "add-fd": "passes file descriptors that a new process does not have",
}
_DISK_FLAGS = {"hda": 0, "hdb": 1, "hdc": 2, "hdd": 3}


def _device_refs(options: Sequence[Option]) -> tuple[set[str], set[str], bool]:
    """(agent chardev ids, serial chardev ids, whether a NIC device exists) from ``-device`` options."""
    agents, serials, nic = set(), set(), False
    for option in options:
        if option.flag != "device" or option.value is None:
            continue
        if option.value.startswith("{"):
            data = {str(k): str(v) for k, v in json.loads(option.value).items()}
            driver = data.get("driver", "")
        else:
            data = _opts_dict(option.value)
            driver = _first_word(option.value) or data.get("driver", "")
        if driver == "virtserialport" and data.get("name") == AGENT_PORT and "chardev" in data:
            agents.add(data["chardev"])
        elif "serial" in driver and "chardev" in data and "virtserial" not in driver:
            serials.add(data["chardev"])
        if "netdev" in data:
            nic = True
    for option in options:
        if option.flag == "serial" and option.value and option.value.startswith("chardev:"):
            serials.add(option.value.split(":", 1)[1])
    return agents, serials, nic


def _blockdev(option: Option) -> dict[str, Any]:
    assert option.value is not None
    if option.value.startswith("{"):
        data = json.loads(option.value)
        if not isinstance(data, dict):
            raise CommandLineError(f"-blockdev {option.value[:60]} is no JSON object")
        return data
    return dict(_opts_dict(option.value))


def _children(node: Mapping[str, Any]) -> list[str]:
    refs = []
    for key in ("file", "backing", "data-file"):
        value = node.get(key)
        if isinstance(value, str):
            refs.append(value)
    return refs


def _filename(node: Mapping[str, Any]) -> str | None:
    value = node.get("filename", node.get("file.filename"))
    if value is None and isinstance(node.get("file"), dict):
        value = node["file"].get("filename")
    return str(value) if value is not None else None


def _read_only(node: Mapping[str, Any]) -> bool:
    return str(node.get("read-only", "off")).lower() in ("on", "true", "yes")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def rebuild(argv: Sequence[str], plan: BootPlan) -> list[str]:
    """The command line of a throwaway copy of the VM ``argv`` describes, booting on ``plan``'s overlays.

    Replaced: each recorded disk (``-blockdev`` format node by node name, ``-drive`` by file or id,
    ``-hdX``) by its overlay, its protocol and backing nodes dropped; the firmware variables file
    (``-drive if=pflash`` or its ``-blockdev`` node) by ``plan.pflash_vars``; the name and UUID; every
    monitor (one QMP socket of the plan's instead); the guest agent's chardev (added, with a virtio-serial
    port, when the VM has none); the first serial port (a log file; other chardevs become ``null``);
    displays (``-display none``: a graphics device stays, for the screenshot); every NIC backend (a
    user-mode one with ``restrict=on``, the plan's ports forwarded from 127.0.0.1, one added when ports are
    asked of a VM without NIC). Dropped: ``-daemonize``, ``-pidfile``, ``-S``, ``-incoming``, ``-loadvm``,
    ``-D``, ``-trace``, ``-runas``, ``-chroot``, ``-mem-path`` (a file backend becomes RAM).

    :raise UnsupportedError: an option that would let the copy touch what the VM uses (a writable disk not
        in the backup, a shared host directory, passed descriptors, an emulated TPM, a config file)
    :raise CommandLineError: the command line cannot be parsed
    """
    program, options = parse_argv(argv)
    return [program, *_Rebuild(plan, options).run()]


def _socket_chardev(chardev_id: str, path: Path) -> str:
    return render_opts(
        [(None, "socket"), ("id", chardev_id), ("path", str(path)), ("server", "on"), ("wait", "off")]
    )


class _Rebuild:
    """One :func:`rebuild`: the options in order, each replaced, kept or dropped."""

    def __init__(self, plan: BootPlan, options: Sequence[Option]) -> None:
        self.plan = plan
        self.options = options
        self.agents, self.serials, self.has_nic_device = _device_refs(options)
        self.disk_nodes = {d.node_name: d for d in plan.disks if d.node_name}
        self.disk_files = {d.file: d for d in plan.disks}
        self.disk_ids = {d.qdev: d for d in plan.disks if d.qdev}
        blockdevs = {
            str(n.get("node-name")): n for n in (_blockdev(o) for o in options if o.flag == "blockdev")
        }
        self.dropped_nodes: set[str] = set()
        pending = [c for name in self.disk_nodes if name in blockdevs for c in _children(blockdevs[name])]
        while pending:
            child = pending.pop()
            if child not in self.dropped_nodes:
                self.dropped_nodes.add(child)
                pending += _children(blockdevs.get(child, {}))
        self.serial_done = False
        self.nic_done = False
        ports = sorted(plan.ports.items())
        self.forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in ports)

    def _user_net(self, items: list[tuple[str | None, str]]) -> str:
        """A restricted user-mode backend; the first one made forwards the plan's ports."""
        text = render_opts(items)
        if not self.nic_done and self.forwards:
            text += "," + self.forwards
        self.nic_done = True
        return text

    def run(self) -> list[str]:
        plan = self.plan
        out: list[str] = ["-name", plan.name, "-uuid", plan.uuid]
        for option in self.options:
            if option.flag in _REFUSE:
                raise UnsupportedError(
                    f"the VM's command line has -{option.flag}, which {_REFUSE[option.flag]}"
                )
            out += self._one(option)
        out += ["-qmp", f"unix:{plan.qmp},server=on,wait=off", "-display", "none"]
        if not self.serial_done:
            out += ["-serial", f"file:{plan.console}"]
        if not self.agents:
            port = render_opts([(None, "virtserialport"), ("chardev", "vmsnap-qga"), ("name", AGENT_PORT)])
            out += ["-chardev", _socket_chardev("vmsnap-qga", plan.agent)]
            out += ["-device", "virtio-serial-pci,id=vmsnap-vser", "-device", port]
        if plan.ports and not self.nic_done and not self.has_nic_device:
            netdev = self._user_net([(None, "user"), ("id", "vmsnap-net0"), ("restrict", "on")])
            out += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=vmsnap-net0"]
        return out

    def _one(self, option: Option) -> list[str]:
        flag, value = option.flag, option.value
        if value is None:
            return [] if flag in _DROP else option.argv()
        if flag == "netdev":
            net_id = str(
                json.loads(value).get("id") if value.startswith("{") else _opts_dict(value).get("id")
            )
            return ["-netdev", self._user_net([(None, "user"), ("id", net_id), ("restrict", "on")])]
        if flag == "nic":
            keep = [(k, v) for k, v in parse_opts(value) if k in ("model", "mac", "id")]
            return ["-nic", self._user_net([(None, "user"), ("restrict", "on"), *keep])]
        if flag == "net":
            if _first_word(value) in ("nic", "none"):
                return ["-net", value]
            return ["-net", self._user_net([(None, "user"), ("restrict", "on")])]
        if flag == "serial":
            if value.startswith("chardev:"):
                return ["-serial", value]
            if self.serial_done:
                return ["-serial", "null"]
            self.serial_done = True
            return ["-serial", f"file:{self.plan.console}"]
        if flag == "chardev":
            return ["-chardev", self._chardev(value)]
        if flag == "blockdev":
            return self._blockdev(option)
        if flag == "drive":
            return ["-drive", _drive(value, self.disk_files, self.disk_ids, self.plan)]
        if flag in _DISK_FLAGS:
            if value not in self.disk_files:
                raise UnsupportedError(f"the VM's disk -{flag} {value} is not in the backup")
            overlay = str(self.disk_files[value].overlay)
            index = str(_DISK_FLAGS[flag])
            return [
                "-drive",
                render_opts([("file", overlay), ("format", "qcow2"), ("index", index), ("media", "disk")]),
            ]
        if flag == "object":
            return ["-object", _object(value)]
        return [] if flag in _DROP else option.argv()

    def _chardev(self, value: str) -> str:
        chardev_id = _opts_dict(value).get("id", "")
        if chardev_id in self.agents:
            return _socket_chardev(chardev_id, self.plan.agent)
        if chardev_id in self.serials and not self.serial_done:
            self.serial_done = True
            return render_opts([(None, "file"), ("id", chardev_id), ("path", str(self.plan.console))])
        return render_opts([(None, "null"), ("id", chardev_id)])

    def _blockdev(self, option: Option) -> list[str]:
        node = _blockdev(option)
        name = str(node.get("node-name", ""))
        if name in self.dropped_nodes:
            return []
        if name in self.disk_nodes:
            file = {"driver": "file", "filename": str(self.disk_nodes[name].overlay)}
            return ["-blockdev", _json({"driver": "qcow2", "node-name": name, "file": file})]
        filename = _filename(node)
        if filename is not None and filename in self.plan.pflash_vars:
            node["filename"] = str(self.plan.pflash_vars[filename])
            return ["-blockdev", _json(node)]
        if filename is not None and filename in self.disk_files:
            return []  # a protocol node of a recorded disk under another node name
        if filename is not None and not _read_only(node):
            raise UnsupportedError(
                f"the VM's block node {name} ({filename}) is writable and not in the backup",
                hint="the booted copy would write into it; back the VM up with that disk",
            )
        return option.argv()


def _drive(
    value: str, disk_files: Mapping[str, BootDisk], disk_ids: Mapping[str, BootDisk], plan: BootPlan
) -> str:
    items = parse_opts(value)
    opts = {k: v for k, v in items if k is not None}
    file = opts.get("file")
    if opts.get("if") == "pflash":
        if file is None or str(opts.get("readonly", "off")).lower() in ("on", "true", "yes"):
            return value
        if file in plan.pflash_vars:
            return render_opts([(k, str(plan.pflash_vars[file]) if k == "file" else v) for k, v in items])
        raise UnsupportedError(
            f"the VM's firmware variables ({file}) were not kept with the backup",
            hint="take a new backup: vmsnap keeps a bare QEMU's writable pflash with each one",
        )
    disk = disk_files.get(file or "") or disk_ids.get(opts.get("id", ""))
    if disk is not None:
        kept = [
            (k, v)
            for k, v in items
            if k is not None and k not in ("file", "format") and not k.startswith(("file.", "backing"))
        ]
        return render_opts([("file", str(disk.overlay)), ("format", "qcow2"), *kept])
    if (
        file is None
        or opts.get("media") == "cdrom"
        or str(opts.get("readonly", "off")).lower() in ("on", "true", "yes")
    ):
        return value
    raise UnsupportedError(
        f"the VM's drive {file} is writable and not in the backup",
        hint="the booted copy would write into it; back the VM up with that disk",
    )


def _object(value: str) -> str:
    """A memory backend on a file becomes RAM of the same size (the file may be shared with the VM)."""
    if value.startswith("{"):
        data = json.loads(value)
        if data.get("qom-type") == "memory-backend-file":
            return _json({"qom-type": "memory-backend-ram", "id": data["id"], "size": data["size"]})
        return value
    items = parse_opts(value)
    if items and items[0] == (None, "memory-backend-file"):
        keep = [(k, v) for k, v in items[1:] if k in ("id", "size")]
        return render_opts([(None, "memory-backend-ram"), *keep])
    return value
