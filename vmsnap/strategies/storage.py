"""Where a disk lives: the mount table, paths resolved where a runner runs, and what the storage strategies
(btrfs, lvm) share besides their skeleton (:mod:`vmsnap.strategies.volume_snapshots`).

Every look-up runs through a :class:`~vmsnap.runner.Runner`, so it works on this host, over SSH, and inside a
guest (busybox is enough). The Btrfs and LVM programs have their own wrappers: :mod:`.btrfs_tool`,
:mod:`.lvm_tool`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import PurePath, PurePosixPath

from vmsnap.errors import NotFoundError, VmsnapError
from vmsnap.mounts import Mount, parse_mountinfo
from vmsnap.runner import CommandResult, Runner


class StorageScopeWarning(UserWarning):
    """A storage snapshot holds (and a rollback turns back) more than this VM's disks: other files, VMs."""


class StorageNoteWarning(UserWarning):
    """Something about a storage snapshot the user should act on (a deferred merge, a leftover to remove)."""


def stat_paths(
    runner: Runner,
    fmt: str,
    paths: Sequence[PurePath | str],
    *,
    dereference: bool = False,
    filesystem: bool = False,
    ok_codes: Collection[int] = (0,),
) -> CommandResult:
    """``stat -c FORMAT -- PATHS…`` where ``runner`` runs (one call for many paths; GNU and busybox alike).

    :param dereference: ``-L``: follow a symbolic link
    :param filesystem: ``-f``: the filesystem's status instead of the file's
    :param ok_codes: exit codes to accept (1: some of the paths do not exist)
    :raise CommandError: ``stat`` exited with another code
    """
    flags = [*(["-L"] if dereference else []), *(["-f"] if filesystem else [])]
    argv = ["stat", *flags, "-c", fmt, "--", *map(str, paths)]
    return runner.run(argv, ok_codes=ok_codes, timeout=120)


def existing_paths(runner: Runner, paths: Sequence[PurePath | str]) -> set[str]:
    """Which of ``paths`` exist where ``runner`` runs (one ``stat`` call)."""
    if not paths:
        return set()
    return set(stat_paths(runner, "%n", paths, ok_codes=(0, 1)).stdout.splitlines())


def resolve_path(runner: Runner, path: PurePath | str) -> PurePosixPath:
    """The canonical absolute path of ``path`` where ``runner`` runs (``readlink -f``).

    :raise NotFoundError: the path does not exist there
    """
    result = runner.run(["readlink", "-f", "--", str(path)], ok_codes=(0, 1), timeout=60)
    resolved = result.stdout.strip()
    if result.exit_code != 0 or not resolved:
        raise NotFoundError(f"{path} does not exist on {runner.host}", hint="check the disk's path")
    probe = runner.run(["test", "-e", resolved], ok_codes=(0, 1), timeout=60)
    if probe.exit_code != 0:
        raise NotFoundError(f"{path} does not exist on {runner.host}", hint="check the disk's path")
    return PurePosixPath(resolved)


def mount_of_path(path: PurePosixPath, mounts: Sequence[Mount]) -> Mount:
    """The mount holding ``path`` (absolute, resolved): the longest mount-point prefix; the last one wins."""
    best: Mount | None = None
    for mount in mounts:
        holds = path == mount.mount_point or mount.mount_point in path.parents
        if holds and (best is None or len(mount.mount_point.parts) >= len(best.mount_point.parts)):
            best = mount
    if best is None:
        raise NotFoundError(f"no mount holds {path}", hint="is /proc mounted?")
    return best


def mount_of(runner: Runner, path: PurePath | str) -> tuple[PurePosixPath, Mount]:
    """Resolve ``path`` and find the mount that holds it, where ``runner`` runs.

    :return: (resolved path, its mount)
    :raise NotFoundError: the path does not exist
    """
    resolved = resolve_path(runner, path)
    text = runner.run(["cat", "/proc/self/mountinfo"], timeout=60).stdout
    return resolved, mount_of_path(resolved, parse_mountinfo(text))


@contextlib.contextmanager
def mounted_read_only(
    runner: Runner, device: str, *, base: str, prefix: str, options: str = "ro"
) -> Iterator[PurePosixPath]:
    """Mount ``device`` (``mount -o OPTIONS``) on a new directory in ``base`` for the body of the ``with``;
    unmount it and remove the directory afterwards, also when the body raised (quietly: the body's outcome
    counts).

    :param prefix: the start of the directory's name (``mktemp -d -p BASE PREFIX.XXXXXX``)
    :param options: mount options; they must include ``ro``
    :raise CommandError: the directory or the mount could not be made (the directory is removed again)
    """
    directory = runner.run(["mktemp", "-d", "-p", base, f"{prefix}.XXXXXX"], timeout=60).stdout.strip()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(quietly, runner, ["rmdir", directory], timeout=60)
        runner.run(["mount", "-o", options, device, directory], timeout=600)
        cleanup.callback(quietly, runner, ["umount", directory], timeout=600)
        yield PurePosixPath(directory)


def quietly(runner: Runner, argv: Sequence[str], *, timeout: float = 600) -> None:
    """Run a clean-up command whose failure must not hide what happened before (a failed create, an export
    that raised): its :class:`~vmsnap.errors.VmsnapError` is swallowed."""
    with contextlib.suppress(VmsnapError):
        runner.run(argv, timeout=timeout)
