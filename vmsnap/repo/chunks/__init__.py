"""The ``chunks`` repository layout: 4 MiB chunks stored once by content id, one index per disk per backup.
keys → blob (one chunk) → index (one disk) → pipeline (backup) and restore (back to images), over a Store.
"""
