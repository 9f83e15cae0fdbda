"""Backup jobs: one TOML file names the repository, the VMs (here and on other hosts) and the retention
policy; ``vmsnap run`` backs them all up, prunes, reports and writes metrics; ``vmsnap schedule`` runs it
from a systemd timer.

Modules: :mod:`~vmsnap.jobs.jobfile` (parse), :mod:`~vmsnap.jobs.expand` (the VMs it selects),
:mod:`~vmsnap.jobs.run` (run a job), :mod:`~vmsnap.jobs.report` (what a run reports),
:mod:`~vmsnap.jobs.metrics` (Prometheus text file),
:mod:`~vmsnap.jobs.schedule` (systemd units), :mod:`~vmsnap.jobs.default` (the backup, retention, gc and
listing functions on the orchestrator and the repository; ``run_job_file``), :mod:`~vmsnap.jobs.toml_lines`
(line numbers of keys). Other hosts are :mod:`vmsnap.vm.hosts` and :mod:`vmsnap.vm.remote_machine`.
"""
