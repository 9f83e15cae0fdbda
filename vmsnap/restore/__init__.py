"""Restoring without waiting: a backup's files as a read-only tree (mount), and a VM running on its backup
while the data is copied in the background (instant restore)."""
