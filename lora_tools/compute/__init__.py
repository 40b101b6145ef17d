"""Running tensor work on every core and every device: worker pools, device streams, torch loaded ahead."""

from .pool import BlockPool, run_ordered, single_threaded_torch, usable_cores

__all__ = ["BlockPool", "run_ordered", "single_threaded_torch", "usable_cores"]
