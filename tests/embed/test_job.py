"""`mmtool.embed` and `mmtool.embed.frozen`: agreement with sentence-transformers, the cache and each of its
invalidations, resume after `kill -9`, the id join, training on embeddings, and each bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples, samples_to_batch
from mmtool.embed import (EmbedConfig, check_join, embed, resolve_training_data,
                          verify_embedding)
from mmtool.errors import MMToolError
from mmtool.embed.frozen import minilm_folder

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!",
    "Naïve café owners in Zürich serve CRÈME brûlée.",
    "Python's asyncio module provides infrastructure for writing single-threaded concurrent code.",
    "a handwritten seven",
    "Return the absolute value of the argument. " * 40,  # longer than the model's 256 tokens
]


def _vectors(folder, role_modality="embedding"):
    rows = rows_to_samples(store.read_folder(folder))
    return {s.id: [g for g in s.segments if g.modality == role_modality] for s in rows}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    manifest = root / "sentences.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n"
                                for i, t in enumerate(SENTENCES)))
    preprocess(PreprocessConfig(source="jsonl", out=root / "wordpiece", options=[f"path={manifest}"]))
    preprocess(PreprocessConfig(source="jsonl", out=root / "bytes", options=[f"path={manifest}"],
                                tokenizers=["text=bytes"]))
    preprocess(PreprocessConfig(source="digits", out=root / "digits", max_samples=96))
    first = embed(EmbedConfig(data=root / "digits", encoder="minilm-l6", out=root / "emb", part_rows=32))
    return root, first


def test_minilm_vectors_match_sentence_transformers(work):
    from sentence_transformers import SentenceTransformer

    root, _ = work
    reference = SentenceTransformer(str(minilm_folder()), device="cpu").encode(SENTENCES)  # [6, 384]
    for tokenizer in ("wordpiece", "bytes"):  # stored ids fed directly / text decoded, re-tokenized
        out = root / f"st-{tokenizer}"
        m = embed(EmbedConfig(data=root / tokenizer, encoder="minilm-l6", out=out))
        assert m["tokenizers"]["embedding/document"]["dim"] == 384
        vecs = _vectors(out)
        for i, ref in enumerate(reference):
            (seg,) = vecs[f"s{i}"]
            assert seg.shape == (1, 384) and seg.tokenizer == "minilm-l6"
            v = seg.values
            cos = float(v @ ref / np.linalg.norm(v) / np.linalg.norm(ref))
            assert cos >= 0.999, (tokenizer, SENTENCES[i], cos)
    assert m["embedding"]["preprocessing"]["routes"] == {"text/document": "text"}


def test_token_pool_keeps_one_vector_per_token(work):
    root, _ = work
    embed(EmbedConfig(data=root / "wordpiece", encoder="minilm-l6", out=root / "tok", pool="tokens",
                      keep_original=True))
    source = {s.id: s for s in rows_to_samples(store.read_folder(root / "wordpiece"))}
    for sid, sample in ((s.id, s) for s in rows_to_samples(store.read_folder(root / "tok"))):
        text, emb = sample.segments  # original kept, its embedding right after it
        assert text.modality == "text" and np.array_equal(text.ids, source[sid].segments[0].ids)
        assert emb.shape == (min(text.n_tokens, 256), 384)


def test_join_keeps_every_row_and_field_and_replaces_only_the_modality(work):
    root, first = work
    src = rows_to_samples(store.read_folder(root / "digits"))
    out = rows_to_samples(store.read_folder(root / "emb"))
    assert [s.id for s in out] == [s.id for s in src]
    for a, b in zip(src, out):
        assert (a.label, a.split, a.task, a.meta) == (b.label, b.split, b.task, b.meta)
        assert [g.modality for g in b.segments] == ["image", "embedding"]
        assert np.array_equal(a.segments[0].values, b.segments[0].values)
        assert b.segments[1].role == "caption" and b.segments[1].shape == (1, 384)
    assert set(first["tokenizers"]) == {"image/image", "embedding/caption"}
    assert first["embedding"]["source"]["rows"] == 96 and first["rows"] == 96
    verify_embedding(root / "emb")  # same sha, same ids


def test_rerun_is_a_cache_hit_and_each_change_invalidates_with_a_message(work, tmp_path):
    root, first = work
    again = embed(EmbedConfig(data=root / "digits", encoder="minilm-l6", out=root / "emb", part_rows=32))
    assert again["up_to_date"] and again["shards"] == first["shards"]

    src = tmp_path / "src"
    shutil.copytree(root / "digits", src)
    out = tmp_path / "out"
    cfg = dict(data=src, encoder="minilm-l6", out=out, part_rows=32)
    embed(EmbedConfig(**cfg))
    said: list[str] = []

    def run(**kw):
        said.clear()
        return embed(EmbedConfig(**{**cfg, **kw}), notify=said.append)

    assert run()["up_to_date"] and not said
    # the source changes (preprocessed again with other settings)
    preprocess(PreprocessConfig(source="digits", out=src, max_samples=64, overwrite=True))
    m = run()
    assert not m["up_to_date"] and m["rows"] == 64 and "source" in said[0] and "changed" in said[0]
    # another pooling
    assert not run(pool="tokens")["up_to_date"] and "pool mean → tokens" in said[0]
    # another encoder: a user's (tiny, random) BERT folder through hf:PATH
    folder = tiny_bert(tmp_path / "model")
    m = run(encoder=f"hf:{folder}")
    assert not m["up_to_date"] and "encoder minilm-l6 → hf:" in said[0]
    assert m["tokenizers"]["embedding/caption"]["dim"] == 32
    # new weights in the same model folder
    tiny_bert(folder, seed=1)
    m = run(encoder=f"hf:{folder}")
    assert not m["up_to_date"] and "weights changed" in said[0]
    assert run(encoder=f"hf:{folder}")["up_to_date"]


def tiny_bert(folder, seed=0):
    """A small random BERT with all-MiniLM's tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder)
    return folder


def test_hf_folder_gives_minilm_vectors(work):
    root, _ = work
    embed(EmbedConfig(data=root / "digits", encoder=f"hf:{minilm_folder()}", out=root / "hf"))
    a, b = _vectors(root / "emb"), _vectors(root / "hf")
    for sid in a:
        assert float(a[sid][0].values @ b[sid][0].values) > 0.9999
    assert b[sid][0].tokenizer == "hf-model"


KILL_AFTER_TWO_PARTS = textwrap.dedent("""
    import os, signal, sys
    from mmtool.embed import EmbedConfig, embed
    done = []
    def progress(n):
        done.append(n)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    embed(EmbedConfig(data=sys.argv[1], encoder="hf:" + sys.argv[3], out=sys.argv[2], part_rows=32),
          progress=progress)
""")


def _interrupt_after_two_parts():
    done = []

    def progress(n):
        done.append(n)
        if len(done) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does between two parts

    return progress


def test_resume_after_interrupt_reuses_finished_parts_and_matches_an_uninterrupted_run(work, tmp_path):
    root, first = work
    out = tmp_path / "interrupted"
    cfg = dict(data=root / "digits", encoder="minilm-l6", part_rows=32)
    with pytest.raises(KeyboardInterrupt):
        embed(EmbedConfig(out=out, **cfg), progress=_interrupt_after_two_parts())
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".partial").glob("part-*.json"))) == 2
    m = embed(EmbedConfig(out=out, **cfg))
    assert m["resumed_parts"] == 2 and not m["up_to_date"]
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in first["shards"]]
    assert not (out / ".partial").exists()


@pytest.mark.slow
def test_resume_after_kill_9(work, tmp_path):
    """The same through a real `kill -9` of a subprocess (slow: the subprocess imports transformers)."""
    root, _ = work
    model = tiny_bert(tmp_path / "model")
    cfg = dict(data=root / "digits", encoder=f"hf:{model}", part_rows=32)
    whole = embed(EmbedConfig(out=tmp_path / "whole", **cfg))
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_PARTS, str(root / "digits"), str(out),
                           str(model)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".partial").glob("part-*.json"))) == 2
    m = embed(EmbedConfig(out=out, **cfg))
    assert m["resumed_parts"] == 2 and not m["up_to_date"]
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in whole["shards"]]


def test_changed_source_and_mismatched_ids_are_clear_errors(work, tmp_path):
    root, _ = work
    src, emb = tmp_path / "src", tmp_path / "emb"
    shutil.copytree(root / "digits", src)
    embed(EmbedConfig(data=src, encoder="minilm-l6", out=emb))
    # ids that do not join: the embedding shard loses a row (its manifest updated to match)
    bad = tmp_path / "bad"
    shutil.copytree(emb, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    rows = rows_to_samples(store.read_shard(bad / manifest["shards"][0]["path"]))
    manifest["shards"][0] = store.write_shard(bad / manifest["shards"][0]["path"],
                                              [samples_to_batch(rows[1:])])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MMToolError, match=r"1 source ids have no embedding \(e.g. 'digits-0'\)"):
        verify_embedding(bad, src)
    with pytest.raises(MMToolError, match="does not match its source"):
        check_join(bad, src)
    # the source changes after embedding
    preprocess(PreprocessConfig(source="digits", out=src, max_samples=50, overwrite=True))
    with pytest.raises(MMToolError, match=r"changed since .* was embedded from it \(content sha256"):
        verify_embedding(emb)
    with pytest.raises(MMToolError, match="changed since"):
        resolve_training_data([str(src)], [str(emb)])


@pytest.mark.parametrize("kw, message", [
    (dict(modality="image"), "--encoder minilm-l6 serves text, not image"),
    (dict(encoder="hf:/no/such/model"), "model folder /no/such/model does not exist"),
    (dict(encoder="minilm-l7"), "did you mean 'minilm-l6'"),
    (dict(pool="max"), "--pool 'max': expected one of mean, tokens"),
    (dict(encoder="checkpoint:/no/run:image"), "is not a training run"),
])
def test_bad_inputs_are_clear_errors(work, tmp_path, kw, message):
    root, _ = work
    cfg = {**dict(data=root / "digits", encoder="minilm-l6", out=tmp_path / "x"), **kw}
    with pytest.raises(MMToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        embed(EmbedConfig(**cfg))


def test_model_folder_without_weights_or_tokenizer_is_refused(work, tmp_path):
    root, _ = work
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    with pytest.raises(MMToolError, match="'vit' model without a text tokenizer"):
        embed(EmbedConfig(data=root / "digits", encoder=f"hf:{folder}", out=tmp_path / "x"))
    shutil.copy(minilm_folder() / "tokenizer.json", folder)
    with pytest.raises(MMToolError, match="has no weight files"):
        embed(EmbedConfig(data=root / "digits", encoder=f"hf:{folder}", out=tmp_path / "x"))


def test_out_holding_a_dataset_is_refused(work):
    root, _ = work
    with pytest.raises(MMToolError, match="not an embedding folder; choose another --out"):
        embed(EmbedConfig(data=root / "digits", encoder="minilm-l6", out=root / "wordpiece"))


@pytest.fixture(scope="module")
def run(work):
    """A tiny model trained for 3 steps on the embedding folder."""
    from mmtool.models.model import ModelConfig
    from mmtool.train import TrainConfig, train

    root, _ = work
    data = resolve_training_data([f"{root / 'digits'}=2"], [str(root / "emb")])
    assert data == [f"{root / 'emb'}=2"]  # replaces the folder it was made from, keeping its weight
    streams = []
    cfg = TrainConfig(data=data, out=root / "run", max_steps=3, batch_samples=32, warmup=1,
                      num_workers=0, save_every=3,
                      model=ModelConfig(size="tiny", objectives={"masked-patch": 1.0, "contrastive": 1.0}))
    summary = train(cfg, on_start=lambda info: streams.extend(info["streams"]))
    return root, summary, streams


def test_training_on_an_embedding_folder(run):
    root, summary, streams = run
    assert "embedding:minilm-l6" in streams and not any(s.startswith("text:") for s in streams)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    log = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in log)


def test_checkpoint_encoder_embeds_a_modality_alone_or_whole_samples(run, tmp_path):
    root, _, _ = run
    m = embed(EmbedConfig(data=root / "digits", encoder=f"checkpoint:{root / 'run'}:image",
                          out=tmp_path / "img", batch_size=40))
    assert m["tokenizers"]["embedding/image"]["dim"] == 64 and "text/caption" in m["tokenizers"]
    vecs = _vectors(tmp_path / "img")
    assert all(v[0].shape == (1, 64) and np.isfinite(v[0].values).all() for v in vecs.values())
    whole = embed(EmbedConfig(data=root / "emb", encoder=f"checkpoint:{root / 'run'}",
                              out=tmp_path / "whole", keep_original=True))
    assert set(whole["modalities"]) == {"image", "embedding"}
    sample = rows_to_samples(store.read_folder(tmp_path / "whole"))[0]
    assert [g.tokenizer for g in sample.segments][-1] == "ckpt-run" and sample.segments[-1].shape == (1, 64)
    with pytest.raises(MMToolError, match="it has no audio encoder"):
        embed(EmbedConfig(data=root / "digits", encoder=f"checkpoint:{root / 'run'}:audio", out=tmp_path / "x"))


def test_embeddings_strategy_profiles_embedding_folders_only(work):
    from mmtool.analysis.profile import ProfileConfig, profile_strategies

    root, _ = work
    result = profile_strategies(ProfileConfig(data=[str(root / "emb")], strategies=["packed", "embeddings"],
                                              batch_tokens=512, steps=2))
    assert result["strategies"]["embeddings"]["batches"] == 2
    with pytest.raises(MMToolError, match="strategy 'embeddings' measures embedding folders"):
        profile_strategies(ProfileConfig(data=[str(root / "digits")], strategies=["embeddings"],
                                         batch_tokens=512, steps=2))
