"""Weights below fp32: formats, the GGUF converter, the int8 modules and the loader."""
