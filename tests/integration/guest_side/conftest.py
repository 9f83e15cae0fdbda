"""A real MariaDB for the database-lock tests: mariadbd started by hand on a unix socket, no networking.

Its datadir is a Btrfs subvolume on a loop device, so a test can take an atomic snapshot of it (as a block
snapshot of a frozen guest would be) and start a second mariadbd on that snapshot. One server per session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmsnap import processes

try:
    import pymysql
except ImportError:  # a skip would hide that the database lock is untested
    pytest.fail("PyMySQL is missing: pip install -e '.[guest]'", pytrace=False)

BACKUP_USER = "vmsnap_backup"
BACKUP_PASSWORD = "s3cret-Only-In-The-0ption-File"
DBLOCK = [sys.executable, "-m", "vmsnap.guest.dblock"]


def _require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: apt-get install mariadb-server mariadb-client btrfs-progs "
            "(see scripts/packages.d/dblock.txt)"
        )


@attrs.define
class MariaDb:
    """A running mariadbd: its process, datadir and socket."""

    process: subprocess.Popen[bytes]
    datadir: Path
    socket: Path
    error_log: Path

    def connect(self, user: str = "root", password: str | None = None, **kwargs: Any) -> Any:
        """A new autocommit session (root authenticates without a password on the socket)."""
        extra: dict[str, Any] = {"password": password} if password is not None else {}
        return pymysql.connect(
            unix_socket=str(self.socket), user=user, autocommit=True, read_timeout=30, **extra, **kwargs
        )

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement as root on a fresh session and return its rows."""
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it does not exit within 30 s; reaped."""
        processes.terminate(self.process.pid, timeout=30)
        self.process.wait()


def start_mariadb(datadir: Path, rundir: Path) -> MariaDb:
    """Start mariadbd on ``datadir``, socket, pid file and error log in ``rundir``; wait until it answers."""
    rundir.mkdir(parents=True, exist_ok=True)
    socket_path = rundir / "mysqld.sock"
    error_log = rundir / "error.log"
    process = subprocess.Popen(
        [
            "mariadbd",
            "--no-defaults",
            f"--datadir={datadir}",
            f"--socket={socket_path}",
            f"--pid-file={rundir / 'mysqld.pid'}",
            f"--log-error={error_log}",
            "--skip-networking",
            "--user=root",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=4M",
            "--innodb-flush-log-at-trx-commit=1",
            "--skip-name-resolve",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = MariaDb(process, datadir, socket_path, error_log)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            log = error_log.read_text(errors="replace") if error_log.exists() else ""
            pytest.fail(f"mariadbd on {datadir} exited with {process.returncode}:\n{log[-3000:]}")
        with contextlib.suppress(pymysql.MySQLError):
            server.connect().close()
            return server
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"mariadbd on {datadir} did not accept connections within 60 s")
        time.sleep(0.05)


@attrs.define
class DbLab:
    """The session's server plus the Btrfs volume its datadir lives on."""

    server: MariaDb
    mountpoint: Path
    workdir: Path

    def snapshot_datadir(self, name: str) -> Path:
        """An atomic, writable Btrfs snapshot of the live datadir (like a block snapshot of a frozen disk)."""
        target = self.mountpoint / name
        subprocess.run(
            ["btrfs", "subvolume", "snapshot", str(self.server.datadir), str(target)],
            check=True,
            capture_output=True,
        )
        return target


@pytest.fixture(scope="session")
def db_lab() -> Iterator[DbLab]:
    """mariadbd on a Btrfs loop volume, with database ``shop`` and a password user holding RELOAD."""
    _require("mariadbd", "mariadb-install-db", "mariadb", "mkfs.btrfs", "btrfs", "losetup")
    workdir = Path(tempfile.mkdtemp(prefix="dblock-db-", dir="/tmp"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        image = workdir / "btrfs.img"
        with image.open("wb") as handle:
            handle.truncate(256 * 1024 * 1024)
        loop = subprocess.run(
            ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        cleanup.callback(subprocess.run, ["losetup", "-d", loop], check=False)
        subprocess.run(["mkfs.btrfs", "-q", "-f", loop], check=True, capture_output=True)
        mountpoint = workdir / "mnt"
        mountpoint.mkdir()
        subprocess.run(["mount", loop, str(mountpoint)], check=True, capture_output=True)
        cleanup.callback(subprocess.run, ["umount", "-l", str(mountpoint)], check=False)
        datadir = mountpoint / "data"
        subprocess.run(["btrfs", "subvolume", "create", str(datadir)], check=True, capture_output=True)
        install = subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                "--innodb-log-file-size=4M",
                "--innodb-buffer-pool-size=16M",
            ],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            pytest.fail(f"mariadb-install-db failed: {install.stdout[-2000:]}{install.stderr[-2000:]}")
        server = start_mariadb(datadir, workdir / "run")
        cleanup.callback(server.stop)
        for sql in (
            f"CREATE USER '{BACKUP_USER}'@'localhost' IDENTIFIED BY '{BACKUP_PASSWORD}'",
            f"GRANT RELOAD ON *.* TO '{BACKUP_USER}'@'localhost'",
            "CREATE DATABASE shop",
            "CREATE TABLE shop.orders (id INT PRIMARY KEY, note VARCHAR(64)) ENGINE=InnoDB",
            "CREATE TABLE shop.ledger (id INT PRIMARY KEY, note VARCHAR(64), KEY (note)) ENGINE=MyISAM",
        ):
            server.query(sql)
        yield DbLab(server, mountpoint, workdir)


@pytest.fixture
def mariadb(db_lab: DbLab) -> MariaDb:
    """The session's server, with shop.orders and shop.ledger emptied for this test."""
    db_lab.server.query("DELETE FROM shop.orders")
    db_lab.server.query("DELETE FROM shop.ledger")
    return db_lab.server


def write_option_file(
    path: Path, server: MariaDb, *, password: str = BACKUP_PASSWORD, mode: int = 0o600
) -> Path:
    """A MySQL option file for the backup user, with ``mode``."""
    path.write_text(
        f'# test credentials\n[client]\nuser={BACKUP_USER}\npassword="{password}"\nsocket={server.socket}\n'
    )
    os.chmod(path, mode)
    return path


@pytest.fixture
def option_file(tmp_path: Path, mariadb: MariaDb) -> Path:
    """A correct 0600 option file for the backup user."""
    return write_option_file(tmp_path / "dblock.cnf", mariadb)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short private run directory for one holder; kills a holder a failed test left behind."""
    path = Path(tempfile.mkdtemp(prefix="dblock-run-", dir="/tmp"))
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError):
            processes.terminate(int((path / "holder.pid").read_text()), timeout=0)  # SIGKILL, by pid
        shutil.rmtree(path, ignore_errors=True)
