"""Where a backup disk's bytes come from, as values: an image file QEMU opens itself (a qcow2 chain, a raw
file) or a block reader built from an import string inside nbdkit's Python plugin (the ``chunks`` layout).

These are what a repository layout answers when a restore asks for a disk it can serve without copying it
(``mount``, instant restore); :mod:`vmsnap.restore.source` starts the servers for them. They live here, below
``repo/``, so that a layout can build them without knowing anything of restores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, UsageError
from vmsnap.image.readers import reader_options


def _as_dict(mapping: Mapping[str, Any]) -> dict[str, str]:
    return reader_options(dict(mapping))


@attrs.frozen
class ImageSource:
    """A backup disk that is an image file: the top of a qcow2 chain (``qcow2`` layout) or a raw file.

    :param path: the image (its backing links, relative or absolute, are followed by QEMU)
    :param format: "qcow2" or "raw"
    :param identity: what makes two mounts "the same backup disk" (default: the image's real path)
    :raise NotFoundError: the image does not exist
    """

    path: Path
    format: str = "qcow2"
    identity: str = ""

    def __attrs_post_init__(self) -> None:
        if self.format not in ("qcow2", "raw"):
            raise UsageError(f"unsupported image format {self.format!r}", hint="use 'qcow2' or 'raw'")
        if not self.path.exists():
            raise NotFoundError(
                f"backup image {self.path} does not exist", hint="check the backup id and disk"
            )
        if not self.identity:
            object.__setattr__(self, "identity", f"image:{os.path.realpath(self.path)}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "image", "path": str(self.path), "format": self.format, "identity": self.identity}


@attrs.frozen
class ReaderSource:
    """A backup disk read by a :class:`~vmsnap.image.readers.BlockReader` built in nbdkit's Python plugin.

    :param reader: the factory's import string, e.g. ``vmsnap.image.readers:VerifiedRawReader``
    :param options: its keyword arguments (strings; visible in ``ps``, so never a secret — a key *file*'s
        path is fine)
    :param identity: what makes two mounts "the same backup disk", e.g. ``chunks:REPO/vm/ID/disk``
        (default: the reader and its options)
    :raise UsageError: the import string is not ``module:callable``, or an option name is reserved
    """

    reader: str
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_as_dict)
    identity: str = ""

    def __attrs_post_init__(self) -> None:
        if ":" not in self.reader:
            raise UsageError(f"reader {self.reader!r} is not module:callable")
        if not self.identity:
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            object.__setattr__(self, "identity", f"reader:{self.reader}?{opts}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "reader",
            "reader": self.reader,
            "options": dict(self.options),
            "identity": self.identity,
        }


BackupSource = ImageSource | ReaderSource


def source_from_json(data: Mapping[str, Any]) -> BackupSource:
    """The inverse of ``to_json`` (for state files).

    :raise UsageError: an unknown kind
    """
    if data.get("kind") == "image":
        return ImageSource(Path(data["path"]), str(data["format"]), str(data["identity"]))
    if data.get("kind") == "reader":
        return ReaderSource(str(data["reader"]), dict(data["options"]), str(data["identity"]))
    raise UsageError(f"unknown backup source kind {data.get('kind')!r}")
