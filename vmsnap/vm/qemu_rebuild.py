"""A throwaway copy's QEMU command line, rebuilt from a bare QEMU's recorded one (``vmsnap verify --boot``):
the same guest on other disks, sharing nothing writable with the live VM.

It works from an allowlist: each option of the recorded command line is kept as it is (:data:`KEEP`: the
guest's configuration, and files QEMU only reads), replaced (disks, firmware variables, character devices,
NICs, sound, memory on a file), dropped (:data:`DROP`: monitors, displays, daemon and logging options), or
refused with :class:`~vmsnap.errors.UnsupportedError` (everything else, among them every option that
writes the host's files or claims its devices). :func:`rebuild`'s docstring lists each case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import UnsupportedError
from vmsnap.vm.qemu_cmdline import (
    AGENT_PORT,
    Option,
    first_word,
    opts_dict,
    parse_argv,
    parse_opts,
    render_opts,
)


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


KEEP = frozenset(
    {
        "cpu", "smp", "m", "accel", "enable-kvm", "kernel", "initrd", "append", "dtb",
        "bios", "L", "boot", "rtc", "global", "nodefaults", "no-user-config", "nodefconfig", "no-reboot",
        "no-shutdown", "no-hpet", "no-acpi", "usb", "k", "vga", "cdrom", "smbios", "fw_cfg", "acpitable",
        "option-rom", "numa", "overcommit", "sandbox", "msg", "action", "compat", "d", "dfilter",
        "no-fd-bootchk", "win2k-hack", "rtc-td-hack", "only-migratable", "iscsi", "prom-env", "g",
        "mem-prealloc", "full-screen", "no-frame", "alt-grab", "ctrl-grab", "no-quit", "old-param",
        "enable-sync-profile", "async-teardown", "singlestep", "portrait", "rotate", "watchdog-action",
        "echr", "snapshot", "runas", "no-kvm", "enable-fips",
    }
)  # fmt: skip
"""Options kept as they are: the guest's configuration, and files QEMU only reads (kernel, firmware code,
tables). ``-runas`` stays: the copy never runs with more privileges than the VM did."""

DROP = frozenset(
    {
        "daemonize", "pidfile", "D", "trace", "S", "incoming", "loadvm", "preconfig", "writeconfig",
        "dump-vmstate", "mem-path", "name", "uuid", "qmp", "qmp-pretty", "monitor", "mon", "display", "vnc",
        "spice", "sdl", "curses", "nographic", "no-graphic", "gdb", "s", "chroot",
    }
)  # fmt: skip
"""Options dropped: the plan brings its own name, UUID, monitor and display; a pid file, log, trace,
debugger port, incoming migration or chroot of the VM's would be shared with it."""

_REFUSE = {
    "readconfig": "reads a configuration file vmsnap cannot check",
    "fsdev": "shares a host directory: the booted copy would write into it",
    "virtfs": "shares a host directory: the booted copy would write into it",
    "tpmdev": "has an emulated TPM whose state vmsnap does not capture for bare QEMU",
    "add-fd": "passes file descriptors that a new process does not have",
    "set": "changes other options in ways vmsnap cannot check",
    "plugin": "loads a TCG plugin (a program vmsnap would run)",
    "semihosting": "lets the guest open and write the host's files (semihosting)",
    "semihosting-config": "lets the guest open and write the host's files (semihosting)",
}
_CHARDEV_FLAGS = frozenset({"parallel", "debugcon", "virtioconsole"})
"""Options naming a character device backend of their own: the copy's is ``null``."""
_DISK_FLAGS: dict[str, tuple[str | None, int | None]] = {
    "hda": (None, 0), "hdb": (None, 1), "hdc": (None, 2), "hdd": (None, 3),
    "fda": ("floppy", 0), "fdb": ("floppy", 1), "sd": ("sd", None), "mtdblock": ("mtd", None),
}  # fmt: skip
_OBJECTS = frozenset(
    {
        "memory-backend-ram", "memory-backend-memfd", "memory-backend-file", "rng-random", "rng-builtin",
        "rng-egd", "iothread", "secret", "secret_keyring", "tls-creds-anon", "tls-creds-psk",
        "tls-creds-x509", "tls-cipher-suites", "throttle-group", "authz-simple", "authz-list",
        "authz-listfile", "authz-pam", "cryptodev-backend-builtin", "main-loop", "thread-context",
        "sev-guest", "filter-buffer", "filter-mirror", "filter-redirector", "filter-rewriter",
    }
)  # fmt: skip
"""``-object`` types a copy may have (``memory-backend-file`` becomes RAM); any other is refused."""
_HOST_DEVICES = (
    "vfio-",
    "vhost-user-",
    "vhost-scsi",
    "vhost-vsock",
    "vhost-vdpa",
    "usb-host",
    "u2f-passthru",
)
"""``-device`` drivers that claim a device of the host (the VM's, while it runs)."""
_USB_DEVICES = frozenset({"tablet", "mouse", "keyboard", "wacom-tablet"})
_CHILD_REFS = frozenset({"file", "backing", "data-file", "children"})


def _device_refs(options: Sequence[Option]) -> tuple[set[str], set[str], bool]:
    """(agent chardev ids, serial chardev ids, whether a NIC device exists) from ``-device`` options."""
    agents, serials, nic = set(), set(), False
    for option in options:
        if option.flag != "device" or option.value is None:
            continue
        data, driver = _device(option.value)
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


def _device(value: str) -> tuple[dict[str, str], str]:
    """(properties, driver) of a ``-device`` value."""
    if value.startswith("{"):
        data = {str(k): str(v) for k, v in _json_object("-device", value).items()}
        return data, data.get("driver", "")
    data = opts_dict(value)
    return data, first_word(value) or data.get("driver", "")


def _json_object(flag: str, value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except ValueError as err:
        raise UnsupportedError(f"the VM's -{flag} {value[:60]} is no valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise UnsupportedError(f"the VM's -{flag} {value[:60]} is no JSON object")
    return data


def _tree(flat: Mapping[str, str]) -> dict[str, Any]:
    """Dotted QemuOpts keys as nested objects (``file.filename=x`` → ``{"file": {"filename": "x"}}``)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        here = tree
        for part in parents:
            child = here.get(part)
            if not isinstance(child, dict):
                child = here[part] = {} if child is None else {"": child}
            here = child
        here[last] = value
    return tree


def _blockdev(option: Option) -> dict[str, Any]:
    assert option.value is not None
    if option.value.startswith("{"):
        return _json_object("blockdev", option.value)
    return _tree(opts_dict(option.value))


def _children(node: Mapping[str, Any]) -> list[str]:
    """The node names ``node`` refers to."""
    refs = []
    for key in _CHILD_REFS:
        value = node.get(key)
        if isinstance(value, str):
            refs.append(value)
        elif isinstance(value, list):
            refs += [v for v in value if isinstance(v, str)]
    return refs


def _on(node: Mapping[str, Any], *keys: str) -> bool:
    return any(str(node.get(k, "off")).lower() in ("on", "true", "yes") for k in keys)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _writes(node: Mapping[str, Any], safe: set[str], own: set[str]) -> str | None:
    """What a block node not in the backup may write on the host (a file, a device, network storage), or
    None when it writes nothing or only to ``safe`` nodes and the copy's ``own`` files.

    A node is safe when it is read-only, or has children and every one is safe; a node without children
    (a protocol node: a file, a host device, nbd, iscsi, rbd, ssh, …) is safe only when read-only or one of
    the copy's own files.
    """
    if _on(node, "read-only", "readonly"):
        return None
    children: list[Any] = []
    for key in _CHILD_REFS:
        value = node.get(key)
        children += value if isinstance(value, list) else [value] if isinstance(value, (str, dict)) else []
    if not children:
        filename = node.get("filename")
        if filename is not None and str(filename) in own:
            return None
        server = node.get("server")
        where = filename or node.get("path") or (server.get("host") if isinstance(server, dict) else server)
        where = where or node.get("portal") or node.get("host") or node.get("image")
        return f"{node.get('driver', '?')} {where}" if where else str(node.get("driver", "?"))
    for child in children:
        if isinstance(child, str):
            if child not in safe:
                return f"node {child}"
        elif isinstance(child, dict):
            problem = _writes(child, safe, own)
            if problem is not None:
                return problem
    return None


def _replace_files(node: dict[str, Any], files: Mapping[str, Path]) -> None:
    """Point every ``filename`` of ``node`` (and its nested children) that ``files`` names at its copy."""
    for key, value in node.items():
        if key == "filename" and str(value) in files:
            node[key] = str(files[str(value)])
        elif isinstance(value, dict):
            _replace_files(value, files)


def rebuild(argv: Sequence[str], plan: BootPlan, *, program: str | None = None) -> list[str]:
    """The command line of a throwaway copy of the VM ``argv`` describes, booting on ``plan``'s overlays.

    - **Replaced**: the program by ``program`` (this host's QEMU; never a path from the record); each
      recorded disk (a ``-blockdev`` format node by node name, ``-drive`` by ``file=``, ``file.filename=``
      or id, ``-hdX``, ``-fdX``, ``-sd``, ``-mtdblock``) by its overlay, its protocol and backing nodes
      dropped; the firmware variables file (``-drive if=pflash``, ``-pflash`` or a ``-blockdev`` node) by
      ``plan.pflash_vars`` (another ``-pflash`` file becomes read-only); the name and UUID; every monitor
      (one QMP socket of the plan's instead); the guest agent's chardev (added, with a virtio-serial port,
      when the VM has none); the first serial port (a log file); every other character device backend
      (``-chardev``, ``-serial``, ``-parallel``, ``-debugcon``, ``-virtioconsole``) by ``null``; displays
      (``-display none``: a graphics device stays, for the screenshot); every NIC backend (a user-mode one
      with ``restrict=on``, the plan's ports forwarded from 127.0.0.1, one added when ports are asked of a
      VM without NIC); every ``-audiodev`` and ``-audio`` by the ``none`` driver; a memory backend on a
      file by RAM of its size; ``-machine dumpdtb=`` left out.
    - **Dropped**: :data:`DROP` (``-daemonize``, ``-pidfile``, ``-S``, ``-incoming``, ``-loadvm``, ``-D``,
      ``-trace``, ``-gdb``, ``-s``, ``-chroot``, ``-mem-path``, monitors, displays, …).
    - **Kept**: :data:`KEEP`; read-only block nodes and drives (``read-only``/``readonly=on``,
      ``media=cdrom``, ``snapshot=on``) and nodes that only write to other kept nodes; ``-object`` types
      of an allowlist; ``-device`` (but not one that claims a host device).

    :param program: the QEMU to run (default: the recorded one's file name, looked up in ``PATH``)
    :raise UnsupportedError: any other option, and any that would let the copy write what the VM uses or
        claim the host's devices (a writable disk or block node not in the backup whatever its driver, a
        shared host directory, passed descriptors, an emulated TPM, a config file, ``-set``, a plugin,
        semihosting, an ``-object`` outside the allowlist, a host device, ``-icount rr=record``)
    :raise CommandLineError: the command line cannot be parsed
    """
    recorded, options = parse_argv(argv)
    return [program or Path(recorded).name, *_Rebuild(plan, options).run()]


def _socket_chardev(chardev_id: str, path: Path) -> str:
    return render_opts(
        [(None, "socket"), ("id", chardev_id), ("path", str(path)), ("server", "on"), ("wait", "off")]
    )


class _Rebuild:
    """One :func:`rebuild`: the options in order, each replaced, kept, dropped or refused."""

    def __init__(self, plan: BootPlan, options: Sequence[Option]) -> None:
        self.plan = plan
        self.options = options
        self.agents, self.serials, self.has_nic_device = _device_refs(options)
        self.disk_nodes = {d.node_name: d for d in plan.disks if d.node_name}
        self.disk_files = {d.file: d for d in plan.disks}
        self.disk_ids = {d.qdev: d for d in plan.disks if d.qdev}
        self.own_files = {str(p) for p in plan.pflash_vars.values()}
        blockdevs = {
            str(n.get("node-name")): n for n in (_blockdev(o) for o in options if o.flag == "blockdev")
        }
        self.dropped_nodes: set[str] = set()
        self.safe_nodes: set[str] = set(self.disk_nodes)
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
        if flag in _REFUSE:
            raise UnsupportedError(f"the VM's command line has -{flag}, which {_REFUSE[flag]}")
        if flag in DROP:
            return []
        if value is None or flag in KEEP:
            if flag not in KEEP:
                raise _unknown(flag)
            return option.argv()
        if flag == "netdev":
            data = _json_object(flag, value) if value.startswith("{") else opts_dict(value)
            return [
                "-netdev",
                self._user_net([(None, "user"), ("id", str(data.get("id"))), ("restrict", "on")]),
            ]
        if flag == "nic":
            keep = [(k, v) for k, v in parse_opts(value) if k in ("model", "mac", "id")]
            return ["-nic", self._user_net([(None, "user"), ("restrict", "on"), *keep])]
        if flag == "net":
            if first_word(value) in ("nic", "none"):
                return ["-net", value]
            return ["-net", self._user_net([(None, "user"), ("restrict", "on")])]
        if flag == "serial":
            if value.startswith("chardev:"):
                return ["-serial", value]
            if self.serial_done:
                return ["-serial", "null"]
            self.serial_done = True
            return ["-serial", f"file:{self.plan.console}"]
        if flag in _CHARDEV_FLAGS:
            return [f"-{flag}", value if value.startswith("chardev:") or value == "none" else "null"]
        if flag == "chardev":
            return ["-chardev", self._chardev(value)]
        if flag in ("audiodev", "audio"):
            data = _json_object(flag, value) if value.startswith("{") else opts_dict(value)
            if flag == "audiodev":
                return ["-audiodev", render_opts([(None, "none"), ("id", str(data.get("id", "")))])]
            model = data.get("model")
            return ["-audio", render_opts([(None, "none"), *([("model", str(model))] if model else [])])]
        if flag in ("machine", "M"):
            return [f"-{flag}", render_opts([(k, v) for k, v in parse_opts(value) if k != "dumpdtb"])]
        if flag == "icount":
            if opts_dict(value).get("rr") == "record":
                raise UnsupportedError("the VM's -icount rr=record writes a replay log the copy would share")
            return option.argv()
        if flag == "usbdevice":
            if value not in _USB_DEVICES:
                raise UnsupportedError(f"the VM's -usbdevice {value} is not a plain input device")
            return option.argv()
        if flag == "device":
            return self._device(option)
        if flag == "blockdev":
            return self._blockdev(option)
        if flag == "drive":
            return ["-drive", self._drive(value)]
        if flag == "pflash":
            if value in self.plan.pflash_vars:
                file = str(self.plan.pflash_vars[value])
                return ["-drive", render_opts([("if", "pflash"), ("format", "raw"), ("file", file)])]
            items = [("if", "pflash"), ("format", "raw"), ("readonly", "on"), ("file", value)]
            return ["-drive", render_opts(items)]
        if flag in _DISK_FLAGS:
            return ["-drive", self._disk_flag(flag, value)]
        if flag == "object":
            return ["-object", _object(value)]
        raise _unknown(flag)

    def _chardev(self, value: str) -> str:
        chardev_id = opts_dict(value).get("id", "")
        if chardev_id in self.agents:
            return _socket_chardev(chardev_id, self.plan.agent)
        if chardev_id in self.serials and not self.serial_done:
            self.serial_done = True
            return render_opts([(None, "file"), ("id", chardev_id), ("path", str(self.plan.console))])
        return render_opts([(None, "null"), ("id", chardev_id)])

    def _device(self, option: Option) -> list[str]:
        assert option.value is not None
        _, driver = _device(option.value)
        if driver.startswith(_HOST_DEVICES):
            raise UnsupportedError(
                f"the VM's -device {driver} claims a device of the host, which the VM holds",
                hint="the booted copy cannot have it; verify a backup of a VM without it",
            )
        return option.argv()

    def _disk_flag(self, flag: str, value: str) -> str:
        if value not in self.disk_files:
            raise UnsupportedError(
                f"the VM's disk -{flag} {value} is not in the backup",
                hint="the booted copy would write into it; back the VM up with that disk",
            )
        interface, index = _DISK_FLAGS[flag]
        items: list[tuple[str | None, str]] = [
            ("file", str(self.disk_files[value].overlay)),
            ("format", "qcow2"),
        ]
        items += [("if", interface)] if interface else []
        items += [("index", str(index))] if index is not None else []
        items += [] if interface else [("media", "disk")]
        return render_opts(items)

    def _blockdev(self, option: Option) -> list[str]:
        node = _blockdev(option)
        name = str(node.get("node-name", ""))
        if name in self.dropped_nodes:
            return []
        if name in self.disk_nodes:
            file = {"driver": "file", "filename": str(self.disk_nodes[name].overlay)}
            return ["-blockdev", _json({"driver": "qcow2", "node-name": name, "file": file})]
        filename = node.get("filename")
        if filename is not None and str(filename) in self.disk_files:
            return []  # a protocol node of a recorded disk under another node name
        _replace_files(node, self.plan.pflash_vars)
        problem = _writes(node, self.safe_nodes, self.own_files)
        if problem is not None:
            raise UnsupportedError(
                f"the VM's block node {name or '?'} ({problem}) is writable and not in the backup",
                hint="the booted copy would write into it; back the VM up with that disk",
            )
        self.safe_nodes.add(name)
        assert option.value is not None
        if option.value.startswith("{"):
            return ["-blockdev", _json(node)]
        files = self.plan.pflash_vars  # QemuOpts stay QemuOpts: their values are typed by QEMU, not JSON
        items = parse_opts(option.value)
        return [
            "-blockdev",
            render_opts(
                [(k, str(files[v]) if k and k.endswith("filename") and v in files else v) for k, v in items]
            ),
        ]

    def _drive(self, value: str) -> str:
        items = parse_opts(value)
        opts = {k: v for k, v in items if k is not None}
        file_key = "file" if "file" in opts else "file.filename"
        file = opts.get(file_key)
        read_only = _on(opts, "readonly", "read-only", "snapshot") or opts.get("media") == "cdrom"
        if opts.get("if") == "pflash":
            if read_only:
                return value
            if file is not None and file in self.plan.pflash_vars:
                copy = str(self.plan.pflash_vars[file])
                return render_opts([(k, copy if k == file_key else v) for k, v in items])
            raise UnsupportedError(
                f"the VM's firmware variables ({file}) were not kept with the backup",
                hint="take a new backup: vmsnap keeps a bare QEMU's writable pflash with each one",
            )
        disk = self.disk_files.get(file or "") or self.disk_ids.get(opts.get("id", ""))
        if disk is not None:
            kept = [
                (k, v)
                for k, v in items
                if k is not None
                and k not in ("file", "format", "driver")
                and not k.startswith(("file.", "backing"))
            ]
            return render_opts([("file", str(disk.overlay)), ("format", "qcow2"), *kept])
        empty = file is None and "driver" not in opts and not any(k.startswith("file.") for k in opts)
        if read_only or empty:
            return value
        raise UnsupportedError(
            f"the VM's drive {file or opts.get('driver') or opts.get('id', '?')} is writable and not in the "
            "backup",
            hint="the booted copy would write into it; back the VM up with that disk",
        )


def _unknown(flag: str) -> UnsupportedError:
    return UnsupportedError(
        f"the VM's command line has -{flag}, which vmsnap does not know to be safe for a booted copy",
        hint="a copy is booted only from options vmsnap knows cannot touch the VM's files or devices",
    )


def _object(value: str) -> str:
    """An allowed ``-object``; a memory backend on a file becomes RAM of the same size (the file may be
    shared with the VM).

    :raise UnsupportedError: a type outside :data:`_OBJECTS` (e.g. ``filter-dump``, ``input-linux``)
    """
    if value.startswith("{"):
        data = _json_object("object", value)
        kind = str(data.get("qom-type", ""))
    else:
        items = parse_opts(value)
        kind = first_word(value) or opts_dict(value).get("qom-type", "")
    if kind not in _OBJECTS:
        raise UnsupportedError(
            f"the VM's -object {kind or value[:40]} is not one vmsnap knows to be safe for a booted copy",
            hint="a copy is booted only with objects that cannot write the host's files or claim its devices",
        )
    if kind != "memory-backend-file":
        return value
    if value.startswith("{"):
        return _json({"qom-type": "memory-backend-ram", "id": data["id"], "size": data["size"]})
    keep = [(k, v) for k, v in items if k in ("id", "size")]
    return render_opts([(None, "memory-backend-ram"), *keep])
