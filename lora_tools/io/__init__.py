"""Reading and writing files: safetensors, checkpoints, outputs, the Hub."""
