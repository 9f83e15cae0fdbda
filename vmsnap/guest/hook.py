"""Guest side of freezing: vmsnap's fsfreeze-hook dispatcher, and how to install it into a guest's root.

The dispatcher itself is a POSIX sh script (``fsfreeze-hook.sh``, package data) so that it runs in guests
without Python; ``vmsnap-fsfreeze-hook`` installs it, or runs it where Python is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from vmsnap.errors import UsageError, VmsnapError
from vmsnap.runner import LocalRunner, Runner

HOOK_PATH = "etc/qemu/fsfreeze-hook"
"""Where qemu-ga looks for its hook (``-F`` without a path), relative to the guest's root."""

HOOK_DIR = "etc/qemu/fsfreeze-hook.d"
"""The directory whose executable files the dispatcher runs, relative to the guest's root."""

HOOK_LOG = "/var/log/vmsnap-fsfreeze-hook.log"
"""Where the dispatcher logs each script's outcome and output (inside the guest)."""

ORIGINAL_SUFFIX = ".vmsnap-orig"


def dispatcher_script() -> str:
    """The dispatcher's text (a POSIX sh script)."""
    return resources.files("vmsnap.guest").joinpath("fsfreeze-hook.sh").read_text()


def write_atomically(target: Path, data: bytes, mode: int) -> None:
    """Replace ``target`` with ``data`` at once, with exactly ``mode`` (whatever the umask): a temporary file
    beside it, fsync'd, chmod'ed, renamed over it. A freeze that runs meanwhile sees the old or the new file.

    :raise OSError: the directory is missing or not writable (the temporary file is removed)
    """
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def install_hooks(root: Path = Path("/")) -> Path:
    """Install the dispatcher at ``ROOT/etc/qemu/fsfreeze-hook`` (mode 0755) and create the hook directory.

    A different hook already there (Debian's stock one, say) is kept once as ``fsfreeze-hook.vmsnap-orig``.
    The file is replaced atomically, so a freeze that runs meanwhile sees the old or the new hook, never half.

    :param root: the guest's root directory (``/`` inside the guest, or a mounted guest image)
    :return: the installed hook's path
    :raise UsageError: ``root`` is not a directory
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", hint="pass the guest's root directory with --root")
    hook = root / HOOK_PATH
    hook_dir = root / HOOK_DIR
    hook_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    text = dispatcher_script()
    if hook.exists() and hook.read_text(errors="replace") != text:
        original = hook.with_name(hook.name + ORIGINAL_SUFFIX)
        if not original.exists():
            hook.rename(original)
    write_atomically(hook, text.encode(), 0o755)  # qemu-ga must be able to execute its hook
    return hook


def run_dispatcher(action: str, *, hook: Path = Path("/") / HOOK_PATH, runner: Runner | None = None) -> int:
    """Run the installed dispatcher with ``freeze`` or ``thaw``; returns its exit status.

    :raise UsageError: another action
    """
    if action not in ("freeze", "thaw"):
        raise UsageError(f"unknown hook action {action!r}", hint="use freeze or thaw")
    if not hook.exists():
        raise UsageError(f"{hook} is not installed", hint="run `vmsnap-fsfreeze-hook install` first")
    run = runner if runner is not None else LocalRunner()
    result = run.run(["sh", str(hook), action], ok_codes=range(256), timeout=None)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``vmsnap-fsfreeze-hook install [--root DIR] | freeze | thaw | show``."""
    parser = argparse.ArgumentParser(
        prog="vmsnap-fsfreeze-hook",
        description="vmsnap's fsfreeze-hook dispatcher: runs /etc/qemu/fsfreeze-hook.d/* in name order on "
        "freeze and in reverse on thaw, and fails the freeze when a script fails.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install the dispatcher as qemu-ga's fsfreeze hook")
    install.add_argument("--root", type=Path, default=Path("/"), help="the guest's root (default /)")
    commands.add_parser("freeze", help="run the hook scripts' freeze step (what qemu-ga does)")
    commands.add_parser("thaw", help="run the hook scripts' thaw step")
    commands.add_parser("show", help="print the dispatcher script")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(install_hooks(args.root))
            return 0
        if args.command == "show":
            sys.stdout.write(dispatcher_script())
            return 0
        return run_dispatcher(args.command)
    except VmsnapError as err:
        print(f"vmsnap-fsfreeze-hook: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
