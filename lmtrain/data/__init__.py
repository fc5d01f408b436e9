"""Data: raw sources → cleaned, deduplicated, tokenized shards → Grain input pipeline."""
