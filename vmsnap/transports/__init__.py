"""Transports that copy an exported snapshot out: copy, nbd, rsync (see :mod:`vmsnap.transports.base`)."""
