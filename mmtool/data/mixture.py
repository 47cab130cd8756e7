"""The mixture: which samples of which folders an epoch visits, in what order.

`--data DIR[=WEIGHT]` gives each folder a weight, and `--mix-by` says what the weight is a share of:

* `tokens` (the default, as for LLM data mixtures): folder i's weight is its share of the *tokens*
  an epoch draws. Draws per folder are ∝ p_i / m_i (m_i: the folder's mean sample length), so a
  folder of 1,400-token episodes and one of 20-token captions with equal weights each get half of
  the tokens (not 98.6% and 1.4%). Without `samples_per_epoch`, an epoch draws about as many tokens
  as the folders hold.
* `samples`: folder i's weight is its share of the *draws* (samples); an epoch has
  `samples_per_epoch` draws (default: every sample once).

p ∝ weight (static) or p ∝ weight · n_i^(1/T) with `temperature` T, n_i the folder's samples
(`samples`) or tokens (`tokens`). Folder i gets exactly the largest-remainder rounding of its
expected draws. Within a folder, draws walk through a fresh random permutation, starting a
new one when it runs out, so no sample repeats before all have been seen. The folders' draws are
then interleaved at random positions, each folder's kept in walk order (so that also holds in
visiting order). Everything derives from `(seed, epoch)` alone: any rank or worker can compute any
epoch's order without talking to the others.

With no weights and no temperature the epoch is a plain permutation of all samples (the natural
shares, whichever `mix_by`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mmtool.config import parse_weights
from mmtool.data.remote import local_path
from mmtool.errors import MMToolError


MIX_BY = ("tokens", "samples")
"""What a mixture weight is a share of (`--mix-by`); the first is the default."""


@dataclass
class DataSpec:
    """One `--data` entry.

    Attributes:
        path: the preprocessed folder (a str URL for a remote one, `mmtool.data.remote`).
        weight: its sampling weight (None = unweighted): a share of tokens or samples (`--mix-by`).
        objectives: its own objectives → loss weights (None: the run's `--objectives`); names may
            be task presets (`mmtool ls task-presets`), see `mmtool.models.tasks`.
        fraction: the share of the folder's rows (of the pretraining splits) the run may use: a
            seeded subset, nested across fractions of one seed (data-scaling experiments).
    """

    path: Path | str
    weight: float | None = None
    objectives: dict[str, float] | None = None
    fraction: float = 1.0


_OPTIONS = re.compile(r":(objectives|fraction)=")


def parse_data_specs(specs: list[str]) -> list[DataSpec]:
    """Parses `--data DIR[=WEIGHT][:objectives=SPEC][:fraction=F]` flags, or a YAML mixture file
    given as `--data mix.yaml`.

    `SPEC` is an `--objectives` value (`caption,contrastive=0.5`): it runs to the next
    `:fraction=` or the end. A mixture file looks like::

        datasets:
          - path: data/digits
            weight: 2
            objectives: {caption: 1, contrastive: 0.5}   # or "caption,contrastive=0.5"
          - path: data/pydocs     # weight defaults to 1 when any weight is given
            fraction: 0.25
    """
    out: list[DataSpec] = []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
            out.extend(_read_mixture_file(Path(spec)))
            continue
        head, *rest = _OPTIONS.split(spec)
        options = dict(zip(rest[::2], rest[1::2]))
        path, sep, weight = head.rpartition("=") if "=" in head else (head, "", "")
        out.append(DataSpec(local_path(path), _weight(weight, spec) if sep else None,
                            _objectives(options.get("objectives"), spec),
                            _fraction(options.get("fraction", 1.0), spec)))
    if any(d.weight is not None for d in out):
        out = [replace(d, weight=1.0 if d.weight is None else d.weight) for d in out]
    return out


def split_entry(entry: str) -> tuple[str, str]:
    """A `--data` entry → (folder path, the rest as written: `=WEIGHT` and `:key=value` options),
    so that a folder can be swapped for another (e.g. its embeddings) keeping its settings."""
    head, *rest = _OPTIONS.split(entry, maxsplit=1)
    options = entry[len(head):]
    path, sep, weight = head.rpartition("=")
    if sep and path and not Path(head).exists():
        try:
            float(weight)
            return path, f"={weight}{options}"
        except ValueError:
            pass
    return head, options


def _objectives(value: str | dict | None, spec: str) -> dict[str, float] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            out = {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise MMToolError(f"--data {spec}: objectives need numeric weights, got {value!r}") from None
    else:
        out = parse_weights(str(value), f"--data {spec}: objectives")
    if not out:
        raise MMToolError(f"--data {spec}: objectives= names no objective")
    for name, w in out.items():
        if not (np.isfinite(w) and w >= 0):
            raise MMToolError(f"--data {spec}: loss weight of {name!r} must be ≥ 0, got {w}")
    return out


def _fraction(value: str | float, spec: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise MMToolError(f"--data {spec}: fraction {value!r} is not a number") from None
    if not 0 < f <= 1:
        raise MMToolError(f"--data {spec}: fraction must be in (0, 1], got {value}")
    return f


def take_fractions(members: np.ndarray, folder: np.ndarray, fractions: list[float], seed: int) -> np.ndarray:
    """The rows each folder may use: for a folder with fraction f < 1, max(1, round(f · n)) of its n
    rows, the first of a permutation seeded by (seed, folder) — so smaller fractions are subsets
    of larger ones under one seed.

    Args:
        members: int64 [M] global row numbers (sorted); folder: [M] folder of each.
    Returns:
        int64 [M'] the kept rows, sorted.
    """
    if all(f >= 1.0 for f in fractions):
        return members
    keep = np.ones(len(members), bool)
    for f, frac in enumerate(fractions):
        if frac >= 1.0:
            continue
        rows = np.flatnonzero(folder == f)
        n_keep = max(1, int(round(frac * len(rows))))
        perm = np.random.default_rng([seed, f, 0x5CA1E]).permutation(len(rows))
        keep[rows[perm[n_keep:]]] = False
    return members[keep]


def _weight(text: str | float, spec: str) -> float:
    try:
        w = float(text)
    except (TypeError, ValueError):
        raise MMToolError(f"--data {spec}: weight {text!r} is not a number") from None
    if not w > 0 or not np.isfinite(w):
        raise MMToolError(f"--data {spec}: weight must be > 0, got {text}")
    return w


def mixture_mix_by(specs: list[str]) -> str | None:
    """The `mix_by:` key of a mixture YAML among `specs` (None when none sets it)."""
    for spec in specs:
        if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
            doc = _load_yaml(Path(spec))
            value = doc.get("mix_by") if isinstance(doc, dict) else None
            if value is not None:
                return check_mix_by(str(value), f"{spec}: mix_by")
    return None


def resolve_mix_by(mix_by: str | None, specs: list[str]) -> str:
    """`--mix-by` if given, else the mixture YAML's `mix_by:`, else the default (`MIX_BY[0]`)."""
    if mix_by is not None:
        return check_mix_by(mix_by)
    return mixture_mix_by(specs) or MIX_BY[0]


def check_mix_by(value: str, where: str = "--mix-by") -> str:
    """Returns `value` if it is one of `MIX_BY`, else raises naming `where`."""
    if value not in MIX_BY:
        raise MMToolError(f"{where} {value!r}: expected {' or '.join(MIX_BY)}")
    return value


def _load_yaml(path: Path):
    from mmtool.config import read_yaml

    return read_yaml(path)


MIXTURE_KEYS = ("datasets", "mix_by")
"""The top-level keys of a mixture YAML file."""


def _read_mixture_file(path: Path) -> list[DataSpec]:
    doc = _load_yaml(path)
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise MMToolError(f"{path}: expected a 'datasets:' list of {{path, weight}} entries")
    unknown = sorted(map(str, set(doc) - set(MIXTURE_KEYS)))
    if unknown:
        raise MMToolError(f"{path}: unknown key {', '.join(unknown)} (keys: {', '.join(MIXTURE_KEYS)})")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "path" not in e:
            raise MMToolError(f"{path}: datasets[{i}] needs a 'path'")
        if not isinstance(e["path"], str) or not e["path"]:
            raise MMToolError(f"{path}: datasets[{i}] path must be a folder path (text), "
                              f"got {e['path']!r}")
        folder = local_path(e["path"])
        if isinstance(folder, Path) and not folder.is_absolute():
            folder = path.parent / folder
        w, where = e.get("weight"), f"{path} datasets[{i}]"
        unknown = sorted(set(e) - {"path", "weight", "objectives", "fraction"})
        if unknown:
            raise MMToolError(f"{where}: unknown key {', '.join(unknown)} (keys: path, weight, "
                              "objectives, fraction)")
        out.append(DataSpec(folder, None if w is None else _weight(w, where),
                            _objectives(e.get("objectives"), where), _fraction(e.get("fraction", 1.0), where)))
    return out


class Mixture:
    """Deterministic weighted epochs over folders of given sizes.

    Args:
        sizes: samples per folder.
        weights: weight per folder (None: proportional to size).
        temperature: if set, p ∝ weight · size^(1/temperature).
        seed: the random seed.
        samples_per_epoch: draws per epoch (default: every sample once; with `mix_by="tokens"`
            and weights, as many draws as carry about the folders' total tokens).
        mix_by: "samples" (p is a share of draws) or "tokens" (p is a share of tokens).
        tokens: total tokens per folder (needed for `mix_by="tokens"`).

    Attributes:
        probabilities: float [F] requested shares (of samples or of tokens, per `mix_by`).
        draw_probabilities: float [F] the share of draws each folder gets.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None = None,
                 temperature: float | None = None, seed: int = 0,
                 samples_per_epoch: int | None = None, mix_by: str = "samples",
                 tokens: list[int] | None = None):
        self.sizes = np.asarray(sizes, np.int64)
        if (self.sizes <= 0).any():
            raise MMToolError(f"every data folder needs samples; sizes are {self.sizes.tolist()}")
        if temperature is not None and not temperature > 0:
            raise MMToolError(f"--temperature must be > 0, got {temperature}")
        self.mix_by = check_mix_by(mix_by)
        if mix_by == "tokens" and tokens is None:
            raise MMToolError("mix_by='tokens' needs the folders' token counts")
        amount = self.sizes.astype(np.float64) if mix_by == "samples" \
            else np.asarray(tokens, np.float64)  # [F] what the shares are shares of
        mean_len = amount / self.sizes  # [F] 1 for samples, mean sample length for tokens
        w = np.ones(len(sizes)) if weights is None else np.asarray(weights, np.float64)
        if (w <= 0).any():
            raise MMToolError(f"mixture weights must be > 0, got {w.tolist()}")
        self.uniform_epoch = weights is None and temperature is None
        if temperature is not None:
            w = w * amount ** (1.0 / temperature)
        elif weights is None:
            w = amount
        self.probabilities = w / w.sum()
        draws = self.probabilities / mean_len  # [F] expected draws per unit of "amount"
        self.draw_probabilities = draws / draws.sum()
        self.seed = seed
        if samples_per_epoch:
            self.samples_per_epoch = int(samples_per_epoch)
        elif mix_by == "tokens" and not self.uniform_epoch:  # about the data's tokens per epoch
            self.samples_per_epoch = max(int(round(amount.sum() * draws.sum())), 1)
        else:
            self.samples_per_epoch = int(self.sizes.sum())
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])  # [F+1] global numbering

    def counts(self) -> np.ndarray:
        """Draws per folder in one epoch (largest-remainder rounding of q · L, q the draw shares)."""
        exact = self.draw_probabilities * self.samples_per_epoch
        counts = np.floor(exact).astype(np.int64)
        short = self.samples_per_epoch - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        return counts
    def epoch(self, epoch: int) -> np.ndarray:
        """Global sample numbers of epoch `epoch`, in visiting order (int64 [samples_per_epoch])."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.uniform_epoch and self.samples_per_epoch == self.sizes.sum():
            return rng.permutation(int(self.sizes.sum())).astype(np.int64)
        parts = []
        for f, (n, k) in enumerate(zip(self.sizes.tolist(), self.counts().tolist())):
            # Continue folder f's permutation walk across epochs: draw index = epoch·k + i.
            first = epoch * k
            draws = np.arange(first, first + k)
            lap, pos = np.divmod(draws, n)
            local = np.empty(k, np.int64)
            for lp in np.unique(lap):  # one permutation per lap through the folder
                perm = np.random.default_rng([self.seed, f, int(lp)]).permutation(n)
                sel = lap == lp
                local[sel] = perm[pos[sel]]
            parts.append(self.offsets[f] + local)
        # Interleave: a random permutation decides which folder each position draws from, and
        # each folder's draws fill its positions in walk order. (Permuting the draws themselves
        # would mix a folder's laps within an epoch, repeating samples before others are seen.)
        counts = [len(p) for p in parts]
        which = np.repeat(np.arange(len(parts)), counts)[rng.permutation(sum(counts))]  # [L]
        order = np.empty(len(which), np.int64)
        order[np.argsort(which, kind="stable")] = np.concatenate(parts)
        return order
