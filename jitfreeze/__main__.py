"""``python -m jitfreeze``: the command line (see :mod:`jitfreeze.cli`)."""

import sys

from .cli import main

sys.exit(main())
