"""lmtrain: train large language models with JAX, from raw text to an evaluated, exported model."""

__version__ = "0.1.0"
