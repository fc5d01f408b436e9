"""Inference: KV-cache sampling, quantization, Hugging Face interop, HTTP serving."""
