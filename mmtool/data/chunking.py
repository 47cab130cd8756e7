"""Long text is split, never silently cut: the `--opt max_tokens/overlap/long_text/max_chunks`
options of `mmtool preprocess` (every source) and how one record becomes several samples.

A record whose only field is text (a document) longer than a chunk becomes one sample per chunk,
with ids `ID#0`, `ID#1`, ... (a document that fits keeps its id `ID`), all in the record's split,
each with `meta["chunk"]`, `meta["chunks"]` and `meta["record"]` (the record's id). Text that sits
next to other fields (a caption, a transcript, a second text column) is not split, since the pair
must stay one sample: it is cut to the chunk size, and every cut is counted (`truncated`).
`--opt long_text=cut` cuts documents too (one sample per record, as before chunking existed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmtool.data.schema import Record, Segment
from mmtool.data.tokenizers.text import MAX_CHUNKS
from mmtool.errors import MMToolError

LONG_TEXT = ("chunk", "cut")


@dataclass(frozen=True)
class Chunking:
    """How long text is handled (`--opt` keys of the same names, taken before the source's own).

    Attributes:
        max_tokens: tokens per text segment, special tokens included; None: the tokenizer's cap
            (wordpiece 512, bytes 2048).
        overlap: tokens each chunk repeats from the previous one (context across the cut).
        long_text: "chunk" (default) or "cut".
        max_chunks: the most chunks per record; text beyond is cut and counted.
    """

    max_tokens: int | None = None
    overlap: int = 0
    long_text: str = "chunk"
    max_chunks: int = MAX_CHUNKS

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON object (the manifest's `chunking`)."""
        return dataclasses.asdict(self)


KEYS = tuple(f.name for f in dataclasses.fields(Chunking))


def split_options(options: list[str]) -> tuple[list[str], Chunking]:
    """Separates the chunking keys from `--opt key=value` strings: (the source's, the chunking).

    Raises:
        MMToolError: a chunking value of the wrong type or out of range, naming the flag.
    """
    rest, kwargs = [], {}
    for item in options:
        key, eq, value = item.partition("=")
        if key not in KEYS or not eq:
            rest.append(item)
            continue
        if key == "long_text":
            if value not in LONG_TEXT:
                raise MMToolError(f"--opt long_text={value}: expected one of {', '.join(LONG_TEXT)}")
            kwargs[key] = value
            continue
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise MMToolError(f"--opt {key}={value}: expected an integer") from None
        if kwargs[key] < (0 if key == "overlap" else 1):
            raise MMToolError(f"--opt {key}={value}: must be at least {0 if key == 'overlap' else 1}")
    return rest, Chunking(**kwargs)


def chunkable(record: Record, chunking: Chunking) -> bool:
    """True when the record is a document that may become several samples (its only field is text)."""
    return chunking.long_text == "chunk" and len(record.fields) == 1 \
        and record.fields[0].modality == "text"


def encode_text(tok: Any, field_: Any, chunking: Chunking, split: bool) -> tuple[list[Segment], bool]:
    """One text field → its segments (several only when `split`) and whether text was cut.

    Tokenizers without `encode_chunks` (plug-ins) encode as they always did.
    """
    if not hasattr(tok, "encode_chunks"):
        seg = tok.encode(field_.data, field_.role)
        return [seg], seg.truncated
    if not split and chunking.max_tokens in (None, tok.max_tokens) and not chunking.overlap:
        seg = tok.encode(field_.data, field_.role)  # the cut every folder made before chunking
        return [seg], seg.truncated
    segments, cut = tok.encode_chunks(field_.data, field_.role, chunking.max_tokens,
                                      chunking.overlap, chunking.max_chunks if split else 1)
    return segments, cut


def check(chunking: Chunking, overrides: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Checks `--opt max_tokens/overlap` against the text tokenizer before anything is written.

    Raises:
        MMToolError: a chunk larger than the tokenizer's cap, or an overlap that fills a chunk.
    """
    from mmtool.data.tokenizers import DEFAULT_TOKENIZERS, build_tokenizer

    name, options = overrides.get("text", (DEFAULT_TOKENIZERS["text"], {}))
    tok = build_tokenizer(name, **options)
    if hasattr(tok, "encode_chunks"):
        tok.encode_chunks("x", "document", chunking.max_tokens, chunking.overlap, 1)
