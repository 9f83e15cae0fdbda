"""Install vmsnap's guest-side fsfreeze hooks into a root directory (``/`` inside a guest, or an image tree).

Writes the dispatcher that qemu-ga runs (``/etc/qemu/fsfreeze-hook``) and vmsnap's hook scripts in
``/etc/qemu/fsfreeze-hook.d/``, atomically, with the modes qemu-ga and the dispatcher expect.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import attrs

from vmsnap.errors import UsageError, VmsnapError
from vmsnap.guest import hook
from vmsnap.guest.hook import write_atomically

HOOK_DIR = Path(hook.HOOK_DIR)
DISPATCHER = Path(hook.HOOK_PATH)


@attrs.frozen
class InstalledFile:
    """One file ``install_hooks`` wrote.

    :param path: where, under the root
    :param mode: its permission bits
    :param source: the package resource it came from
    """

    path: Path
    mode: int
    source: str


# (package resource under vmsnap/guest, destination relative to the root, mode)
_FILES: tuple[tuple[str, Path, int], ...] = (
    ("fsfreeze-hook.sh", DISPATCHER, 0o755),
    ("hooks/50-vmsnap-dblock", HOOK_DIR / "50-vmsnap-dblock", 0o755),
)


def install_hooks(root: Path) -> tuple[InstalledFile, ...]:
    """Write the fsfreeze-hook dispatcher and vmsnap's hook scripts under ``root``.

    Existing files of the same name are replaced (an upgrade); other scripts in the hook directory are left
    alone. The database lock hook does nothing until its option file exists (see ``vmsnap-dblock``).

    :param root: the guest's root directory (``/`` when run inside the guest)
    :raise UsageError: ``root`` is not an existing directory
    :raise VmsnapError: a file could not be written (the message names it)
    """
    if not root.is_dir():
        raise UsageError(
            f"install root {root} is not a directory", hint="give the guest's / or a mounted tree"
        )
    package = resources.files("vmsnap.guest")
    installed: list[InstalledFile] = []
    for resource, relative, mode in _FILES:
        source = package.joinpath(resource)
        if not source.is_file():
            raise VmsnapError(
                f"vmsnap's package data {resource} is missing", hint="reinstall vmsnap (pip install vmsnap)"
            )
        target = root / relative
        try:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_atomically(target, source.read_bytes(), mode)
        except OSError as err:
            raise VmsnapError(
                f"cannot write {target}: {err.strerror}", hint="run as root, or choose another --root"
            ) from err
        installed.append(InstalledFile(path=target, mode=mode, source=resource))
    return tuple(installed)
