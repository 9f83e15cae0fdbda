"""What ``vmsnap verify`` found, kept beside each backup it checked (``verify-<time>.json``, through
:meth:`~vmsnap.repo.layout.RepositoryLayout.attach`; the manifest is never rewritten), for ``vmsnap report``.

A record: ``{"format": 1, "stamp": "20261207T223501.123456Z", "ok": true, "reader": "qemu", "fast": false,
"problems": ["disk vda: …"]}`` — the problems ``verify`` found in that backup. Keeping it is best effort: a
repository that cannot be written (read-only credentials) loses only the record, never the verdict.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, VmsnapError
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.reports import VerifyReport

PREFIX = "verify-"
FORMAT = 1


@attrs.frozen
class VerifyRecord:
    """One verification of one backup."""

    stamp: str
    ok: bool
    reader: str
    fast: bool
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **attrs.asdict(self), "problems": list(self.problems)}


def record_verification(repo: RepositoryLayout, report: VerifyReport, *, fast: bool) -> list[str]:
    """Keep a record beside every backup ``report`` checked; returns one line per record that could not
    be kept (the verdict stands without it)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    failures = []
    for vm, backup_id in report.checked:
        problems = tuple(
            f"{p.disk + ': ' if p.disk else ''}{p.message}"
            for p in report.problems
            if p.vm == vm and p.backup_id == backup_id
        )
        record = VerifyRecord(stamp, not problems, report.reader, fast, problems)
        try:
            manifest = repo.get(vm, backup_id)
            repo.attach(
                manifest, f"{PREFIX}{stamp}.json", json.dumps(record.to_json(), sort_keys=True).encode()
            )
        except VmsnapError as err:
            failures.append(f"the verification of {vm}/{backup_id} was not kept beside it: {err.message}")
    return failures


def latest_verification(repo: RepositoryLayout, manifest: Manifest) -> VerifyRecord | None:
    """The newest verification record of a backup, or None.

    :raise RepositoryError: it is damaged
    """
    names = sorted(n for n in repo.attachments(manifest) if n.startswith(PREFIX) and n.endswith(".json"))
    if not names:
        return None
    try:
        data = json.loads(repo.attachment(manifest, names[-1]))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return VerifyRecord(
            str(data["stamp"]), bool(data["ok"]), str(data["reader"]), bool(data["fast"]),
            tuple(str(p) for p in data.get("problems", [])),
        )  # fmt: skip
    except NotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RepositoryError(f"verification record {names[-1]} is damaged: {err}") from err
