"""Low-rank extraction from a full fine-tune: pairing the tensors (`plan`) and decomposing each module (`modules`)."""
