"""A port probe through user-mode networking: an accepted connection proves nothing, so a silent one counts
only when the guest's socket table shows it established. Real sockets on 127.0.0.1 stand in for the
forwarding (which accepts at once); the guest's table is given."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from vmsnap.verify_boot import probe
from vmsnap.verify_boot.probe import ESTABLISHED, LISTEN, probe_port, tcp_sockets

TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 0 0 0
   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 0 0 0
   2: 0F02000A:1F90 0202000A:D2B4 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 0 0 0
"""


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts and never sends: what the host sees of any forwarded port."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_the_proc_net_tcp_table_is_read() -> None:
    assert tcp_sockets(TABLE) == [(8080, LISTEN, False), (22, LISTEN, True), (8080, ESTABLISHED, False)]


def test_silence_is_no_answer_unless_the_guest_shows_the_connection(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe, "CONFIRM_SECONDS", 0.5)
    deadline = time.monotonic() + 1.0
    nothing = probe_port(8081, silent_server, deadline=deadline, sockets=lambda: tcp_sockets(TABLE))
    assert not nothing.open and "nothing listens on port 8081" in nothing.detail
    unreadable = probe_port(8081, silent_server, deadline=time.monotonic() + 1.0)
    assert not unreadable.open and "cannot be read" in unreadable.detail
    unreached = probe_port(
        8080, silent_server, deadline=time.monotonic() + 1.0, sockets=lambda: [(8080, LISTEN, False)]
    )
    assert not unreached.open and "never reached it" in unreached.detail
    answered = probe_port(
        8080, silent_server, deadline=time.monotonic() + 1.0, sockets=lambda: tcp_sockets(TABLE)
    )
    assert answered.open and "accepted in the guest" in answered.detail
