"""The ``jitfreeze`` command line (:mod:`jitfreeze.cli.commands`) and ``jitfreeze explain``."""

from .commands import main

__all__ = ["main"]
