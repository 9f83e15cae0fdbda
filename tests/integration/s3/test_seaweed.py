"""The SeaweedFS launcher does what the fault tests rely on: ports of its own, a stop and a restart on the
same data and ports, processes gone by pid, and a replicated set-up that survives losing a volume server."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import attrs
import pytest

from tests.integration.s3.fixtures import BUCKET, SESSION_STOP_GRACE
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.errors import StoreError
from vmsnap.repo.stores.s3 import S3Options, S3Store


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_every_port_is_its_own(seaweed: SeaweedServer) -> None:
    ports = [port for port in attrs.astuple(seaweed.ports) if port]
    assert len(set(ports)) == len(ports) == 8
    assert not {8333, 9333, 8080, 8888, 18333, 19333, 18080, 18888} & set(ports), "a SeaweedFS default port"
    assert all(listening(port) for port in ports)


def test_kill_then_restart_on_the_same_data_and_ports(
    own_seaweed: SeaweedServer,
) -> None:
    store = S3Store.from_url(f"s3://{BUCKET}/restart")
    data = os.urandom(5 * 1024 * 1024)  # more than the filer's 4 MiB: two volume chunks
    store.put("obj", data)
    pid, ports = own_seaweed.pid, own_seaweed.ports
    assert pid is not None

    own_seaweed.kill()
    assert own_seaweed.pid is None
    assert not listening(ports.s3)
    with pytest.raises(StoreError, match="cannot reach"):
        S3Store.from_url(f"s3://{BUCKET}/restart", options=S3Options(connect_timeout=1, max_attempts=1))

    own_seaweed.restart()
    assert own_seaweed.ports == ports and own_seaweed.pid not in (None, pid)
    again = S3Store.from_url(f"s3://{BUCKET}/restart")
    assert again.get("obj") == data
    # the master starts without its old state (-master.resumeState=false): new writes must not reuse the
    # file ids of the old objects
    news = {f"new/{i}": os.urandom(100_000 + i) for i in range(24)}
    for key, value in news.items():
        again.put(key, value)
    assert again.get("obj") == data
    assert all(again.get(key) == value for key, value in news.items())
    own_seaweed.stop(SESSION_STOP_GRACE)
    assert not listening(ports.s3)
    assert not [p for p in ports_sockets(ports.grpc_ports()) if p.exists()], "gRPC sockets left in /tmp"


def ports_sockets(ports: tuple[int, ...]) -> list[Path]:
    roles = ("master", "volume", "filer", "s3")
    return [Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock") for port in ports for role in roles]


@pytest.mark.timeout(180)
def test_replicated_set_up_serves_reads_without_one_volume_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replication 001 on two volume servers: every object is on both, so reads survive losing one; writes
    need both replicas, and fail in one line once the read timeout is spent."""
    server = SeaweedServer(tmp_path / "seaweed", replicated=True)
    try:
        server.start()
        server.apply_env(monkeypatch.setenv, monkeypatch.delenv)
        S3Store(BUCKET).create_bucket()
        options = S3Options(read_timeout=2, max_attempts=1)
        store = S3Store.from_url(f"s3://{BUCKET}/replicated", options=options)
        data = os.urandom(6 * 1024 * 1024)
        store.put("obj", data)
        first, second = tmp_path / "seaweed" / "data", tmp_path / "seaweed" / "data2"
        # both servers hold the same volumes (the master grows a volume on both: one may lag a moment)
        deadline = time.monotonic() + 15
        while _volume_files(first) != _volume_files(second) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _volume_files(first) and _volume_files(first) == _volume_files(second)

        server.kill_second_volume_server()
        assert store.get("obj") == data
        with pytest.raises(StoreError) as caught:
            store.put("after-the-loss", data)
        assert "\n" not in str(caught.value)
    finally:
        server.stop(SESSION_STOP_GRACE)


def _volume_files(directory: Path) -> set[str]:
    return {p.name for p in directory.glob(f"{BUCKET}_*.dat")}
