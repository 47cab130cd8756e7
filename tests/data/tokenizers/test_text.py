"""WordPiece and byte-level text tokenizers: known ids, round trips, truncation, errors."""

import pickle

import numpy as np
import pytest

from mmtool.data.tokenizers import TOKENIZERS, build_tokenizer
from mmtool.data.tokenizers.text import Bytes, WordPiece
from mmtool.errors import RecordError


def test_wordpiece_known_ids():
    seg = WordPiece().encode("hello world", "caption")
    assert seg.ids.tolist() == [101, 7592, 2088, 102]
    assert seg.shape == (4,) and seg.modality == "text" and seg.role == "caption"
    assert seg.tokenizer == "wordpiece"
    assert WordPiece(add_special=False).encode("Hello World", "caption").ids.tolist() == [7592, 2088]


def test_wordpiece_decode_normalizes():
    tok = WordPiece()
    assert tok.decode(tok.encode("Hello, World! Naïve café", "caption")) == "hello, world! naive cafe"


def test_wordpiece_truncates_with_specials_kept():
    seg = WordPiece(max_tokens=5).encode("one two three four five six", "caption")
    assert seg.ids.tolist() == [101, 2028, 2048, 2093, 102]
    assert WordPiece(max_tokens=3, add_special=False).encode("one two three four", "c").ids.tolist() == [
        2028, 2048, 2093]


def test_wordpiece_long_text_not_padded():
    seg = WordPiece().encode("word " * 1000, "document")
    assert seg.shape == (512,) and seg.ids[-1] == 102
    assert WordPiece().encode("a", "caption").shape == (3,)  # the file's pad-to-128 is off


@pytest.mark.parametrize("bad", ["", "   \n\t", 3, None, b"bytes", ["hello"]])
@pytest.mark.parametrize("cls", [WordPiece, Bytes])
def test_text_rejects(cls, bad):
    with pytest.raises(RecordError):
        cls().encode(bad, "caption")


def test_wordpiece_rejects_text_without_tokens():
    with pytest.raises(RecordError, match="no tokens"):
        WordPiece().encode("\x00\x01", "caption")


def test_bytes_exact_round_trip():
    tok = Bytes()
    text = "naïve café 🚀"
    seg = tok.encode(text, "caption")
    raw = list(text.encode("utf-8"))
    assert seg.ids.tolist() == [256, *raw, 257]
    assert tok.decode(seg) == text
    assert Bytes(add_special=False).encode("AB", "c").ids.tolist() == [65, 66]


def test_bytes_truncates_at_character_boundary():
    tok = Bytes(max_tokens=2 + 5, add_special=True)  # room for 5 bytes; 🚀 is 4 bytes
    seg = tok.encode("ab🚀🚀", "caption")
    assert tok.decode(seg) == "ab"  # the half-cut rocket is dropped, not garbled
    assert seg.ids.tolist() == [256, 97, 98, 257]
    assert Bytes(max_tokens=8).decode(Bytes(max_tokens=8).encode("ab🚀🚀", "c")) == "ab🚀"


def test_config_and_pickle():
    for name, vocab in [("wordpiece", 30522), ("bytes", 258)]:
        tok = build_tokenizer(name)
        assert tok.config()["vocab_size"] == vocab and tok.config()["name"] == name
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.config() == tok.config()
        assert np.array_equal(clone.encode("hi there", "c").ids, tok.encode("hi there", "c").ids)
    assert TOKENIZERS.describe("wordpiece").startswith("Uncased WordPiece")
