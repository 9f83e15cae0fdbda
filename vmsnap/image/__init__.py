"""Disk images: the one qemu-img wrapper, the one qemu-nbd / qemu-storage-daemon server, NBD reading, the
qcow2 reader and content digests. Knows no repository and no strategy."""
