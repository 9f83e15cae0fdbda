"""The soak: random backup, incremental, prune, gc, copy, verify and restore operations through the real CLI
against a real QEMU and a real SeaweedFS, with ``kill -9`` and S3 restarts, checked against a model of the
disks (``python -m tests.soak.soak``, ``make soak``)."""
