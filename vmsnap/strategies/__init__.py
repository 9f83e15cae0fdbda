"""Snapshot strategies: internal, external, backup, lvm, btrfs (see :mod:`vmsnap.strategies.base`)."""
