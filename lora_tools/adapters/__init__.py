"""Adapter files of every format (PEFT, kohya, LyCORIS, diffusers, GGUF, mlx-lm), read into one model and written.

`model` is the normalized model; one module per format reads (and writes) it;
`registry` lists them all; `report` is what writing an adapter produced.
"""
