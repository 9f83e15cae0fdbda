"""The option file: credentials only from a file its owner alone can read, in MySQL option-file syntax."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.guest_side.conftest import MariaDb
from tests.integration.guest_side.test_dblock import freeze, thaw
from vmsnap.errors import UsageError
from vmsnap.guest.dblock import DbLockError, HolderSettings, read_option_file


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def test_reads_client_then_own_group_with_mysql_spellings(tmp_path: Path) -> None:
    path = private_file(
        tmp_path / "my.cnf",
        "# comment\n[mysqld]\npassword=not-this\n[client]\nuser=backup\npassword='p=ss word'\n"
        "host=db.example\nport=3307\n!includedir /etc/mysql/conf.d/\n"
        '[vmsnap-dblock]\nsocket="/run/db.sock"\nsafety_timeout=90\nlock-wait=5\n',
    )
    options = read_option_file(path)
    assert options.connection.user == "backup"
    assert options.connection.password == "p=ss word"
    assert options.connection.socket == "/run/db.sock"
    assert (options.connection.host, options.connection.port) == ("db.example", 3307)
    assert (options.safety_timeout, options.lock_wait) == (90.0, 5.0)
    assert options.connection.where == "/run/db.sock"
    assert "p=ss word" not in repr(options)


def test_debian_maintenance_file_layout_works(tmp_path: Path) -> None:
    path = private_file(
        tmp_path / "debian.cnf",
        "# Automatically generated for Debian scripts. DO NOT TOUCH!\n[client]\nhost     = localhost\n"
        "user     = root\npassword = \nsocket   = /run/mysqld/mysqld.sock\n"
        "[mysql_upgrade]\nhost = localhost\n",
    )
    options = read_option_file(path)
    assert options.connection.user == "root"
    assert options.connection.socket == "/run/mysqld/mysqld.sock"
    assert options.safety_timeout is None


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("[client]\nuser=a\n", 0o604, "accessible to group or others (mode 0604)"),
        ("[client]\nuser=a\n", 0o620, "accessible to group or others (mode 0620)"),
        ("user=a\n", 0o600, "not in option-file syntax"),
        ("[client]\nport=http\n", 0o600, "port='http' is not a TCP port"),
        ("[vmsnap-dblock]\nsafety-timeout=soon\n", 0o600, "safety-timeout='soon' is not a number"),
        ("[vmsnap-dblock]\nlock-wait=inf\n", 0o600, "lock-wait='inf' is not a finite number"),
    ],
)
def test_bad_option_files_are_refused_with_one_line(
    tmp_path: Path, text: str, mode: int, expected: str
) -> None:
    path = tmp_path / "dblock.cnf"
    path.write_text(text)
    os.chmod(path, mode)
    with pytest.raises(DbLockError) as caught:
        read_option_file(path)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_foreign_and_non_file_option_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DbLockError, match="does not exist"):
        read_option_file(tmp_path / "absent.cnf")
    with pytest.raises(DbLockError, match="is not a regular file"):
        read_option_file(tmp_path)
    foreign = private_file(tmp_path / "foreign.cnf", "[client]\nuser=a\n")
    os.chown(foreign, 65534, 65534)
    with pytest.raises(DbLockError, match="belongs to uid 65534"):
        read_option_file(foreign)


def test_settings_are_validated() -> None:
    with pytest.raises(UsageError, match="safety timeout 0 s is out of range"):
        HolderSettings(safety_timeout=0)
    with pytest.raises(UsageError, match=r"lock wait 0\.5 s is out of range"):
        HolderSettings(lock_wait=0.5)


def test_safety_timeout_from_the_option_file_and_the_command_line_wins(
    mariadb: MariaDb, option_file: Path, run_dir: Path
) -> None:
    option_file.write_text(option_file.read_text() + "[vmsnap-dblock]\nsafety-timeout=45\n")
    frozen = freeze(option_file, run_dir)
    assert frozen.returncode == 0, frozen.stderr
    assert "released on thaw or after 45 s" in frozen.stdout
    assert thaw(run_dir).returncode == 0
    frozen = freeze(option_file, run_dir, "--safety-timeout", "50")
    assert "released on thaw or after 50 s" in frozen.stdout
    assert thaw(run_dir).returncode == 0
