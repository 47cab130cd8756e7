"""Raw records → tokenized samples: which tokenizer each field gets, and one record's samples.

`TokenizerSet` picks (and caches) each field's tokenizer — a `--tokenizer MODALITY=NAME` override
(`parse_tokenizer_overrides`), else the field's own, else the modality's default — and records
each one's config for the manifest. `to_samples` reads one record and tokenizes it into its samples
(several when a long document is chunked, `mmtool.data.chunking`); any failure within the record
becomes a `RecordError` naming its location. Used by `mmtool preprocess` (in its workers) and
`mmtool inspect`.
"""

from __future__ import annotations

import json
from typing import Any

from mmtool.config import parse_value
from mmtool.data.chunking import Chunking, chunkable, encode_text
from mmtool.data.schema import Record, Sample, check_label
from mmtool.data.sources.base import Source
from mmtool.data.tokenizers import DEFAULT_TOKENIZERS, Tokenizer, build_tokenizer
from mmtool.data.tokenizers.text import check_unicode
from mmtool.errors import RECORD_FAILURES, MMToolError, RecordError


def parse_tokenizer_overrides(specs: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Parses `--tokenizer MODALITY=NAME[:k=v,...]` flags into `{modality: (name, options)}`."""
    out = {}
    for spec in specs:
        modality, sep, rest = spec.partition("=")
        if not sep or not rest:
            raise MMToolError(f"--tokenizer {spec!r}: expected MODALITY=NAME[:key=value,...]")
        name, _, opts = rest.partition(":")
        options = {}
        for pair in filter(None, opts.split(",")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise MMToolError(f"--tokenizer {spec!r}: option {pair!r} is not key=value")
            options[key] = parse_value(value)
        build_tokenizer(name, **options)  # fail now, naming the flag, rather than in a worker
        out[modality] = (name, options)
    return out


class TokenizerSet:
    """Picks and caches the tokenizer of each field: override, else the field's own, else default."""

    def __init__(self, overrides: dict[str, tuple[str, dict[str, Any]]]):
        self.overrides = overrides
        self._cache: dict[str, Tokenizer] = {}
        self.configs: dict[str, dict[str, Any]] = {}  # "modality/role" → tokenizer config

    def encode(self, field_: Any) -> Any:
        """Tokenizes one field into one segment (text is cut at the tokenizer's cap)."""
        tok = self.tokenizer(field_)
        segment = tok.encode(field_.data, field_.role)
        segment.modality = field_.modality  # e.g. continuous actions through `mulaw` stay actions
        return segment

    def encode_record(self, record: Record, chunking: Chunking) -> tuple[list[list[Any]], bool]:
        """Tokenizes a record: a list of segment lists, one per sample (several when a document is
        chunked), and whether any text was cut."""
        split = chunkable(record, chunking)
        segments, cut = [], False
        for f in record.fields:
            if f.modality == "text":
                segs, was_cut = encode_text(self.tokenizer(f), f, chunking, split)
                cut = cut or was_cut
                if split:
                    return [[s] for s in segs], cut
                segments.append(segs[0])
            else:
                segments.append(self.encode(f))
        return [segments], cut

    def tokenizer(self, field_: Any) -> Tokenizer:
        """The tokenizer of `field_` (built once), its config recorded under "modality/role"."""
        own = field_.tokenizer or DEFAULT_TOKENIZERS.get(field_.modality)
        if field_.modality in self.overrides:
            name, options = self.overrides[field_.modality]
            options = {**(field_.options if name == own else {}), **options}
        elif own is None:
            raise RecordError(f"no tokenizer for modality {field_.modality!r}")
        else:
            name, options = own, field_.options
        key = json.dumps([name, options], sort_keys=True, default=str)
        tok = self._cache.get(key)
        if tok is None:
            try:
                tok = build_tokenizer(name, **options)
            except RecordError:
                raise
            except MMToolError as exc:  # options that came from the record, e.g. num_classes=1e12
                raise RecordError(str(exc)) from None
            self._cache[key] = tok
        role_key = f"{field_.modality}/{field_.role}"
        if self.configs.get(role_key, {}).get("name", name) != name:
            # One role, two tokenizers (e.g. discrete and mulaw actions in one jsonl): describe
            # both, or the segments of the second cannot be read back against the manifest.
            role_key = f"{role_key}:{name}"
        self.configs.setdefault(role_key, {"name": name, **tok.config()})
        return tok


def to_samples(source: Source, tokenizers: TokenizerSet, index: int,
               chunking: Chunking = Chunking()) -> tuple[list[Sample], bool]:
    """Reads record `index` and tokenizes it into its samples (one, or one per chunk of a long
    document: ids `ID#0`, `ID#1`, ...) and whether text was cut; a `RecordError` names the
    record's location.

    Any failure within the record (see `RECORD_FAILURES`) becomes a `RecordError`, and so does a
    record whose id, task or meta could not be stored (lone surrogates, unserialisable meta).
    """
    location = source.location(index)
    try:
        try:
            record: Record = source.read(index)
            if not record.fields:
                raise RecordError("record has no fields")
            groups, cut = tokenizers.encode_record(record, chunking)
            rid = check_unicode(str(record.id), "id")
            samples = []
            for k, segments in enumerate(groups):
                meta = record.meta if len(groups) == 1 else \
                    {**record.meta, "record": rid, "chunk": k, "chunks": len(groups)}
                samples.append(Sample(
                    id=rid if len(groups) == 1 else f"{rid}#{k}", source=source.name,
                    task=check_unicode(str(record.task), "task"), split=source.split_of(index),
                    segments=segments, label=check_label(record.label), meta=meta))
            json.dumps(samples[0].meta, sort_keys=True)  # what the shard will store; fails here if at all
        except RECORD_FAILURES as exc:
            raise RecordError.from_exception(exc) from None
    except RecordError as exc:
        raise exc.at(location)
    return samples, cut


def to_sample(source: Source, tokenizers: TokenizerSet, index: int) -> Sample:
    """Reads record `index` as one sample (text cut at the tokenizer's cap, never chunked)."""
    return to_samples(source, tokenizers, index, Chunking(long_text="cut"))[0][0]
