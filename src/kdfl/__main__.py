"""``python -m kdfl``: the same command line as ``kdfl``."""

import sys

from kdfl.cli import main

sys.exit(main())
