"""``python -m vmsnap``: the same as the ``vmsnap`` command."""

import sys

from vmsnap.cli import main

if __name__ == "__main__":
    sys.exit(main())
