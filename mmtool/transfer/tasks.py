"""Downstream tasks: labelled samples of chosen modalities, split by seed, in a checkpoint's streams.

A task names a source, the modalities the model sees by default, how a sample gets its class, and
(when the pretraining makes it meaningful) a text prompt per class for zero-shot scoring.

Decisions (the "why"):

* **Inputs are restricted by dropping segments.** `--modalities image` removes every other
  modality's segments from each sample *before* layout, and the samples are then laid out exactly as
  `TokenIndex` lays out any sample (a trajectory that loses its actions becomes a plain observation
  segment). The model therefore never receives a token of a dropped modality — no masking trick
  that attention or position embeddings could see through. The restricted samples are written to
  `OUT/data/task-*` (one shard + manifest) so that what was evaluated can be inspected.
* **Default inputs avoid label leaks.** The digits caption literally names the digit ("a handwritten
  seven") and the spoken-digits transcript *is* the word, so those tasks default to image only and
  audio only; a return-prediction task drops rewards (their sum is the return).
* **The checkpoint's streams, never new ones.** The task folder is indexed with the run's stream
  list (`ModelStreamIndex`), so stream numbers mean the same encoders; a task stream the checkpoint
  never saw, or tokenized with other settings, is refused by name.
* **Task token.** The model adds a learned vector per pretraining data folder. A task reuses the
  vector of the run's folder of the same source; a new source takes the run folder that shares the
  most modalities with it (recorded as `task_token` in the report).
* **Held out from pretraining.** A task that reuses a folder the run pretrained on (`digits`,
  `spoken-digits`, `label:DIR` of a run folder) keeps only the rows pretraining never read: those
  whose `split` column is not in the run's `splits` (`config.json`; a run without that key read every
  row). Pretraining saw these inputs' siblings, never these inputs. When no row is held out (an old
  run, or `splits` covering every split) the task uses every row, says so in `pretraining_saw`, and
  adds a note; `held_out=False` forces that.
* **Splits.** A seeded, stratified 60/20/20 split of the task's samples (every class in every
  split), independent of the preprocessing hash split, recorded with its sizes and a digest of the
  test ids. Binned regression targets split unstratified and take their bin edges from the
  training part only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtool.data import shards as store
from mmtool.data.index import RunStreamIndex, Stream, TokenIndex
from mmtool.data.schema import SCHEMA_VERSION, Sample, Segment, rows_to_samples, samples_to_batch
from mmtool.data.sources.digits import DIGIT_WORDS
from mmtool.data.tokenizers import build_tokenizer
from mmtool.errors import MMToolError
from mmtool.registry import Registry

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
"""train / validation / test shares of each class."""


@dataclass(frozen=True)
class Task:
    """A registered downstream task (see the module docstring)."""

    source: str
    """The source whose samples the task uses (`mmtool ls sources`)."""
    modalities: tuple[str, ...]
    """Modalities the model sees unless `--modalities` says otherwise."""
    classes: tuple[str, ...]
    """Class names, in label order."""
    prompt: str | None = None
    """Zero-shot text of a class, `{}` replaced by its name; None: zero-shot does not apply."""
    no_prompt: str = "the task has no text that names its classes"
    """Why zero-shot does not apply (when `prompt` is None)."""
    options: tuple[str, ...] = ()
    """Source options when the task preprocesses its own data."""
    reuse_run: bool = True
    """Use the run's own folder of `source` when it has one (same records as pretraining)."""
    target: str = "label"
    """"label" (the row's label) or a `meta` key holding a number to bin into `len(classes)` classes."""


TASKS: Registry[Task] = Registry("tasks", "downstream tasks of eval-transfer (`--task NAME`, or `label:DIR`)")

TASKS.add("digits", Task("digits", ("image",), DIGIT_WORDS, prompt="a handwritten {}"),
          "digits images → digit 0-9 (image only: the caption names the digit); zero-shot by caption")
TASKS.add("spoken-digits", Task("spoken-digits", ("audio",), DIGIT_WORDS, prompt="{}"),
          "spoken-digits clips → word 0-9 (audio only: the transcript is the word); zero-shot by transcript")
for _env in ("pendulum", "acrobot"):
    TASKS.add(f"{_env}-return", Task(
        _env, ("observation",), ("return q1 (lowest)", "return q2", "return q3", "return q4 (highest)"),
        no_prompt="no text describes episode returns", options=("episodes=300", "seed=100000"),
        reuse_run=False, target="episode_return"),
        f"held-out {_env} episodes (seed 100000+) → quartile of the episode return, from observations "
        "only (rewards sum to the answer)")


@dataclass
class RunData:
    """What a task needs to know about the pretraining run."""

    streams: list[Stream]
    folders: list[dict[str, Any]]  # {"path", "name", "source", "modalities"} per run data folder
    splits: list[str] | None = None
    """The `split` values of the rows pretraining read (config.json `splits`); None: every row."""


@dataclass
class TaskData:
    """A prepared task: its restricted samples indexed in the checkpoint's streams, labels, split."""

    name: str
    index: TokenIndex
    labels: np.ndarray  # int64 [N] class of each sample (index order)
    splits: dict[str, np.ndarray]  # split name → int64 sample numbers
    classes: list[str]
    modalities: list[str]
    info: dict[str, Any]  # JSON-ready: folders, split record, task token, notes
    zeroshot_index: TokenIndex | None = None  # (validation, then test samples) × classes' prompts
    prompt_index: TokenIndex | None = None  # one text-only sample per class: its prompt
    zeroshot_reason: str = ""  # why zero-shot does not apply ("" when it does)
    notes: list[str] = field(default_factory=list)

    @property
    def chance(self) -> float:
        """Accuracy of always answering the test split's most frequent class."""
        test = self.labels[self.splits["test"]]
        return float(np.bincount(test).max() / len(test))


class ModelStreamIndex(RunStreamIndex):
    """A `TokenIndex` over task folders whose stream list is a checkpoint's (same numbers, same encoders).

    Raises:
        MMToolError: a stream of the folders that the checkpoint never saw or tokenized differently.
    """

    def __init__(self, folders: list[Path], streams: list[Stream], task: str):
        self._task = task
        super().__init__(folders, streams)

    def unknown_stream(self, stream: Stream, known: str) -> str:
        return (f"task {self._task}: its {stream.modality} input ({stream.key}) is a stream the checkpoint "
                f"never saw (it knows {known}); pick --modalities it knows or pretrain on {stream.modality}")

    def retokenized(self, stream: Stream, trained: Stream) -> str:
        return (f"task {self._task}: {stream.key} is tokenized with other settings than in pretraining "
                f"({stream.config} vs {trained.config}); preprocess the task's source with the run's "
                "--tokenizer options")


# -- resolving the data ------------------------------------------------------------------------
def _source_folder(name: str, task: Task, run: RunData, out: Path) -> tuple[Path, str]:
    """(a preprocessed folder of the task's source, how it relates to pretraining: "run" (a folder
    the run pretrained on), "other records" (same source, other records) or "no")."""
    mine = [f for f in run.folders if f["source"] == task.source] if task.reuse_run else []
    for f in mine:
        if (Path(f["path"]) / store.MANIFEST).is_file():
            return Path(f["path"]), "run"
    from mmtool.data.preprocess import PreprocessConfig, preprocess

    tag = hashlib.sha1(json.dumps(task.options).encode()).hexdigest()[:8] if task.options else "default"
    folder = out / "data" / f"{task.source}-{tag}"
    preprocess(PreprocessConfig(task.source, folder, options=list(task.options), num_proc=1))
    # The run's own folder is gone (a moved run): the same source made the same way holds the same
    # records, so pretraining's splits still say which rows it read.
    made = store.load_manifest(folder).get("source") or {}
    if any(f.get("preprocess") and f["preprocess"] == made for f in mine):
        return folder, "run"
    seen = any(f["source"] == task.source for f in run.folders)
    return folder, ("this source, other records" if seen else "no")


def _label_dir_folder(spec: str, run: RunData) -> tuple[Path, str]:
    folder = Path(spec.split(":", 1)[1])
    store.load_manifest(folder)  # clear error when it is not a preprocessed folder
    seen = any(Path(f["path"]).resolve() == folder.resolve() for f in run.folders)
    return folder, ("run" if seen else "no")


def held_out_rows(samples: list[Sample], run: RunData, folder: Path,
                  held_out: bool) -> tuple[list[Sample], str, list[str]]:
    """The rows of a folder the run pretrained on that a task may use: (samples, what pretraining
    saw of them, notes). Only rows whose split pretraining did not read, when there are any."""
    if held_out and run.splits is not None:
        kept = [s for s in samples if s.split not in run.splits]
        if kept:
            names = "+".join(sorted({s.split for s in kept}))
            return kept, (f"no: held-out rows (split {names} of the run's folder, never read in "
                          "pretraining)"), []
    why = ("held-out rows not requested (--all-rows)" if not held_out else
           "the run's config.json has no `splits` (a run before held-out splits read every row)"
           if run.splits is None else f"pretraining read splits {'+'.join(run.splits)}, i.e. every row")
    return samples, "yes: these samples (the run's own folder, read in full by pretraining; labels were " \
        "never used)", [f"pretraining saw every input of {folder} ({why}): the transfer test is not " \
                        "held out; pretrain with fewer --splits for a held-out one"]


def resolve_task(spec: str) -> Task | None:
    """The registered task `spec`, or None for `label:DIR` (raises for unknown names)."""
    if spec.startswith("label:"):
        if not spec[6:]:
            raise MMToolError("--task label:DIR needs a preprocessed folder after 'label:'")
        return None
    return TASKS.get(spec)


def stratified_split(labels: np.ndarray, seed: int,
                     fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> np.ndarray:
    """Split name of each sample: per class, a seeded permutation cut by `fractions` (≥1 per split)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = max(int(round(n * fractions[1])), 1)
        n_test = max(int(round(n * fractions[2])), 1)
        out[idx[:n - n_val - n_test]] = "train"
        out[idx[n - n_val - n_test:n - n_test]] = "validation"
        out[idx[n - n_test:]] = "test"
    return out


def _restrict(sample: Sample, keep: set[str]) -> list[Segment]:
    return [g for g in sample.segments if g.modality in keep]


def _write_folder(path: Path, samples: list[Sample], tokenizers: dict[str, Any],
                  derived_from: str) -> Path:
    """Writes samples as one shard plus a manifest that `TokenIndex` reads (atomic files)."""
    path.mkdir(parents=True, exist_ok=True)
    shard = store.write_shard(path / "shard-00000.arrow", [samples_to_batch(samples)])
    mods = {g.modality for s in samples for g in s.segments}
    store.atomic_write_json(path / store.MANIFEST, {
        "schema_version": SCHEMA_VERSION, "derived_from": derived_from, "rows": len(samples),
        "records": len(samples), "rejected": 0,
        "tokenizers": {k: v for k, v in tokenizers.items() if k.split("/")[0] in mods},
        "shards": [shard]})
    return path


def _task_token(run: RunData, source: str, modalities: list[str]) -> int:
    for i, f in enumerate(run.folders):
        if f["source"] == source:
            return i
    overlap = [len(set(f["modalities"]) & set(modalities)) for f in run.folders]
    return int(np.argmax(overlap))


def _bin(values: np.ndarray, train: np.ndarray, n: int) -> tuple[np.ndarray, list[float]]:
    edges = np.quantile(values[train], np.linspace(0, 1, n + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64), [float(e) for e in edges]


def _targets(spec: str, folder: Path, samples: list[Sample], target: str,
             notes: list[str]) -> tuple[list[Sample], np.ndarray]:
    """The samples that have the task's target, and the raw targets (class labels or a meta value)."""
    if target == "label":
        kept = [s for s in samples if s.label is not None and s.label >= 0]
        if not kept:
            raise MMToolError(f"task {spec}: {folder} has no labelled samples (the label column is empty)")
        if len(kept) < len(samples):
            notes.append(f"{len(samples) - len(kept)} samples without a label left out")
        return kept, np.asarray([s.label for s in kept], np.int64)
    kept = [s for s in samples if target in s.meta]
    return kept, np.asarray([s.meta[target] for s in kept], np.float64)


def _inputs(spec: str, task: Task | None, have: list[str], modalities: list[str] | None,
            notes: list[str]) -> list[str]:
    """The input modalities: the requested (or the task's default) ones that the data has."""
    default = list(task.modalities) if task else have
    wanted = list(modalities) if modalities else default
    used = [m for m in wanted if m in have]
    if not used:
        raise MMToolError(f"task {spec}: none of --modalities {','.join(wanted)} is in its data "
                          f"(it has {', '.join(have)})")
    if len(used) < len(wanted):
        notes.append(f"--modalities {', '.join(m for m in wanted if m not in have)}: not in this task's data")
    if task is None and not modalities:
        notes.append("inputs: every modality of the folder; drop any that names the label with --modalities")
    return used


def _labels_and_split(spec: str, task: Task | None, samples: list[Sample], raw: np.ndarray, target: str,
                      seed: int, notes: list[str]):
    """(samples, split name per sample, labels, bin edges or None, class names): classes with fewer
    than 3 samples left out, a stratified split; a continuous target binned on the train split."""
    if target != "label":
        split = stratified_split(np.zeros(len(raw), np.int64), seed)
        labels, edges = _bin(raw, split == "train", len(task.classes))
        return samples, split, labels, edges, list(task.classes)
    counts = np.bincount(raw)
    rare = [c for c in np.flatnonzero(counts) if counts[c] < 3]
    if rare:
        notes.append(f"classes {rare} have fewer than 3 samples and are left out")
        ok = ~np.isin(raw, rare)
        samples, raw = [s for s, k in zip(samples, ok) if k], raw[ok]
    if len(np.unique(raw)) < 2:
        raise MMToolError(f"task {spec}: needs at least two classes with 3+ samples each")
    names = list(task.classes) if task else [str(c) for c in range(int(raw.max()) + 1)]
    return samples, stratified_split(raw, seed), raw, None, names


def prepare_task(spec: str, run: RunData, out: Path, seed: int, modalities: list[str] | None,
                 zeroshot: bool, held_out: bool = True) -> TaskData:
    """Reads, labels, splits and restricts task `spec`, and indexes it in the checkpoint's streams.

    Args:
        spec: a registered task name or `label:DIR`.
        run: the pretraining run's streams and folders.
        out: eval-transfer output folder (task data goes to `out/data/`).
        seed: split seed.
        modalities: the `--modalities` restriction (None: the task's default).
        zeroshot: also build the zero-shot candidates (test samples × class prompts, and each
            class prompt alone).
        held_out: on a folder the run pretrained on, use only the rows pretraining did not read
            (when there are any; see `held_out_rows`).
    """
    task = resolve_task(spec)
    if task is None:
        folder, seen = _label_dir_folder(spec, run)
    else:
        folder, seen = _source_folder(spec, task, run, out)
    manifest = store.load_manifest(folder)
    source = (manifest.get("source") or {}).get("name", folder.name)
    samples = rows_to_samples(store.read_folder(folder))
    notes: list[str] = []
    n_folder = len(samples)
    if seen == "run":
        samples, seen, more = held_out_rows(samples, run, folder, held_out)
        notes += more
    have = sorted({g.modality for s in samples for g in s.segments})

    target = task.target if task else "label"
    samples, raw = _targets(spec, folder, samples, target, notes)
    used = _inputs(spec, task, have, modalities, notes)
    samples, split, labels, edges, names = _labels_and_split(spec, task, samples, raw, target, seed, notes)
    for s, name in zip(samples, split):
        s.split = name

    restricted = [Sample(s.id, s.source, s.task, s.split, _restrict(s, set(used)), int(y), {})
                  for s, y in zip(samples, labels)]
    tag = "-".join(used)
    safe = spec.replace(":", "_").replace("/", "_").strip("_")
    derived = _write_folder(out / "data" / f"task-{safe}-{tag}", restricted, manifest.get("tokenizers", {}),
                            str(folder))
    index = ModelStreamIndex([derived], run.streams, spec)
    token = _task_token(run, source, used)
    index.sample_folder[:] = token  # every sample gets the task token of that run folder
    splits = {name: np.flatnonzero(split == name).astype(np.int64) for name in ("train", "validation", "test")}
    test_ids = [s.id for s in samples if s.split == "test"]
    info = {
        "task": spec, "source": source, "source_folder": str(folder), "task_folder": str(derived),
        "modalities": used, "classes": names, "pretraining_saw": seen,
        "rows": {"folder": n_folder, "used": len(samples)},
        "task_token": run.folders[token]["name"] if run.folders else None,
        "split": {"seed": seed, "fractions": list(SPLIT_FRACTIONS), "stratified": target == "label",
                  "sizes": {k: int(len(v)) for k, v in splits.items()},
                  "per_class": {k: np.bincount(labels[v], minlength=len(names)).tolist()
                                for k, v in splits.items()},
                  "test_ids_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest()},
    }
    if edges is not None:
        info["bins"] = {"target": target, "edges": edges, "from": "train split quantiles"}
    data = TaskData(spec, index, labels, splits, names, used, info, notes=notes)
    if zeroshot:
        _zeroshot(data, task, samples, manifest, run, out / "data" / f"task-{safe}-{tag}-zeroshot",
                  set(used), token)
    return data


# -- zero-shot candidates ------------------------------------------------------------------------
def _text_tokenizer(manifest: dict[str, Any]):
    for key, conf in manifest.get("tokenizers", {}).items():
        if key.split("/")[0] == "text":
            from mmtool.data.tokenizers import TOKENIZERS

            params = inspect.signature(TOKENIZERS.get(conf["name"]).__init__).parameters
            cls_args = {k: v for k, v in conf.items() if k in params and k != "self"}
            return build_tokenizer(conf["name"], **cls_args)
    return None


def _zeroshot(data: TaskData, task: Task | None, samples: list[Sample], manifest: dict[str, Any],
              run: RunData, path: Path, keep: set[str], token: int) -> None:
    """Builds the zero-shot candidates: each validation and test sample once per class, its text
    replaced by the class prompt (in split order, then sample order, then class order) for the
    likelihood rule; and each class prompt alone, as a text-only sample, for the similarity rule."""
    if task is None or task.prompt is None:
        data.zeroshot_reason = task.no_prompt if task else "label:DIR tasks have no class prompts"
        return
    tokenizer = _text_tokenizer(manifest)
    has_text = any(g.modality == "text" for s in samples for g in s.segments)
    if tokenizer is None or not has_text or not any(s.modality == "text" for s in run.streams):
        data.zeroshot_reason = "needs a text stream in both the task data and the checkpoint"
        return
    prompts = [tokenizer.encode(task.prompt.format(c), "prompt") for c in data.classes]
    # Tokens before the first one where the prompts differ have the same context in every candidate
    # of an input (attention is causal), so they score alike and cannot change the ranking.
    shared = 0
    while all(len(p.ids) > shared + 1 and p.ids[shared] == prompts[0].ids[shared] for p in prompts):
        shared += 1
    rows = []  # validation inputs first (their mean score per prompt calibrates), then test inputs
    for s in sorted(samples, key=lambda s: s.split != "validation"):
        if s.split not in ("validation", "test"):
            continue
        for c, p in enumerate(prompts):
            segs = [Segment(g.modality, g.role, g.tokenizer, p.shape, ids=p.ids) if g.modality == "text"
                    else g for g in s.segments if g.modality == "text" or g.modality in keep]
            rows.append(Sample(f"{s.id}/{c}", s.source, s.task, s.split, segs, c, {}))
    folder = _write_folder(path, rows, manifest.get("tokenizers", {}), data.info["source_folder"])
    data.zeroshot_index = ModelStreamIndex([folder], run.streams, data.name)
    data.zeroshot_index.sample_folder[:] = token
    # Each prompt alone, as a text-only sample (what similarity zero-shot embeds).
    text = next(g for s in samples for g in s.segments if g.modality == "text")  # a caption's role
    alone = [Sample(f"prompt/{c}", samples[0].source, "prompt", "test",
                    [Segment("text", text.role, text.tokenizer, p.shape, ids=p.ids)], c, {})
             for c, p in enumerate(prompts)]
    folder = _write_folder(path.with_name(path.name + "-prompts"), alone, manifest.get("tokenizers", {}),
                           data.info["source_folder"])
    data.prompt_index = ModelStreamIndex([folder], run.streams, data.name)
    data.prompt_index.sample_folder[:] = token
    data.info["zeroshot_prompt"] = task.prompt
    data.info["zeroshot_shared_prefix_tokens"] = shared
