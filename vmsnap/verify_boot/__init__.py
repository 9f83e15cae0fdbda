"""Proof that a backup boots: ``vmsnap verify --boot`` (:func:`vmsnap.verify_boot.run.verify_boot`) boots a
backup on throwaway overlays, asks its guest agent, runs checks and probes ports, takes a screenshot, and
keeps the result beside the backup (:mod:`vmsnap.verify_boot.result`). Its footprint on the host, and how
``vmsnap recover`` undoes it, is :mod:`vmsnap.restore.boot_session`."""
