"""``python -m vmsnap``: the same as the ``vmsnap`` command."""

import sys

from vmsnap.cli import main

sys.exit(main())
