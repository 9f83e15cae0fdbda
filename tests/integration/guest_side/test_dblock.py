"""vmsnap-dblock against a real MariaDB: the lock lives from freeze to thaw, and never longer.

Every check of "nothing stays locked" is an INSERT that would fail with a lock-wait timeout if a global read
lock were still held; every check of "writers are blocked" waits for the server to report the writer waiting.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.guest_side.conftest import (
    BACKUP_PASSWORD,
    DBLOCK,
    DbLab,
    MariaDb,
    start_mariadb,
    write_option_file,
)
from vmsnap import processes
from vmsnap.processes import alive


def dblock(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``vmsnap-dblock`` as the hook would: a separate process."""
    return subprocess.run(
        [*DBLOCK, *args], capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL
    )


def freeze(option_file: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return dblock("freeze", "--config", str(option_file), "--run-dir", str(run_dir), *extra)


def thaw(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return dblock("thaw", "--run-dir", str(run_dir))


def holder_pid(run_dir: Path) -> int:
    return int((run_dir / "holder.pid").read_text())


def wait_until(condition: Any, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:g} s waiting for {what}")
        time.sleep(0.05)


def assert_not_locked(server: MariaDb, row_id: int) -> None:
    """An INSERT succeeds within a short lock wait: no global read lock is held."""
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION lock_wait_timeout = 3")
            cursor.execute("INSERT INTO shop.orders VALUES (%s, 'after')", (row_id,))
    finally:
        connection.close()
    assert server.query("SELECT id FROM shop.orders WHERE id = %s", (row_id,)) == [(row_id,)]


@contextlib.contextmanager
def orders_locked_for_write(server: MariaDb) -> Iterator[None]:
    """Another session holds ``LOCK TABLES shop.orders WRITE`` for the body (FLUSH TABLES WITH READ LOCK
    waits for it), then ``UNLOCK TABLES``."""
    blocker = server.connect()
    try:
        with blocker.cursor() as cursor:
            cursor.execute("LOCK TABLES shop.orders WRITE")
        yield
        with blocker.cursor() as cursor:
            cursor.execute("UNLOCK TABLES")
    finally:
        blocker.close()


class BlockedWriter:
    """An INSERT on its own session, in a thread, so the test can watch it wait for the lock."""

    def __init__(self, server: MariaDb, table: str, row_id: int) -> None:
        self.connection = server.connect()
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT CONNECTION_ID()")
            self.connection_id = int(cursor.fetchone()[0])
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._insert, args=(table, row_id), daemon=True)
        self.thread.start()

    def _insert(self, table: str, row_id: int) -> None:
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES (%s, 'blocked')", (row_id,))
        except BaseException as err:
            self.error = err

    def state(self, server: MariaDb) -> str:
        rows = server.query(
            "SELECT STATE FROM information_schema.PROCESSLIST WHERE ID = %s", (self.connection_id,)
        )
        return str(rows[0][0] or "") if rows else ""

    def finish(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the writer is still blocked"
        self.connection.close()
        if self.error is not None:
            raise self.error


def test_freeze_blocks_writers_not_readers_and_thaw_releases(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    mariadb.query("INSERT INTO shop.orders VALUES (1, 'before')")

    frozen = freeze(option_file, run_dir)
    assert frozen.returncode == 0, frozen.stderr
    assert "global read lock held" in frozen.stdout
    pid = holder_pid(run_dir)
    assert alive(pid)
    # the credentials are in the option file only: not in the holder's argv or environment
    assert BACKUP_PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert BACKUP_PASSWORD.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "holder.sock").stat().st_mode) == 0o600

    writer = BlockedWriter(mariadb, "shop.orders", 2)
    wait_until(lambda: "lock" in writer.state(mariadb).lower(), "the writer to wait for the read lock")
    assert mariadb.query("SELECT id, note FROM shop.orders") == [(1, "before")]  # readers still read
    status = dblock("status", "--run-dir", str(run_dir))
    assert status.returncode == 0 and f"by pid {pid}" in status.stdout
    assert writer.thread.is_alive()

    thawed = thaw(run_dir)
    assert thawed.returncode == 0, thawed.stderr
    assert "lock released after" in thawed.stdout
    writer.finish()
    assert mariadb.query("SELECT id FROM shop.orders ORDER BY id") == [(1,), (2,)]
    wait_until(lambda: not alive(pid), "the holder to exit after thaw")
    assert not (run_dir / "holder.sock").exists()
    assert thaw(run_dir).stdout.strip() == "vmsnap-dblock: nothing to thaw"


def test_holder_keeps_no_descriptor_of_whoever_ran_freeze(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    """A hook runner reading the hook's output until EOF must not wait for the holder (until thaw)."""
    read_end, write_end = os.pipe()
    try:
        frozen = subprocess.run(
            [*DBLOCK, "freeze", "--config", str(option_file), "--run-dir", str(run_dir)],
            pass_fds=(write_end,),
            stdout=write_end,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
        os.close(write_end)
        write_end = -1
        assert frozen.returncode == 0
        output = b""
        while True:
            ready, _, _ = select.select([read_end], [], [], 10)
            assert ready, "no EOF: the holder kept the freeze command's descriptor open"
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            output += chunk
        assert b"global read lock held" in output
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert thaw(run_dir).returncode == 0


def test_snapshot_taken_while_locked_starts_as_a_consistent_database(
    db_lab: DbLab, mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    """Writers hammer an InnoDB and a MyISAM table; a snapshot taken under the lock is clean and complete."""
    acknowledged: dict[str, list[int]] = {"orders": [], "ledger": []}
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(table: str) -> None:
        connection = mariadb.connect()
        try:
            with connection.cursor() as cursor:
                row_id = 0
                while not stop.is_set():
                    row_id += 1
                    cursor.execute(f"INSERT INTO shop.{table} VALUES (%s, REPEAT('x', 60))", (row_id,))
                    acknowledged[table].append(row_id)
        except BaseException as err:
            errors.append(err)
        finally:
            connection.close()

    writers = [threading.Thread(target=write, args=(t,), daemon=True) for t in acknowledged]
    for thread in writers:
        thread.start()
    wait_until(lambda: all(len(ids) >= 50 for ids in acknowledged.values()), "both writers to commit rows")
    before_freeze = {t: list(ids) for t, ids in acknowledged.items()}
    try:
        frozen = freeze(option_file, run_dir)
        assert frozen.returncode == 0, frozen.stderr
        snapshot = db_lab.snapshot_datadir("snap-locked")
        thawed = thaw(run_dir)
        assert thawed.returncode == 0, thawed.stderr
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=30)
    assert not errors, errors

    copy = start_mariadb(snapshot, db_lab.workdir / "run-snapshot")
    try:
        for table in ("orders", "ledger"):
            checks = copy.query(f"CHECK TABLE shop.{table} EXTENDED")
            assert [(row[2], row[3]) for row in checks] == [("status", "OK")], checks
            ids = {row[0] for row in copy.query(f"SELECT id FROM shop.{table}")}
            assert set(before_freeze[table]) <= ids, f"{table}: committed rows are missing"
            assert ids <= set(acknowledged[table]), f"{table}: rows nobody committed"
            assert ids == set(range(1, len(ids) + 1)), f"{table}: a gap in the rows"
    finally:
        copy.stop()


def test_holder_killed_while_locked_releases_the_lock(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    frozen = freeze(option_file, run_dir)
    assert frozen.returncode == 0, frozen.stderr
    pid = holder_pid(run_dir)
    writer = BlockedWriter(mariadb, "shop.orders", 1)
    wait_until(lambda: "lock" in writer.state(mariadb).lower(), "the writer to wait for the read lock")

    os.kill(pid, signal.SIGKILL)
    writer.finish()  # the server dropped the dead holder's session and its lock
    assert_not_locked(mariadb, 2)

    thawed = thaw(run_dir)
    assert thawed.returncode == 1
    assert f"the lock holder (pid {pid}) died before thaw" in thawed.stderr
    assert len(thawed.stderr.strip().splitlines()) == 1
    assert not (run_dir / "holder.sock").exists()


def test_lock_released_by_the_safety_timeout_when_thaw_never_comes(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    frozen = freeze(option_file, run_dir, "--safety-timeout", "4")
    assert frozen.returncode == 0, frozen.stderr
    pid = holder_pid(run_dir)
    writer = BlockedWriter(mariadb, "shop.orders", 1)
    wait_until(lambda: "lock" in writer.state(mariadb).lower(), "the writer to wait for the read lock")
    writer.finish()  # waits for the holder to give up the lock by itself
    wait_until(lambda: not alive(pid), "the holder to exit after its safety timeout")
    assert_not_locked(mariadb, 2)

    thawed = thaw(run_dir)
    assert thawed.returncode == 1
    assert "no thaw came within the safety timeout of 4 s" in thawed.stderr
    assert thaw(run_dir).returncode == 0  # reported once


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", "refused user vmsnap_backup"),
        ("server down", "cannot reach the database server"),
        ("world-readable", "accessible to group or others (mode 0644)"),
        ("group-readable", "accessible to group or others (mode 0640)"),
        ("no RELOAD privilege", "may not run FLUSH TABLES WITH READ LOCK"),
    ],
)
def test_bad_setup_fails_the_freeze_and_locks_nothing(
    mariadb: MariaDb, tmp_path: Path, run_dir: Path, case: str, expected: str
) -> None:
    path = tmp_path / "dblock.cnf"
    if case == "wrong password":
        write_option_file(path, mariadb, password="not-the-password")
    elif case == "server down":
        write_option_file(path, mariadb)
        path.write_text(path.read_text().replace(str(mariadb.socket), str(tmp_path / "no-server.sock")))
    elif case == "world-readable":
        write_option_file(path, mariadb, mode=0o644)
    elif case == "group-readable":
        write_option_file(path, mariadb, mode=0o640)
    else:
        mariadb.query("CREATE USER IF NOT EXISTS 'weak'@'localhost' IDENTIFIED BY 'weak-pass'")
        path.write_text(f"[client]\nuser=weak\npassword=weak-pass\nsocket={mariadb.socket}\n")
        path.chmod(0o600)

    frozen = freeze(path, run_dir)

    assert frozen.returncode == 1
    assert expected in frozen.stderr
    assert len(frozen.stderr.strip().splitlines()) == 1, frozen.stderr
    assert frozen.stderr.startswith("vmsnap-dblock: error: ")
    assert not (run_dir / "holder.sock").exists()
    assert not (run_dir / "holder.pid").exists()
    assert_not_locked(mariadb, 1)


def test_lock_not_granted_in_time_fails_the_freeze_and_locks_nothing(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    """A session in LOCK TABLES ... WRITE keeps FLUSH TABLES WITH READ LOCK waiting: lock-wait bounds it."""
    with orders_locked_for_write(mariadb):
        frozen = freeze(option_file, run_dir, "--lock-wait", "1")
    assert frozen.returncode == 1
    assert "did not grant the global read lock within 1 s" in frozen.stderr
    assert not (run_dir / "holder.pid").exists()
    assert_not_locked(mariadb, 1)


def test_lock_granted_after_freeze_was_killed_is_released_at_once(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    """The hook runner's timeout killed freeze while it waited: a lock granted later must not linger."""
    with orders_locked_for_write(mariadb):
        waiting = subprocess.Popen(
            [*DBLOCK, "freeze", "--config", str(option_file), "--run-dir", str(run_dir), "--lock-wait", "20"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: (run_dir / "holder.pid").exists(), "the holder to start")
            pid = holder_pid(run_dir)
            flush_waits = (
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'FLUSH TABLES%'"
            )
            wait_until(lambda: mariadb.query(flush_waits)[0][0] == 1, "FLUSH TABLES WITH READ LOCK to wait")
        finally:
            processes.stop_child(waiting, timeout=0)  # SIGKILL: what a hook runner's timeout does
    wait_until(lambda: not alive(pid), "the orphaned holder to give up its lock and exit")
    assert_not_locked(mariadb, 1)
    assert "freeze is gone before it heard that the lock is held" in (run_dir / "holder.log").read_text()


def test_second_freeze_while_locked_is_refused_and_keeps_the_first_lock(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    assert freeze(option_file, run_dir).returncode == 0
    pid = holder_pid(run_dir)
    again = freeze(option_file, run_dir)
    assert again.returncode == 1
    assert "a lock holder already runs" in again.stderr
    assert alive(pid)
    assert thaw(run_dir).returncode == 0
    assert_not_locked(mariadb, 1)


def test_classic_hook_loses_the_lock_when_its_client_exits(mariadb: MariaDb, option_file: Path) -> None:
    """Why the holder exists: `mysql -e "FLUSH TABLES WITH READ LOCK"` releases the lock as it exits."""
    classic = subprocess.run(
        ["mariadb", f"--defaults-extra-file={option_file}", "-e", "FLUSH TABLES WITH READ LOCK"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert classic.returncode == 0, classic.stderr
    assert_not_locked(mariadb, 1)  # the "frozen" database takes writes: the snapshot is not consistent


def test_session_killed_by_the_server_is_reported_at_thaw(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    """A DBA's KILL (or the server's wait_timeout) ends the lock early: thaw must not report success."""
    assert freeze(option_file, run_dir).returncode == 0
    status = dblock("status", "--run-dir", str(run_dir))
    connection_id = int(status.stdout.rsplit("connection ", 1)[1].rstrip(")\n"))
    mariadb.query(f"KILL {connection_id}")
    assert_not_locked(mariadb, 1)

    thawed = thaw(run_dir)
    assert thawed.returncode == 1
    assert "the database session holding the lock was lost before thaw" in thawed.stderr
    assert not (run_dir / "holder.sock").exists()


def test_holder_stopped_with_sigterm_releases_the_lock_and_thaw_reports_it(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    assert freeze(option_file, run_dir).returncode == 0
    pid = holder_pid(run_dir)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), "the holder to exit on SIGTERM")
    assert_not_locked(mariadb, 1)
    thawed = thaw(run_dir)
    assert thawed.returncode == 1
    assert "stopped (SIGTERM)" in thawed.stderr
