"""Converting adapters between formats: PEFT ↔ kohya (`spelling`), serving formats (`export`), diffusion names (`naming`)."""
