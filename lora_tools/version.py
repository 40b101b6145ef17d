"""The package version, in a module of its own that imports nothing (the card, the Hub client and `env` read it)."""

__version__ = "0.1.0"
