"""``python -m jitfreeze``: the command line (see :mod:`jitfreeze.cli.commands`)."""

import sys

from .cli.commands import main

sys.exit(main())
