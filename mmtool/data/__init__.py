"""Data: the sample schema, tokenizers, sources, the shard store and preprocessing."""
