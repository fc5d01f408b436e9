"""Model: a Llama-style decoder-only transformer with logical axis names for sharding."""
