"""Other hosts reached over OpenSSH: :class:`HostSpec` (``root@hv2`` as a job file's ``host`` or the CLI's
``--host`` names it, parsed and checked before it reaches an ssh command line), :func:`connect_with_openssh`
(the :class:`~vmsnap.vm.remote.RemoteHost` for it) and :class:`HostPool` (one open connection per host,
shared by the VMs of a job).

ssh reads its own configuration: ``~/.ssh/config``, keys, ``known_hosts`` — or, when ``$VMSNAP_SSH_CONFIG``
(or the job file's ``ssh_config``) names a file, that file instead (``ssh -F``): a dedicated backup key,
its known_hosts and host aliases in one place, e.g. ``/etc/vmsnap/ssh_config``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import attrs

from vmsnap.errors import UsageError
from vmsnap.vm.remote import RemoteHost

SSH_CONFIG_ENV = "VMSNAP_SSH_CONFIG"

_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@attrs.frozen
class HostSpec:
    """Another host reached over OpenSSH: ``user@host``, ``host``, ``user@host:port``, ``user@[v6]:port``.

    :param host: a host name (or an alias of ``~/.ssh/config``), an IPv4 or an IPv6 address
    :param user: the login; None: OpenSSH's default (config, else the local user)
    :param port: None: OpenSSH's default (config, else 22)
    """

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        """Parse ``[user@]host[:port]`` (IPv6 in brackets when a port follows).

        :raise UsageError: anything else (spaces, a leading '-', an empty part, a port out of range)
        """
        hint = "write user@host, host, user@host:port or user@[2001:db8::1]:port"
        if not isinstance(text, str) or not text or text != text.strip() or text.startswith("-"):
            raise UsageError(f"invalid host {text!r}", hint=hint)
        user: str | None = None
        rest = text
        if "@" in text:
            user, rest = text.rsplit("@", 1)
            if not _USER.match(user):
                raise UsageError(f"invalid user {user!r} in host {text!r}", hint=hint)
        port: int | None = None
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise UsageError(f"invalid host {text!r}: unclosed '['", hint=hint)
            host, tail = rest[1:close], rest[close + 1 :]
            if tail:
                if not tail.startswith(":"):
                    raise UsageError(f"invalid host {text!r}", hint=hint)
                port = _port(tail[1:], text, hint)
            if not _is_ip(host, 6):
                raise UsageError(f"invalid IPv6 address {host!r} in host {text!r}", hint=hint)
        elif rest.count(":") > 1:  # a bare IPv6 address, no port
            host = rest
            if not _is_ip(host, 6):
                raise UsageError(f"invalid IPv6 address {host!r} in host {text!r}", hint=hint)
        else:
            host, _, port_text = rest.partition(":")
            if port_text or rest.endswith(":"):
                port = _port(port_text, text, hint)
            if not (_HOSTNAME.match(host) or _is_ip(host, 4)):
                raise UsageError(f"invalid host name {host!r} in host {text!r}", hint=hint)
        return cls(host=host, user=user, port=port)

    @property
    def destination(self) -> str:
        """``user@host`` (or ``host``) as ssh takes it; the port goes in ``-p``."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def libvirt_uri(self) -> str:
        """``qemu+ssh://[user@]host[:port]/system``: libvirt on that host, through ssh."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        user = f"{self.user}@" if self.user else ""
        return f"qemu+ssh://{user}{host}{port}/system"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port else self.host
        text = f"{self.user}@{host}" if self.user else host
        return f"{text}:{self.port}" if self.port else text


def _port(text: str, spec: str, hint: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"invalid port {text!r} in host {spec!r}", hint=hint)
    return int(text)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def ssh_config(path: Path | str | None = None) -> Path | None:
    """The ssh_config file to use: ``path``, else ``$VMSNAP_SSH_CONFIG``, else None (OpenSSH's own).

    :raise UsageError: the file named does not exist
    """
    value = path if path is not None else os.environ.get(SSH_CONFIG_ENV) or None
    if value is None:
        return None
    config = Path(value)
    if not config.is_file():
        where = "" if path is not None else f" (${SSH_CONFIG_ENV})"
        raise UsageError(f"ssh config file {config}{where} does not exist", hint="check the path")
    return config


def connect_with_openssh(spec: HostSpec, *, config: Path | None = None) -> RemoteHost:
    """The (unopened) :class:`RemoteHost` for ``spec``: OpenSSH's keys, known_hosts and config, or the
    :func:`ssh_config` file; BatchMode, never a prompt."""
    return RemoteHost(spec.destination, port=spec.port, config=ssh_config(config))


ConnectHost = Callable[[HostSpec], RemoteHost]
"""Makes the (unopened) connection to a host; jobs and tests pass their own."""


class HostPool:
    """One open :class:`RemoteHost` per host, opened on first use (thread-safe), all closed by :meth:`close`.

    :param connect: makes the (unopened) RemoteHost for a host spec
    """

    def __init__(self, connect: ConnectHost = connect_with_openssh) -> None:
        self._connect = connect
        self._hosts: dict[HostSpec, RemoteHost] = {}
        self._locks: dict[HostSpec, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, spec: HostSpec) -> RemoteHost:
        """The open connection to ``spec``.

        :raise CommandError: ssh could not connect
        """
        with self._lock:
            host_lock = self._locks.setdefault(spec, threading.Lock())
        with host_lock:
            host = self._hosts.get(spec)
            if host is None:
                host = self._connect(spec).open()
                self._hosts[spec] = host
            return host

    def close(self) -> None:
        """Close every connection (by pid) and remove its sockets."""
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
