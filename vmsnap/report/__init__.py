"""``vmsnap report``: a static HTML page about a repository (:func:`vmsnap.report.page.write_report`)."""
