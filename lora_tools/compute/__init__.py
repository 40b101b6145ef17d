"""Running tensor work on every core and every device: worker pools and device streams."""

from .pool import BlockPool, run_ordered, single_threaded_torch, usable_cores

__all__ = ["BlockPool", "run_ordered", "single_threaded_torch", "usable_cores"]
