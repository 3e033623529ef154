"""The package version: a leaf module, so that what names it in keys and bundles imports nothing above it."""

__version__ = "0.1.0"
