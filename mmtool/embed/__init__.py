"""Embeddings: frozen encoders (`frozen`) and the embed job with its cache (`job`)."""

from mmtool.embed.job import (EmbedConfig, check_join, embed, embedding_block, resolve_training_data,
                              verify_embedding)

__all__ = ["EmbedConfig", "check_join", "embed", "embedding_block", "resolve_training_data",
           "verify_embedding"]
