"""`mmtool export`: a trained run as a self-contained model folder, and `load_pretrained` to read it.

    DIR/model.safetensors   the model's state_dict (safetensors; nothing is pickled)
    DIR/config.json         {"model_type": "mmtool", "format", "mmtool_version", "model": the
                            ModelConfig, "streams": [Stream fields], "folders": the pretraining
                            mixture (name, source, modalities, weight), "training": run, step,
                            seed, steps, splits, data, objectives}: everything to rebuild the model
    DIR/README.md           a model card (Hugging Face card format: YAML front matter + markdown)

The file names are huggingface_hub's `from_pretrained` conventions (`constants.SAFETENSORS_SINGLE_FILE`,
`CONFIG_NAME`), so the folder uploads to the Hub as is (`huggingface_hub.upload_folder`) and a
downloaded snapshot (`snapshot_download`) loads with `load_pretrained`. `PyTorchModelHubMixin` itself
is not used: its `from_pretrained` calls `cls(**config)`, but the model is built by a function of
(ModelConfig, streams) (`build_model`), and it would return no tokenizers; subclassing the model
to take JSON kwargs would tie `mmtool.models` to the Hub library for no gain over this reader.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtool import folders
from mmtool.errors import MMToolError
from mmtool.io import read_json_object

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FORMAT = 1


@dataclass
class Pretrained:
    """An exported model ready for plain PyTorch.

    Attributes:
        model: the `UnifiedModel` (`nn.Module`), in eval mode.
        tokenizers: stream key → the `Tokenizer` that makes that stream's tokens from raw data
            (`tokenizer.encode(raw, role)`); separators have none.
        config: the folder's config.json.
    """

    model: Any
    tokenizers: dict[str, Any]
    config: dict[str, Any]

    def __iter__(self):  # `model, tokenizers = load_pretrained(DIR)`
        return iter((self.model, self.tokenizers))

    def batch(self, rows: list[dict[str, Any]]) -> Any:
        """One packed `Batch` of raw samples in the model's stream numbering, on the model's device.

        Args:
            rows: one dict per sample, `{modality or "modality/role": raw value}` in input order
                (a text string, an image array, ...: what that modality's tokenizer's `encode`
                takes), e.g. `[{"image": pixels, "text/caption": "a handwritten seven"}]`.

        Raises:
            MMToolError: a modality the model has no tokenizer for.
        """
        import tempfile

        import numpy as np

        from mmtool.data import shards as store
        from mmtool.data.batching import assemble
        from mmtool.data.schema import SCHEMA_VERSION, Sample, samples_to_batch
        from mmtool.transfer.tasks import ModelStreamIndex

        by_modality = {t.modality: t for t in self.tokenizers.values()}
        samples, configs = [], {}
        for i, row in enumerate(rows):
            segments = []
            for key, raw in row.items():
                modality, _, role = key.partition("/")
                if modality not in by_modality:
                    raise MMToolError(f"sample {i}: the model has no {modality} input "
                                      f"(it has {', '.join(sorted(by_modality))})")
                tok = by_modality[modality]
                segments.append(tok.encode(raw, role or modality))
                configs[f"{modality}/{role or modality}"] = {"name": tok.registry_name, **tok.config()}
            samples.append(Sample(f"sample-{i}", "input", "input", "test", segments))
        with tempfile.TemporaryDirectory(prefix="mmtool-batch-") as tmp:
            shard = store.write_shard(Path(tmp) / "shard-00000.arrow", [samples_to_batch(samples)])
            store.atomic_write_json(Path(tmp) / store.MANIFEST, {
                "schema_version": SCHEMA_VERSION, "tokenizers": configs, "shards": [shard]})
            index = ModelStreamIndex([Path(tmp)], list(self.model.streams), "load_pretrained")
            batch = assemble(index, np.arange(len(samples)), "packed")
        return batch.to(next(self.model.parameters()).device)


def export(run: str | Path, out: str | Path, step: int | None = None) -> dict[str, Any]:
    """Writes the export folder `out` from the run's checkpoint; returns its config.json contents.

    Raises:
        MMToolError: a run that does not load (see `rundir.load_model`), or an `out` that holds
            something other than an earlier export or is being written by another process
            (`mmtool.folders`: ownership marker and lock).
    """
    from safetensors.torch import save_file

    from mmtool import __version__
    from mmtool.config import to_dict
    from mmtool.data.shards import atomic_write_json
    from mmtool.train.rundir import load_model

    run, out = Path(run), Path(out)
    folders.inspect(out, "export")  # refuse a foreign --out before loading the model
    model, cfg, info = load_model(run, step=step)
    with folders.writer(out, "export"):
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "mmtool_version": __version__})
        doc = {"model_type": "mmtool", "format": FORMAT, "mmtool_version": __version__,
               "model": to_dict(cfg.model), "streams": [dataclasses.asdict(s) for s in info.streams],
               "folders": [{k: f.get(k) for k in ("name", "source", "modalities", "weight")}
                           for f in info.folders],
               "parameters": model.num_parameters(),
               "training": {"run": str(run), "step": info.step, "max_steps": cfg.max_steps,
                            "seed": cfg.seed, "splits": info.splits, "data": [str(d) for d in cfg.data],
                            "lr": cfg.lr, "strategy": cfg.strategy, "mix_by": cfg.mix_by}}
        atomic_write_json(out / CONFIG, doc)
        (out / CARD).write_text(model_card(doc, _transfer_report(run)), encoding="utf-8")
    return doc


def _is_export(folder: Path) -> bool:
    return (read_json_object(folder / CONFIG) or {}).get("model_type") == "mmtool"


def _transfer_report(run: Path) -> dict[str, Any] | None:
    """RUN/transfer/report.json (eval-transfer's default place), when the run has one."""
    path = run / "transfer" / "report.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _objectives(model: dict[str, Any], folders: list[dict[str, Any]]) -> list[str]:
    lines = ["- run-wide: " + ", ".join(f"`{k}` × {v:g}" for k, v in model.get("objectives", {}).items())]
    for folder, objs in zip(folders, model.get("folder_objectives") or []):
        if objs:
            lines.append(f"- `{folder['name']}`: " + ", ".join(f"`{k}` × {v:g}" for k, v in objs.items()))
    return lines


def _transfer_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Transfer (`mmtool eval-transfer`, pretrained vs the same model from scratch)", "",
             "| task | protocol | setting | pretrained | scratch | gain [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|"]
    for task, entry in report.get("tasks", {}).items():
        for proto, res in entry.get("results", {}).items():
            for row in res.get("rows", []):
                lo, hi = row.get("gain_ci95") or (float("nan"), float("nan"))
                lines.append(f"| {task} | {proto} | {row.get('setting', '')} | {row['pretrained']:.3f} | "
                             f"{row['scratch']:.3f} | {row['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                             f"{row.get('verdict', '')} |")
    lines.append(f"\nFrom the run's `transfer/report.json` (checkpoint step {report.get('step')}, seed "
                 f"{report.get('seed')}).")
    return lines


def model_card(doc: dict[str, Any], transfer: dict[str, Any] | None) -> str:
    """The export's README.md: what the model is, what it saw, how it was trained, how it transfers."""
    model, train, folders = doc["model"], doc["training"], doc["folders"]
    modalities = sorted({s["modality"] for s in doc["streams"] if s["kind"] != "none"})
    front = ["---", "library_name: mmtool", "tags:", "- multimodal", *[f"- {m}" for m in modalities], "---"]
    lines = [*front, "", f"# mmtool model: {model['size']}, {model['fusion']} fusion", "",
             f"A unified multi-modal transformer trained self-supervised with mmtool {doc['mmtool_version']} "
             f"(run `{train['run']}`, checkpoint step {train['step']} of {train['max_steps']}; "
             f"{doc['parameters']:,} parameters).", "", "## Pretraining data", "",
             "| folder | source | modalities | weight |", "|---|---|---|---|",
             *[f"| {f['name']} | {f['source']} | {', '.join(f['modalities'])} | "
               f"{'—' if f.get('weight') is None else f['weight']} |" for f in folders], "",
             f"Rows read: splits {', '.join(train['splits']) if train['splits'] else 'all'}; "
             f"mixture weights are shares of {train.get('mix_by') or 'tokens'}.", "",
             "## Objectives", "", *_objectives(model, folders), "", "## Architecture", "",
             f"- size `{model['size']}`, fusion `{model['fusion']}`"
             + (f" at layer {model['fusion_layer']}" if model['fusion'] == "mid" else ""),
             "- input streams: " + ", ".join(f"`{s['key']}`" for s in doc["streams"]),
             f"- steps {train['step']}, peak lr {train['lr']}, seed {train['seed']}, batching `{train['strategy']}`"]
    if transfer:
        lines += _transfer_lines(transfer)
    lines += ["", "## Use", "", "```python", "import mmtool", "",
              "model, tokenizers = mmtool.load_pretrained(\"THIS_FOLDER\")  # nn.Module + stream key → Tokenizer",
              "```", ""]
    return "\n".join(lines)


def _tokenizer(config: dict[str, Any]) -> Any:
    """The tokenizer a stream's config names, built through the tokenizer registry."""
    from mmtool.data.tokenizers import TOKENIZERS, build_tokenizer

    cls = TOKENIZERS.get(config["name"])
    accepted = inspect.signature(cls.__init__).parameters
    return build_tokenizer(config["name"], **{k: v for k, v in config.items() if k != "name" and k in accepted})


def load_pretrained(folder: str | Path, device: str = "cpu") -> Pretrained:
    """Loads an `mmtool export` folder: the model (eval mode) and the tokenizers to feed it.

    Args:
        folder: the export folder (or a Hub snapshot of one, `huggingface_hub.snapshot_download`).
        device: where the model goes.

    Raises:
        MMToolError: not an export folder, or weights that do not fit the config.
    """
    from safetensors.torch import load_file

    from mmtool.config import from_dict
    from mmtool.data.index import Stream
    from mmtool.models.model import ModelConfig, build_model

    folder = Path(folder)
    if not _is_export(folder) or not (folder / WEIGHTS).is_file():
        raise MMToolError(f"{folder}: not an mmtool export (needs config.json with model_type "
                          f"'mmtool' and {WEIGHTS}; make one with `mmtool export RUN --out DIR`)")
    doc = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise MMToolError(f"{folder / CONFIG}: format {doc.get('format')!r}, this mmtool reads {FORMAT}")
    streams = [Stream(**s) for s in doc["streams"]]
    model = build_model(from_dict(ModelConfig, doc["model"]), streams)
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as exc:
        raise MMToolError(f"{folder / WEIGHTS} does not fit {folder / CONFIG}: {exc}") from None
    tokenizers = {s.key: _tokenizer(s.config) for s in streams if s.kind != "none" and s.config.get("name")}
    return Pretrained(model.to(device).eval(), tokenizers, doc)
