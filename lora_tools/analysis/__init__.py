"""Seeing what an adapter or a fine-tune changes: per-module statistics, checkpoint diffs, pictures."""
