"""Adapter files of every format (PEFT, kohya, LyCORIS, diffusers), read into one model."""
