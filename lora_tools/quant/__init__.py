"""Quantized bases: FP8 (block, per-channel, per-tensor), MXFP4 and plain float8 weights.

`layout` finds which stored tensors make up each quantized weight (and `refuse`
names packed integer formats lora_tools will not do arithmetic on); `fp8_codec`,
`mxfp4` and `block_rows` hold the pure decode / encode arithmetic; `chunks` cuts a
weight into rows of scale groups; `dequantize` reads weights as fp32;
`float8_casts` covers float8 weights stored without scales. The merge itself
(dequantize → merge → requantize) is `merging.quantized`'s.
"""
