"""Name maps between namings (memory vs disk, one library vs another): one module per family."""
