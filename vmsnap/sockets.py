"""Two socket questions vmsnap asks of its own servers: does a unix socket accept connections yet, and which
TCP port on 127.0.0.1 is free now."""

from __future__ import annotations

import socket
from pathlib import Path


def unix_listening(path: Path, *, timeout: float = 1.0) -> bool:
    """True once the unix socket ``path`` accepts connections (the file appears at bind(), before
    listen())."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
