"""The local state of repositories whose store may be remote (layout ``chunks``): per repository a private
directory on this host for what must not live in the store — the journals of running backups, the work
directories strategies write fleecing files into, and the cache of known chunk ids.

``$VMSNAP_STATE_DIR`` (default ``/var/lib/vmsnap``)::

    repos/<repository id>/vms/<vm>/journal.json      the journal of the VM's running backup
    repos/<repository id>/work/<vm>/<backup-id>/      a backup's work directory (fleecing files)
    repos/<repository id>/known-chunks               the known-chunks cache (see vmsnap.repo.chunks.known)

Directories are 0700, files 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmsnap.files import make_private_dir
from vmsnap.model import validate_name

STATE_ENV = "VMSNAP_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/vmsnap")


def state_root(environ: dict[str, str] | None = None) -> Path:
    """``$VMSNAP_STATE_DIR``, or ``/var/lib/vmsnap``."""
    env = os.environ if environ is None else environ
    value = env.get(STATE_ENV)
    return Path(value) if value else DEFAULT_STATE_DIR


class RepositoryState:
    """The local state directory of one repository (see the module docstring); made on first use.

    :param repo_id: the repository's id (from its marker)
    :param root: the state root (default: :func:`state_root`)
    """

    def __init__(self, repo_id: str, root: Path | None = None) -> None:
        self.directory = (root if root is not None else state_root()) / "repos" / validate_name(repo_id)

    def vm_dir(self, vm: str) -> Path:
        """``…/vms/<vm>`` (made, 0700)."""
        return make_private_dir(self.directory / "vms" / validate_name(vm, "VM name"))

    def journal_path(self, vm: str) -> Path:
        """Where the journal of a backup of ``vm`` is kept."""
        return self.vm_dir(vm) / "journal.json"

    def work_dir(self, vm: str, backup_id: str) -> Path:
        """``…/work/<vm>/<backup-id>`` (not made)."""
        return self.directory / "work" / validate_name(vm, "VM name") / validate_name(backup_id, "backup id")

    def work_dirs(self, vm: str) -> list[Path]:
        """Work directories of ``vm`` that exist (a dead run's are left behind)."""
        parent = self.directory / "work" / validate_name(vm, "VM name")
        return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []

    @property
    def known_chunks(self) -> Path:
        """The known-chunks cache file (its directory is made)."""
        return make_private_dir(self.directory) / "known-chunks"
