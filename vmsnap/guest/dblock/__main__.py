"""``python -m vmsnap.guest.dblock``: the ``vmsnap-dblock`` command."""

import sys

from vmsnap.guest.dblock.cli import main

sys.exit(main())
