"""The key file of an encrypted chunks repository (vmsnap.repo.chunks.keys): creation (0600, never
overwritten), reading (refuses a key others may read, a malformed or foreign file), the subkeys recomputed
by hand from RFC 5869, and that key material never shows in a repr or an error."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pytest

from vmsnap.errors import KeyFileError
from vmsnap.repo.chunks.keys import RepositoryKey, create_key_file, read_key_file


def hkdf_by_hand(master: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF-SHA256 with no salt (a salt of 32 zero bytes), written out with hmac."""
    prk = hmac.digest(bytes(32), master, "sha256")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def master_of(path: Path) -> bytes:
    return base64.b64decode(json.loads(path.read_text())["key"])


def test_create_writes_a_private_json_key_file_and_reads_back_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "repo.key"
    key = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["vmsnap-key"] == 1 and len(base64.b64decode(document["key"])) == 32
    again = read_key_file(path, expected_key_id=key.key_id)
    assert again == key


def test_two_key_files_differ(tmp_path: Path) -> None:
    one, two = create_key_file(tmp_path / "a.key"), create_key_file(tmp_path / "b.key")
    assert master_of(tmp_path / "a.key") != master_of(tmp_path / "b.key")
    assert one.key_id != two.key_id and one.id_key != two.id_key


def test_subkeys_are_hkdf_sha256_of_the_master_key_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "repo.key"
    key = create_key_file(path)
    master = master_of(path)
    assert key.id_key == hkdf_by_hand(master, b"vmsnap chunk-id v1")
    assert key.encryption_key == hkdf_by_hand(master, b"vmsnap aes-256-gcm v1")
    assert key.mac_key == hkdf_by_hand(master, b"vmsnap metadata-mac v1")
    assert key.key_id == hkdf_by_hand(master, b"vmsnap key-id v1", 16).hex()
    assert len({key.id_key, key.encryption_key, key.mac_key, master}) == 4
    assert key.mac(b"index") == hmac.digest(key.mac_key, b"index", "sha256")
    assert key.check_mac(b"index", key.mac(b"index")) and not key.check_mac(b"index!", key.mac(b"index"))


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "repo.key"
    create_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="exists already"):
        create_key_file(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o400])
def test_a_key_file_others_may_read_is_refused_with_a_chmod_hint(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "repo.key"
    create_key_file(path)
    os.chmod(path, mode)
    if mode & 0o077 == 0:  # 0400: private (read-only) is fine
        read_key_file(path)
        return
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert "readable by others" in info.value.message and "chmod 600" in info.value.hint


def test_missing_directory_and_unwritable_paths(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        read_key_file(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="not a regular file"):
        os.mkdir(tmp_path / "dir.key", 0o700)
        read_key_file(tmp_path / "dir.key")
    with pytest.raises(KeyFileError, match="cannot create"):
        create_key_file(tmp_path / "no" / "such" / "dir.key")


def test_a_wrong_key_is_refused_by_its_key_id(tmp_path: Path) -> None:
    right = create_key_file(tmp_path / "right.key")
    create_key_file(tmp_path / "wrong.key")
    with pytest.raises(KeyFileError) as info:
        read_key_file(tmp_path / "wrong.key", expected_key_id=right.key_id)
    assert "not this repository's key" in info.value.message and "--key-file" in info.value.hint


def write_private(path: Path, content: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    return path


SECRET = base64.b64encode(b"S" * 32).decode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a vmsnap key file"),
        (b"\xff\xfe", "not a vmsnap key file"),
        (f'{{"vmsnap-key": 1, "key": "{SECRET}"'.encode(), "not a vmsnap key file"),  # truncated JSON
        (json.dumps([SECRET]).encode(), "not a vmsnap key file"),
        (json.dumps({"vmsnap-key": 1, "key": SECRET + "!"}).encode(), "not a vmsnap key file"),
        (json.dumps({"vmsnap-key": 2, "key": SECRET}).encode(), "version 2"),
        (json.dumps({"vmsnap-key": 1, "key": base64.b64encode(b"short").decode()}).encode(), "5 bytes"),
    ],
)
def test_malformed_key_files_fail_in_one_line_without_key_material(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = write_private(tmp_path / "repo.key", content)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert SECRET not in text and "SSSS" not in text
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


def test_repr_and_str_show_only_the_key_id(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "repo.key")
    master = master_of(tmp_path / "repo.key")
    for text in (repr(key), str(key), f"{key}"):
        assert key.key_id in text
        for secret in (master, key.id_key, key.encryption_key, key.mac_key):
            assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
            assert repr(secret) not in text


def test_from_master_checks_the_length() -> None:
    with pytest.raises(KeyFileError, match="31 bytes"):
        RepositoryKey.from_master(bytes(31))
    assert (
        RepositoryKey.from_master(hashlib.sha256(b"x").digest()).key_id
        == hkdf_by_hand(hashlib.sha256(b"x").digest(), b"vmsnap key-id v1", 16).hex()
    )
