"""The run folder's one owner: config, streams, checkpoints, metrics; `load_model` needs nothing else.

    RUN/config.json      the `TrainConfig` (every setting of the run)
    RUN/streams.json     what the model was built for, written atomically at train start:
                         {"format": 1, "streams": [Stream fields: key, modality, kind, vocab_size,
                         dim, config], "folders": [{"path", "name", "source", "sources",
                         "modalities", "weight", "preprocess": the manifest's source block,
                         "content_sha256": `data.shards.content_sha256`} per `--data` entry,
                         in `--data` order]}
    RUN/metrics.jsonl    one line per step (`mmtool.train`)
    RUN/checkpoints/     `mmtool.train.checkpoint`

A stage that needs a trained model (eval-transfer, ablate, embed `checkpoint:RUN`, export) calls
`load_model(run)`: the config, the streams and the checkpoint's weights rebuild the model without
reading or hashing a single data shard, so a run folder can be moved to another machine without
its data. Runs from before streams.json are upgraded (the file is written) the first time they
are loaded while their data folders still exist; without them the error says what is missing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtool.data.index import Stream
from mmtool.data.shards import atomic_write_json
from mmtool.errors import MMToolError
from mmtool.io import read_json_object

STREAMS = "streams.json"
FORMAT = 1


@dataclass
class RunInfo:
    """What a run folder says about its model, besides the weights and the `TrainConfig`.

    Attributes:
        run: the run folder.
        checkpoint: the checkpoint folder loaded.
        step: its optimizer step.
        streams: the model's input streams (`TokenIndex.streams` of the run's data at train time).
        folders: one record per `--data` entry, in order: path (as trained; it may no longer exist),
            name, source (the preprocessing source's name), sources, modalities, weight, preprocess
            (the manifest's `source` block: name, options, split, max_samples).
        splits: the `split` values pretraining read (config.json `splits`); None: every row.
        upgraded: True when this load wrote streams.json for an old run.
    """

    run: Path
    checkpoint: Path
    step: int
    streams: list[Stream]
    folders: list[dict[str, Any]] = field(default_factory=list)
    splits: list[str] | None = None
    upgraded: bool = False


def folder_records(folders: list[Any], data: list[str]) -> list[dict[str, Any]]:
    """JSON records of a loader's folders (`TokenIndex.folders`) beside their `--data` entries."""
    from mmtool.data.mixture import parse_data_specs
    from mmtool.data.shards import content_sha256

    specs = parse_data_specs(list(data))
    records = []
    for i, f in enumerate(folders):
        manifest = f.manifest
        records.append({
            "path": str(f.path), "name": f.name,
            "source": (manifest.get("source") or {}).get("name", f.name),
            "sources": sorted(manifest.get("sources", {})),
            "modalities": sorted(manifest.get("modalities", {})),
            "weight": specs[i].weight if i < len(specs) else None,
            "preprocess": manifest.get("source") or {},
            "content_sha256": content_sha256(manifest)})
    return records


def write_streams(run: str | Path, streams: list[Stream], folders: list[dict[str, Any]]) -> Path:
    """Writes RUN/streams.json atomically; returns its path."""
    path = Path(run) / STREAMS
    atomic_write_json(path, {"format": FORMAT, "streams": [dataclasses.asdict(s) for s in streams],
                             "folders": folders})
    return path


def read_config_doc(run: str | Path) -> dict[str, Any]:
    """RUN/config.json as a JSON object (settings plus `amendments`, see `mmtool.train.resume`).

    Raises:
        MMToolError: not a run folder, or a config.json that is torn, not JSON or not an object.
    """
    run = Path(run)
    path = run / "config.json"
    if not path.is_file():
        raise MMToolError(f"{run}: not a training run (no config.json; give a `mmtool train --out` folder)")
    doc = read_json_object(path)
    if doc is None:
        raise MMToolError(f"{path}: not a JSON object (torn or edited); restore it from the newest "
                          "checkpoint's state.json `config`")
    return doc


def read_config(run: str | Path) -> Any:
    """The run's `TrainConfig` (its current settings, amendments applied), from RUN/config.json alone.

    Raises:
        MMToolError: not a run folder, or a config.json that does not parse.
    """
    from mmtool.config import from_dict
    from mmtool.train import TrainConfig

    path = Path(run) / "config.json"
    doc = {k: v for k, v in read_config_doc(run).items() if k != "amendments"}
    try:
        return from_dict(TrainConfig, doc)
    except (ValueError, TypeError, MMToolError) as exc:
        raise MMToolError(f"{path}: cannot be read as a training config ({exc})") from None


def _upgrade(run: Path, cfg: Any) -> dict[str, Any]:
    """Writes streams.json of a run trained before it existed, from its data (the Loader path)."""
    from mmtool.data.loader import Loader
    from mmtool.data.mixture import parse_data_specs

    try:
        missing = [str(s.path) for s in parse_data_specs(list(cfg.data))
                   if not (Path(s.path) / "manifest.json").is_file()]
    except MMToolError as exc:
        missing = [f"{', '.join(map(str, cfg.data))} ({exc})"]
    if missing or not cfg.data:
        raise MMToolError(
            f"{run}: has no {STREAMS} (trained before mmtool stored its streams) and its data "
            f"{', '.join(missing) or '(none in config.json)'} is gone; put the preprocessed folder(s) back "
            f"at that path once and rerun (the run is then upgraded and needs its data no more)")
    loader = Loader(cfg.loader_config(0, 1, pin=False))
    try:
        write_streams(run, loader.index.streams, folder_records(loader.index.folders, cfg.data))
    finally:
        loader.close()
    return json.loads((run / STREAMS).read_text(encoding="utf-8"))


def read_streams(run: str | Path, cfg: Any = None) -> tuple[list[Stream], list[dict[str, Any]], bool]:
    """(streams, folder records, upgraded) of a run; an old run is upgraded when its data exists.

    Raises:
        MMToolError: no streams.json and no data to rebuild it from, or a corrupt streams.json.
    """
    run = Path(run)
    path = run / STREAMS
    upgraded = False
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise MMToolError(f"{path}: corrupt ({exc}); delete it to rebuild it from the data") from None
    else:
        doc, upgraded = _upgrade(run, cfg if cfg is not None else read_config(run)), True
    if doc.get("format") != FORMAT or not isinstance(doc.get("streams"), list):
        raise MMToolError(f"{path}: format {doc.get('format')!r} is not one this mmtool reads ({FORMAT})")
    try:
        streams = [Stream(**s) for s in doc["streams"]]
    except TypeError as exc:
        raise MMToolError(f"{path}: a stream record does not fit ({exc})") from None
    return streams, list(doc.get("folders", [])), upgraded


def checkpoint_at(run: str | Path, step: int | None = None) -> Path:
    """The checkpoint folder of `step` (None: the newest).

    Raises:
        MMToolError: no checkpoint yet, or none at `step` (naming the steps there are).
    """
    from mmtool.train import checkpoint

    run = Path(run)
    ckpts = checkpoint.list_checkpoints(run)
    if not ckpts:
        raise MMToolError(f"{run}: has no checkpoint yet")
    if step is None:
        return ckpts[-1]
    hit = [c for c in ckpts if int(c.name.split("-")[1]) == step]
    if not hit:
        have = ", ".join(str(int(c.name.split("-")[1])) for c in ckpts)
        raise MMToolError(f"--step {step}: {run} has no checkpoint at that step (it has {have})")
    return hit[0]


def model_state(ckpt: Path) -> dict[str, Any]:
    """The model weights of a checkpoint folder, integrity-checked (`checkpoint.read_state`: shape,
    digest, step; then the weights' sha256). The optimizer is not read.

    Raises:
        MMToolError: a missing, edited or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmtool.train import checkpoint

    file = checkpoint.check_file(ckpt, checkpoint.read_state(ckpt), "model.safetensors")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise MMToolError(f"checkpoint {ckpt}: cannot read tensors ({exc})") from None


def load_model(run: str | Path, step: int | None = None, device: str = "cpu") -> tuple[Any, Any, RunInfo]:
    """Rebuilds a trained model from its run folder alone: (model in eval mode, TrainConfig, RunInfo).

    No data folder is opened (for runs with streams.json): the streams come from RUN/streams.json,
    the architecture from RUN/config.json, the weights from the checkpoint.

    Args:
        run: a `mmtool train --out` folder.
        step: the checkpoint's step (None: the newest).
        device: where the model goes.

    Raises:
        MMToolError: not a run, no checkpoint (at `step`), an old run whose data is gone, or
            weights that do not fit the model.
    """
    from mmtool.models.model import build_model

    run = Path(run)
    if not run.is_dir():
        raise MMToolError(f"RUN {run}: no such folder (give a `mmtool train --out` folder)")
    cfg = read_config(run)
    ckpt = checkpoint_at(run, step)
    streams, folders, upgraded = read_streams(run, cfg)
    model = build_model(cfg.model, streams)
    try:
        model.load_state_dict(model_state(ckpt))
    except RuntimeError as exc:
        raise MMToolError(f"checkpoint {ckpt} does not fit its run's model: {exc}") from None
    info = RunInfo(run, ckpt, int(ckpt.name.split("-")[1]), streams, folders,
                   [str(s) for s in cfg.splits] if _has_splits(run) else None, upgraded)
    return model.to(device).eval(), cfg, info


def _has_splits(run: Path) -> bool:
    """Whether config.json records `splits` (runs before held-out splits read every row)."""
    return isinstance((read_json_object(run / "config.json") or {}).get("splits"), list)


def untrained_twin(run_cfg: Any, streams: list[Stream], device: Any = "cpu") -> Any:
    """The run's model as `mmtool train` builds it before step 1 (the same architecture and initial
    weights): `torch.manual_seed(run_cfg.seed); build_model(run_cfg.model, streams)`. The global
    torch RNG is restored afterwards."""
    import torch

    from mmtool.models.model import build_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(run_cfg.seed)
        twin = build_model(run_cfg.model, streams)
    finally:
        torch.random.set_rng_state(state)
    return twin.to(device).eval()
