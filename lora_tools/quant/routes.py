"""Which output tensors a quantized merge produces itself: known before torch is imported.

The merge queues its kernel copies of the tensors that pass unchanged before
torch is imported, so that the import runs while they do; it must know which
tensors the quantized path writes instead. `quant.execute` builds the executor
on this once torch is in.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import TensorTask
from .layout import QuantizedWeight

__all__ = ["QuantizedRoutes"]


@dataclass
class QuantizedRoutes:
    """The output tensors `adapt_plan` routed to the quantized path, by name: (weight, its logical task)."""

    produced: dict[str, tuple[QuantizedWeight, TensorTask]]

    def handles(self, name: str) -> bool:
        return name in self.produced
