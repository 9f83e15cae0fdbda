"""The backup repository: two layouts (``qcow2`` chains, deduplicated ``chunks``) over pluggable stores.

See ``docs/repository.md`` for the formats; :mod:`vmsnap.repo.stores` for where the bytes live.
"""
