"""The tokenizer interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from mmtool.data.schema import Segment
from mmtool.errors import MMToolError
from mmtool.registry import Registry

TOKENIZERS: Registry[type["Tokenizer"]] = Registry(
    "tokenizers", "turn one raw field (text, image, audio, values, actions) into a token segment",
    builtins="mmtool.data.tokenizers",
)

DEFAULT_TOKENIZERS = {
    "text": "wordpiece",
    "image": "patches",
    "audio": "logmel",
    "observation": "mulaw",
    "action": "discrete",
    "reward": "raw-float",
    "label": "label",
}
"""The tokenizer each modality gets unless a field or `--tokenizer MODALITY=NAME` says otherwise."""


class Tokenizer(ABC):
    """Turns one raw field into a `Segment`; stateless after construction.

    Subclasses take their options as keyword arguments with defaults (so `--tokenizer
    image=patches:patch_size=4` can set them) and must be picklable (they run in worker processes).
    """

    modality: ClassVar[str]
    """The modality this tokenizer accepts."""

    registry_name: ClassVar[str] = ""

    @abstractmethod
    def encode(self, data: Any, role: str) -> Segment:
        """Tokenizes one raw value.

        Args:
            data: the raw value, as described on `mmtool.data.schema.Field.data`.
            role: the field's role, copied into the segment.

        Raises:
            RecordError: the value cannot be tokenized (empty text, NaN, wrong shape, ...).
        """

    def decode(self, segment: Segment) -> Any:
        """Inverts `encode` as far as the tokenization allows (see each tokenizer's docstring)."""
        raise NotImplementedError(f"{self.registry_name} has no decode")

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that determines the tokens: its options and `vocab_size` or `dim`.

        Two folders can be mixed in training only if their tokenizers' configs are equal.
        """


def build_tokenizer(name: str, **options: Any) -> Tokenizer:
    """Builds the registered tokenizer `name` with `options`, naming a bad option clearly."""
    cls = TOKENIZERS.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise MMToolError(f"tokenizer {name!r}: bad options {options}: {exc}") from exc
