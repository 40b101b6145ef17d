"""Pure planning over names, shapes and dtypes: which adapter tensors change which base tensors, and how.

`targets` finds the base tensor each adapter module names; `shapes` and
`compatibility` check that they fit; `merge_plan` pairs every adapter tensor with
the base tensor it changes; `shards` cuts the output into files; `disk_names` and
`expert_linears` rewrite adapters saved with a model's in-memory names into its
checkpoint's on-disk ones; `quantized` maps logical tasks back onto quantized
storage. Nothing here reads tensor data.
"""
