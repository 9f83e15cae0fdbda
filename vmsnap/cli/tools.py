"""The commands around vmsnap rather than on a repository: bench, demo and guest (set-up inside a guest).

The benchmark harness and the demo bring up the lab (images, QEMU, a guest), so they are imported only
when their command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs

from vmsnap.cli.common import Command, emit, positive_count
from vmsnap.guest.install import install_hooks

# -- vmsnap bench -------------------------------------------------------------------------------------------


def _say(quiet: bool, prefix: str = "", file: TextIO | None = None) -> Callable[[str], None]:
    """A line printer for a long run's steps (stderr by default); silent with ``--json``."""
    if quiet:
        return lambda line: None
    return lambda line: print(f"{prefix}{line}", file=file or sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure each strategy's costs; write JSON, Markdown and PNG into --out."""
    from vmsnap.benchmark import run_cost_bench

    say = _say(bool(args.json))
    result, paths = run_cost_bench(args.out, quick=args.quick, runs=args.runs, progress=say)
    payload: dict[str, Any] = {"table": result.to_json()["table"]}
    human = paths["markdown"].read_text()
    if args.throughput or args.peers:
        from vmsnap.benchmark.report import write_throughput
        from vmsnap.benchmark.throughput import run_throughput

        document = run_throughput(quick=args.quick, runs=args.runs, peers=args.peers, progress=say)
        for kind, path in write_throughput(document, args.out).items():
            paths[f"throughput_{kind}"] = path
        payload["throughput"] = document["ratios"]
        if document.get("peers"):
            payload["peers"] = document["peers"].get("ratios", {})
        human += "\n" + paths["throughput_markdown"].read_text()
    payload["results"] = {k: str(v) for k, v in paths.items()}
    emit(args, payload, human + "\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="smaller images, fewer sizes (about 1-2 minutes)"
    )
    parser.add_argument(
        "--runs", type=positive_count, default=3, help="runs per figure; the median is reported (default 3)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where results go")
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="also measure backup/incremental/restore throughput against qemu-img convert and cp",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also measure virtnbdbackup (needs libvirt; implies --throughput)",
    )


# -- vmsnap demo --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Back up and restore the built-in tiny VM, and prove the restored data is right."""
    from vmsnap.demo import run_demo

    report = run_demo(args.workdir, keep=args.keep, say=_say(bool(args.json), "demo: ", sys.stdout))
    human = (
        f"demo: OK in {report.seconds:.0f} s — the restored filesystem is clean (e2fsck -fn) and "
        f"{report.files_matching}/{report.files_compared} files are byte-identical to the guest's at backup "
        f"time, although {report.changed_after_backup} changed afterwards"
    )
    emit(args, attrs.asdict(report), human)
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, help="where the VM, repository and restore go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")


# -- vmsnap guest install-hooks -----------------------------------------------------------------------------


def cmd_guest_install_hooks(args: argparse.Namespace) -> int:
    """Write the fsfreeze-hook dispatcher and vmsnap's hook scripts under --root."""
    installed = install_hooks(args.root)
    emit(
        args,
        {"installed": [{"path": str(f.path), "mode": f"{f.mode:04o}"} for f in installed]},
        "\n".join(f"installed {f.path} (mode {f.mode:04o})" for f in installed),
    )
    return 0


def _install_hooks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="the guest's root directory (/ inside it)")


COMMANDS = (
    Command(
        "bench",
        "measure each strategy's write, delete and rollback costs on this machine",
        "vmsnap bench --quick --out benchmarks/results",
        cmd_bench,
        _bench_arguments,
    ),
    Command(
        "demo",
        "boot the built-in tiny VM, back it up (frozen), change it, restore, and prove the restore is exact",
        "vmsnap demo --workdir /tmp/vmsnap-demo --keep",
        cmd_demo,
        _demo_arguments,
    ),
    Command(
        "guest",
        "guest-side set-up (run inside the guest, or on its mounted root)",
        "vmsnap guest install-hooks --root /",
        None,
        json_option=False,
        subcommands=(
            Command(
                "install-hooks",
                "install the fsfreeze-hook dispatcher and the database lock hook",
                "vmsnap guest install-hooks --root /",
                cmd_guest_install_hooks,
                _install_hooks_arguments,
                description="Write /etc/qemu/fsfreeze-hook and /etc/qemu/fsfreeze-hook.d/50-vmsnap-dblock "
                "under --root (mode 0755). The database hook does nothing until /etc/vmsnap/dblock.cnf "
                "exists.",
            ),
        ),
    ),
)
"""The bench, demo and guest commands, in the order ``vmsnap --help`` lists them."""
