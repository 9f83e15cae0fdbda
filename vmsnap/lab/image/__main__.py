"""``python -m vmsnap.lab.image``: build (or find) the lab guest and print its paths."""

from vmsnap.lab.image.builder import main

raise SystemExit(main())
