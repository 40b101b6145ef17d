"""The streaming merge engine: `run` plans, writes, records and renames into place (see `lora_tools.merge`).

`writer` streams each component's shards (kernel copies for unchanged tensors,
computed rows for changed ones), `lanes` deals the compute to devices,
`arithmetic` computes one output tensor (fp32, one rounding), `quantized` and
`chunk_terms` do the same for FP8 / MXFP4 weights chunk by chunk, `record` leaves
what an un-merge needs, `components` splits pipelines, `checks` refuses NaN/Inf.
"""
