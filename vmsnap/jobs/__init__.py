"""Backup jobs: one TOML file names the repository, the VMs (here and on other hosts) and the retention
policy; ``vmsnap run`` backs them all up, prunes, reports and writes metrics; ``vmsnap schedule`` runs it
from a systemd timer.

Modules: :mod:`~vmsnap.jobs.jobfile` (parse), :mod:`~vmsnap.jobs.expand` (the VMs it selects),
:mod:`~vmsnap.jobs.run` (run a job), :mod:`~vmsnap.jobs.metrics` (Prometheus text file),
:mod:`~vmsnap.jobs.schedule` (systemd units), :mod:`~vmsnap.jobs.default` (the backup, retention and listing
functions on today's orchestrator), :mod:`~vmsnap.jobs.hosts` (``user@host`` specs),
:mod:`~vmsnap.jobs.toml_lines` (line numbers of keys).
"""
