"""Instant restore of a libvirt domain: a new domain defined from the backup's saved ``domain.xml`` on the
images :func:`vmsnap.restore.instant.prepare` made, started, and its disks copied with libvirt's own block
pull.

libvirt's ``virDomainBlockPull`` is QEMU's ``block-stream``, run and watched by libvirtd: libvirt knows the
job and rewrites the domain's backing chain when it ends, and the job goes on when vmsnap dies. Running
:func:`stream_domain` again resumes (it waits for a running pull, changing its speed, or starts a new one
for a disk that still has its backup as backing store).
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vmsnap.errors import BlockJobError, LibvirtError, NotFoundError, UsageError
from vmsnap.restore.instant import (
    InstantRestore,
    StreamProgress,
    StreamResult,
    _no_progress,
    finish,
    mark_streaming,
    read_restore,
)
from vmsnap.vm.machine_state import MachineState


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as err:  # pragma: no cover - depends on the host
        raise LibvirtError(
            "the libvirt Python binding is not installed", hint="install python3-libvirt (Debian)"
        ) from err
    return libvirt


def start_domain(
    restore: InstantRestore,
    xml: str,
    *,
    name: str,
    uri: str | None = None,
    state: MachineState | None = None,
) -> str:
    """Define domain ``name`` from a saved definition on the prepared images and start it. Repeating it is
    the resume: a domain ``name`` that already runs on exactly these images is left as it is (started if
    it is shut off).

    The disks are matched by target (``vda``, ``sdb`` …): name the instant restore's disks after them.

    :param xml: the domain definition saved with the backup
    :param state: the machine state kept with it: its UEFI variables (into ``TO/<name>_VARS.fd``) and TPM
        state are put back
    :raise UsageError: another domain called ``name`` exists, or a disk of the definition has no image
    :raise LibvirtError: libvirt refused to define or start it (a definition made here is removed again)
    """
    from vmsnap.vm.libvirt.definition import define_restored_domain
    from vmsnap.vm.libvirt.machine import libvirt_message, open_connection

    libvirt = _libvirt()
    conn = open_connection(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            dom = None
        if dom is not None and _runs_on(dom, restore.images):
            if not dom.isActive():
                dom.create()
            return name
        define_restored_domain(  # refuses an existing name
            uri, xml, name=name, images=restore.images, state=state, nvram_dir=restore.to
        )
        dom = conn.lookupByName(name)
        try:
            dom.create()
        except libvirt.libvirtError as err:
            dom.undefine()
            raise LibvirtError(f"libvirt could not start {name!r}: {libvirt_message(err)}") from err
    finally:
        conn.close()
    return name


def check_domain_name(name: str, images: dict[str, Path], *, uri: str | None = None) -> None:
    """Refuse ``name`` before anything is prepared when another domain has it: a domain of that name may
    exist only when it runs on exactly ``images`` (this restore, repeated).

    :raise UsageError: ``name`` is not a valid name, or another domain has it
    :raise LibvirtError: libvirtd cannot be reached
    """
    from vmsnap.model import validate_name
    from vmsnap.vm.libvirt.machine import open_connection

    validate_name(name, "domain name")
    libvirt = _libvirt()
    conn = open_connection(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        if not _runs_on(dom, images):
            raise UsageError(f"a libvirt domain {name!r} exists already", hint="choose another --define name")
    finally:
        conn.close()


def _runs_on(dom: Any, images: dict[str, Path]) -> bool:
    """True when the domain's disks are exactly ``images`` (target → image)."""
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirtd's own XML
    found = {}
    for disk in root.findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            found[target.get("dev", "")] = os.path.realpath(source.get("file", ""))
    return found == {name: os.path.realpath(path) for name, path in images.items()}


def _disk_element(dom: Any, target: str) -> ET.Element | None:
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirtd's own XML
    for disk in root.findall("devices/disk"):
        node = disk.find("target")
        if node is not None and node.get("dev") == target:
            return disk
    return None


def _has_backing(disk: ET.Element) -> bool:
    backing = disk.find("backingStore")
    return backing is not None and backing.find("source") is not None


def stream_domain(
    to: Path,
    *,
    name: str,
    uri: str | None = None,
    speed: int = 0,
    timeout: float = 24 * 3600.0,
    poll: float = 0.2,
    progress: StreamProgress = _no_progress,
) -> StreamResult:
    """Pull every disk of a running domain's instant restore into its image, then stop the servers.

    :param to: the restore's directory
    :param name: the domain running on its images
    :param speed: bytes per second per disk (0: unlimited)
    :raise NotFoundError: no such restore, no such running domain, or it does not run on the images
    :raise BlockJobError: a pull failed or did not finish within ``timeout`` (run again to retry)
    """
    from vmsnap.vm.libvirt.machine import libvirt_message, open_connection

    if speed < 0:
        raise UsageError(f"speed {speed} is negative")
    libvirt = _libvirt()
    to = Path(os.path.realpath(to))
    state = read_restore(to)
    started = time.monotonic()
    conn = open_connection(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as err:
            raise NotFoundError(f"no libvirt domain {name!r}: {libvirt_message(err)}") from err
        if not dom.isActive():
            raise NotFoundError(
                f"domain {name!r} is not running", hint="start it (virsh start), then run again"
            )
        bytes_flag = libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES
        waiting, done = [], []
        for target, disk in state["disks"].items():
            element = _disk_element(dom, target)
            source = element.find("source") if element is not None else None
            if element is None or source is None or os.path.realpath(source.get("file", "")) != disk["image"]:
                raise NotFoundError(f"domain {name!r} does not run on {disk['image']} as {target}")
            if dom.blockJobInfo(target, 0):
                dom.blockJobSetSpeed(target, speed, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
                waiting.append(target)
            elif _has_backing(element):
                try:
                    dom.blockPull(target, speed, bytes_flag)
                except libvirt.libvirtError as err:
                    raise BlockJobError(target, f"libvirt refused the pull: {libvirt_message(err)}") from err
                waiting.append(target)
            else:
                done.append(target)
        mark_streaming(to, state)
        deadline = time.monotonic() + timeout
        for target in waiting:
            while info := dom.blockJobInfo(target, 0):
                progress(target, int(info.get("cur", 0)), int(info.get("end", 0)))
                if time.monotonic() > deadline:
                    dom.blockJobAbort(target, 0)
                    raise BlockJobError(target, f"the pull did not finish within {timeout:g} s; cancelled")
                time.sleep(poll)
            element = _disk_element(dom, target)
            if element is None or _has_backing(element):
                raise BlockJobError(
                    target, "the pull ended but the disk still reads from the backup", hint="run again"
                )
    finally:
        conn.close()
    with contextlib.suppress(NotFoundError):  # `vmsnap recover` may have finished it meanwhile
        finish(to)
    return StreamResult(tuple(waiting), tuple(done), time.monotonic() - started)
