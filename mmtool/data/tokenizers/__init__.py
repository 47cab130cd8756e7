"""Tokenizers: raw fields → token segments. Each module registers its tokenizers in `TOKENIZERS`."""

from mmtool.data.tokenizers.base import DEFAULT_TOKENIZERS, TOKENIZERS, Tokenizer, build_tokenizer

__all__ = ["DEFAULT_TOKENIZERS", "TOKENIZERS", "Tokenizer", "build_tokenizer"]
