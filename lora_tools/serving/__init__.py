"""Serving engines' own rules: what vLLM, SGLang, llama.cpp and mlx-lm reject or silently ignore in an adapter."""
