"""A store in a local directory: one file per object, written durably (temp file, fsync, rename or link, fsync
of the directory), files 0600 and directories 0700.

Object ``a/b/c`` is the file ``ROOT/a/b/c``; a directory left empty by a delete is removed. Temporary files
are ``.tmp-…`` next to their target; key parts never start with a dot
(:func:`~vmsnap.repo.stores.base.check_key`), so a temporary file can never be listed or read as an object,
and one left by a crash is only wasted space (``list`` skips it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs

from vmsnap.errors import NotFoundError, StoreError
from vmsnap.repo.stores.base import StoredObject, check_key, check_prefix

FILE_MODE = 0o600
DIR_MODE = 0o700
_TEMP_PREFIX = ".tmp-"

_HINTS = {
    errno.ENOSPC: "the filesystem is full: free space there or move the repository; nothing partial was kept",
    errno.EDQUOT: "the disk quota is exhausted: raise it or free space; nothing partial was kept",
    errno.EACCES: "permission denied: run vmsnap as the repository's owner or fix its permissions",
    errno.EPERM: "operation not permitted: run vmsnap as the repository's owner or fix its permissions",
    errno.EROFS: "the filesystem is read-only: remount it read-write or use another repository",
}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


@attrs.define
class LocalStore:
    """Objects as files under ``root`` (see :class:`~vmsnap.repo.stores.base.Store` for the guarantees).

    :param root: the store's directory
    :param create: make ``root`` (0700, and missing parents) when it does not exist
    :raise StoreError: ``root`` is missing (without ``create``), not a directory, or cannot be made
    """

    root: Path = attrs.field(converter=_absolute)
    create: bool = attrs.field(default=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.create and not self.root.exists():
            try:
                self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            except OSError as err:
                raise self._error("cannot create the store directory", self.root, err) from err
        if not self.root.is_dir():
            raise StoreError(
                f"store {self.url}: no such directory",
                hint="check the repository path (a new repository is created by `vmsnap init`)",
            )

    @property
    def url(self) -> str:
        """The store's absolute path."""
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _error(self, what: str, path: Path, err: OSError) -> StoreError:
        hint = _HINTS.get(err.errno or 0, "check the filesystem and its permissions")
        return StoreError(f"store {self.url}: {what} {path}: {err.strerror or err}", hint=hint)

    # ------------------------------------------------------------------------------------------------ read

    def get(self, key: str) -> bytes:
        """The object's bytes.

        :raise UsageError: ``key`` is malformed
        :raise NotFoundError: no object has that key
        :raise StoreError: the file cannot be read
        """
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            raise NotFoundError(f"store {self.url} has no object {key}") from err
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise NotFoundError(f"store {self.url} has no object {key} (a symlink is there)") from err
            raise self._error("cannot open", path, err) from err
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotFoundError(f"store {self.url} has no object {key} (not a regular file)")
            chunks: list[bytes] = []
            remaining = info.st_size
            while True:
                piece = os.read(fd, max(remaining, 1 << 16))
                if not piece:
                    break
                chunks.append(piece)
                remaining -= len(piece)
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]
        except OSError as err:
            raise self._error("cannot read", path, err) from err
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        """True when an object (a regular file) has that key.

        :raise UsageError: ``key`` is malformed
        """
        try:
            return stat.S_ISREG(os.lstat(self._path(key)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as err:
            raise self._error("cannot look at", self._path(key), err) from err

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix`` (never a temporary file), in no promised order.

        :raise UsageError: ``prefix`` is malformed
        :raise StoreError: a directory cannot be read
        """
        check_prefix(prefix)
        start = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        yield from self._walk(start, prefix)

    def _walk(self, directory: str, prefix: str) -> Iterator[StoredObject]:
        path = self.root / directory if directory else self.root
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return  # gone meanwhile, or never there
        except OSError as err:
            raise self._error("cannot list", path, err) from err
        for entry in entries:
            if entry.name.startswith("."):
                continue  # temporary files (and nothing a key can name)
            key = f"{directory}/{entry.name}" if directory else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        yield from self._walk(key, prefix)
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    yield StoredObject(key, entry.stat(follow_symlinks=False).st_size)
            except FileNotFoundError:
                continue  # deleted while listing

    # ----------------------------------------------------------------------------------------------- write

    def _make_parents(self, key: str) -> Path:
        """Make the directories above ``key`` (0700), fsyncing each new one's parent; return the last."""
        directory = self.root
        for part in key.split("/")[:-1]:
            child = directory / part
            try:
                os.mkdir(child, DIR_MODE)
                _fsync_dir(directory)
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise  # a delete removed the directory above meanwhile: the caller tries again
            except OSError as err:
                raise self._error("cannot create directory", child, err) from err
            directory = child
        return directory

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store ``data`` under ``key`` atomically and durably; with ``if_absent`` only when it is new.

        :return: True when written, False when ``if_absent`` found an object there (nothing written)
        :raise UsageError: ``key`` is malformed
        :raise StoreError: the filesystem refused (full, quota, permissions, read-only); nothing partial stays
        """
        path = self._path(key)
        if if_absent and self.exists(key):
            return False
        for attempt in range(3):
            directory = path.parent
            temp = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                directory = self._make_parents(key)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
                break
            except FileNotFoundError as err:  # a delete removed the (empty) directory meanwhile: again
                if attempt == 2:
                    raise self._error("cannot create a file in", directory, err) from err
            except OSError as err:
                raise self._error("cannot create a file in", directory, err) from err
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if if_absent:
                try:
                    os.link(temp, path)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(temp)
            else:
                os.replace(temp, path)
            _fsync_dir(directory)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise self._error("cannot write", path, err) from err
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return True

    def delete(self, key: str) -> None:
        """Remove the object (durably); a missing one is no error.

        :raise UsageError: ``key`` is malformed
        :raise StoreError: the filesystem refused
        """
        path = self._path(key)
        try:
            os.unlink(path)
            _fsync_dir(path.parent)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return  # nothing there, or a directory (no object)
        except OSError as err:
            raise self._error("cannot delete", path, err) from err
        self._remove_empty_parents(path.parent)

    def _remove_empty_parents(self, directory: Path) -> None:
        """Remove directories left empty by a delete, up to the root (a put that meets a directory removed
        under it makes it again)."""
        while directory != self.root and self.root in directory.parents:
            try:
                os.rmdir(directory)
            except OSError:
                return  # not empty (or gone): stop
            with contextlib.suppress(OSError):
                _fsync_dir(directory.parent)
            directory = directory.parent
