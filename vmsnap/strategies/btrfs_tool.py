"""The one wrapper of the ``btrfs`` program (:class:`Btrfs`), and where a file lives on Btrfs.

Every ``btrfs`` command vmsnap runs is built here; all run through a :class:`~vmsnap.runner.Runner`.
"""

from __future__ import annotations

from pathlib import PurePath, PurePosixPath

import attrs

from vmsnap.errors import UnsupportedError
from vmsnap.mounts import Mount
from vmsnap.runner import Runner
from vmsnap.strategies.storage import mount_of, stat_paths

#: the inode number of every Btrfs subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID)
BTRFS_SUBVOLUME_ROOT_INODE = 256


@attrs.frozen
class BtrfsLocation:
    """A file inside a Btrfs subvolume.

    :param file: the file's resolved path
    :param subvolume: the root directory of the subvolume that holds it
    :param mount: the Btrfs mount the subvolume is visible through
    """

    file: PurePosixPath
    subvolume: PurePosixPath
    mount: Mount

    @property
    def relative(self) -> PurePosixPath:
        """The file's path inside its subvolume."""
        return self.file.relative_to(self.subvolume)

    @property
    def subvolume_in_mount(self) -> PurePosixPath:
        """The subvolume's path below the mount point ("." when it is the mounted subvolume itself)."""
        return self.subvolume.relative_to(self.mount.mount_point)


def btrfs_location(runner: Runner, path: PurePath | str) -> BtrfsLocation:
    """Find the Btrfs subvolume that holds ``path``.

    The subvolume root is the nearest ancestor directory whose inode number is 256; one ``stat`` call
    covers every ancestor up to the mount point.

    :raise NotFoundError: the path does not exist
    :raise UnsupportedError: the path is not on Btrfs (the message names the filesystem found)
    """
    resolved, mount = mount_of(runner, path)
    if mount.fstype != "btrfs":
        raise UnsupportedError(
            f"{path} is on {mount.fstype} ({mount.source} mounted at {mount.mount_point}), not on Btrfs",
            hint="the btrfs strategy needs the disk image in a Btrfs subvolume; pick another strategy",
        )
    ancestors = [resolved.parent]
    while ancestors[-1] != mount.mount_point and ancestors[-1] != ancestors[-1].parent:
        ancestors.append(ancestors[-1].parent)
    inodes = stat_paths(runner, "%i", ancestors).stdout.split()
    for directory, inode in zip(ancestors, inodes, strict=True):
        if int(inode) == BTRFS_SUBVOLUME_ROOT_INODE:
            return BtrfsLocation(resolved, directory, mount)
    # the mount point of a Btrfs filesystem is always some subvolume's root
    return BtrfsLocation(resolved, mount.mount_point, mount)


def is_btrfs_subvolume(runner: Runner, path: PurePath | str) -> bool:
    """True when ``path`` is the root directory of a Btrfs subvolume (or snapshot)."""
    result = stat_paths(runner, "%T", [path], filesystem=True, ok_codes=(0, 1))
    if result.exit_code != 0 or result.stdout.strip() != "btrfs":
        return False
    return stat_paths(runner, "%i", [path]).stdout.strip() == str(BTRFS_SUBVOLUME_ROOT_INODE)


@attrs.frozen
class Btrfs:
    """``btrfs subvolume …`` where ``runner`` runs.

    :raise CommandError: from every method, when ``btrfs`` fails (its message is in the error)
    :raise CommandTimeoutError: from every method, when it runs past its timeout
    """

    runner: Runner

    def _subvolume(self, *args: str, timeout: float = 600) -> str:
        return self.runner.run(["btrfs", "subvolume", *args], timeout=timeout).stdout

    def snapshot(self, source: PurePath, target: PurePath, *, read_only: bool) -> None:
        """Snapshot subvolume ``source`` as ``target`` (a new path), read-only or writable."""
        self._subvolume("snapshot", *(["-r"] if read_only else []), "--", str(source), str(target))

    def delete(self, subvolume: PurePath, *, commit: bool = False) -> None:
        """Delete a subvolume; ``commit``: wait until the deletion is committed (``-c``)."""
        self._subvolume("delete", *(["-c"] if commit else []), "--", str(subvolume))

    def nested(self, subvolume: PurePath) -> list[str]:
        """The paths of the subvolumes below ``subvolume`` (``btrfs subvolume list -o``), as btrfs prints
        them (relative to the filesystem's top)."""
        listing = self._subvolume("list", "-o", "--", str(subvolume), timeout=120)
        return [line.split()[-1] for line in listing.splitlines() if line.strip()]
