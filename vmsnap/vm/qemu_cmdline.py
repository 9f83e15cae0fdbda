"""A bare QEMU's command line: read from the process behind a QMP socket and refused when it carries a secret
(:func:`rebuild <vmsnap.vm.qemu_rebuild.rebuild>` makes a throwaway copy's from it).

QEMU's options are ``-flag`` or ``-flag VALUE`` (``--flag`` is the same); a value is either JSON (``{...}``)
or QemuOpts, ``key=value`` pairs separated by commas (a comma inside a value doubled), the first of which may
be a bare word (``-netdev user,id=n0``). :func:`parse_opts` and :func:`render_opts` read and write QemuOpts.

:func:`find_secret` names the first option that carries a secret itself (a password, an ``-object secret``'s
``data``, a URL with a password, a systemd credential, an ``-fw_cfg`` string, a password-like ``key=value``
of the kernel command line): such a command line is never stored. A secret given by file
(``-object secret,file=…``) or by reference (``password-secret=ID``) is no secret in the command line. A
command line that cannot be parsed is searched word by word with the same rules.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap import processes
from vmsnap.errors import VmsnapError

AGENT_PORT = "org.qemu.guest_agent.0"

#: QEMU options that take no value (everything else starting with "-" takes exactly one)
FLAGS = frozenset(
    {
        "nodefaults", "no-user-config", "nodefconfig", "S", "daemonize", "nographic", "no-reboot",
        "no-shutdown", "enable-kvm", "snapshot", "no-hpet", "no-acpi", "usb", "full-screen", "no-frame",
        "s", "only-migratable", "no-fd-bootchk", "win2k-hack", "rtc-td-hack", "no-quit", "alt-grab",
        "ctrl-grab", "preconfig", "enable-sync-profile", "mem-prealloc", "old-param", "semihosting",
        "curses", "sdl", "portrait", "singlestep", "async-teardown", "xen-attach", "xen-domid-restrict",
        "no-kvm", "enable-fips", "h", "help", "version", "audio-help", "no-graphic",
    }
)  # fmt: skip

_BOOLEAN = frozenset({"on", "off", "yes", "no", "true", "false"})
_URL_PASSWORD = re.compile(r"://[^/@\s:]+:[^@\s]+@")
_PASSWORD_KEY = re.compile(r"(?:^|[._-])(?:root)?(?:pw|pass|passwd|password|passphrase|secret|token)$", re.I)
"""A kernel command line key that names a password (``rootpw``, ``inst.rootpw``, ``ks.password``)."""
_CREDENTIAL = "io.systemd.credential"


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


def opts_dict(text: str) -> dict[str, str]:
    """The ``key=value`` pairs of QemuOpts ``text`` (a bare word left out)."""
    return {key: value for key, value in parse_opts(text) if key is not None}


def first_word(text: str) -> str:
    """The bare first word of QemuOpts ``text`` (``user`` of ``user,id=n0``), or ""."""
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
        if _CREDENTIAL in text:
            return f"{last}= (a systemd credential)"
    return None


def _kernel_secret(text: str) -> str | None:
    """A password-like ``key=value`` of a kernel command line (``rootpw=…``, ``systemd.set_credential=…``)."""
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep or not value:
            continue
        if key.startswith("systemd.set_credential") or _PASSWORD_KEY.search(key):
            return f"{key}="
        if _URL_PASSWORD.search(value):
            return f"{key}= (a URL with a password)"
    return None


def _option_secret(flag: str, value: str) -> str | None:
    """The secret one option's ``value`` carries, as ``key=``; None when there is none."""
    if flag == "append":
        return _kernel_secret(value)
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            data = None
        if isinstance(data, dict):
            kind = str(data.get("qom-type", data.get("driver", "")))
            return _secret_in(_values(data), kind)
    items = parse_opts(value)
    kind = items[0][1] if items and items[0][0] is None else opts_dict(value).get("qom-type", "")
    if flag == "fw_cfg" and any(k == "string" for k, _ in items):
        return "string= (give it by file=)"
    found = _secret_in(((k, v) for k, v in items if k is not None), kind)
    if found is None and _URL_PASSWORD.search(value):
        found = "a URL with a password"
    if found is None and _CREDENTIAL in value:
        found = "a systemd credential"
    return found


def find_secret(argv: Sequence[str]) -> str | None:
    """The first option of ``argv`` that carries a secret in the command line, as ``-flag (key=)``; None
    when there is none. When ``argv`` cannot be parsed, every word is searched (as the value of the word
    before it)."""
    try:
        _, options = parse_argv(argv)
        pairs = [(o.flag, o.value) for o in options if o.value is not None]
    except CommandLineError:
        words = list(argv[1:])
        pairs = [
            ((words[i - 1] if i and words[i - 1].startswith("-") else "-?").lstrip("-"), word)
            for i, word in enumerate(words)
        ]
    for flag, value in pairs:
        found = _option_secret(flag, value)
        if found:
            return f"-{flag} ({found})"
    return None


def is_qemu_program(path: str) -> bool:
    """True when ``path``'s file name is ``qemu-system-<arch>``."""
    return re.fullmatch(r"qemu-system-[a-z0-9_]+", Path(path).name) is not None


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


def qemu_process(qmp_socket: Path, *, timeout: float = 5.0) -> tuple[int, list[str]]:
    """(pid, command line) of the QEMU serving ``qmp_socket`` on this host.

    :raise CommandLineError: no process listens there, or it is no ``qemu-system-*``
    """
    pid = peer_pid(qmp_socket, timeout=timeout)
    argv = processes.cmdline(pid)
    if not argv or not is_qemu_program(argv[0]):
        raise CommandLineError(
            f"the process behind {qmp_socket} (pid {pid}) is no qemu-system-*: {(argv or ['?'])[0]}"
        )
    return pid, argv
