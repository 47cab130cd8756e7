"""mmtool's loaders and the peer loaders, on the same heterogeneous mixture, measured in one run.

Usage: python benchmarks/peers.py [--samples 20000] [--batch 32] [--workers 0,2] [--repeats 3]
                                  [--only NAME,...] [--json PATH] [--workdir DIR]

The mixture is mmtool's built-in sample data, real records: digits (1,797 8x8 images + caption),
spoken-digits (100 WAV clips + transcript), cartpole (`--cartpole-episodes` episodes: observation,
action and reward streams) and pydocs (standard-library docstrings, 512-token chunks), preprocessed
once and drawn with equal per-sample weights: the epoch order of `--samples` draws is what every
loader reads. mmtool reads its shards with the `padded` and `packed` loaders (`--batch-samples
BATCH`); each peer (benchmarks/peer_loaders.py) gets the same draws, in order, written by its own
writer (HF `datasets` save_to_disk, LitData `optimize`, Mosaic `MDSWriter`, WebDataset tars,
Megatron-Energon's prepared WebDataset) and read by its own loader with one shared padding collate.

A `collate-only` row runs the shared collate over the samples already in memory (in this process,
and through DataLoader worker processes): the ceiling of every peer, reading nothing.

Per loader and worker count: samples/s and real (data) tokens/s over one full pass, timed after each
worker's first batch (start-up excluded), median of `--repeats` interleaved passes and the min-max
spread; whether every draw was read exactly once and every token arrived; and what broke. A peer
whose package is missing is a `skipped` row with its ImportError; one that raises is a row with the
exception. Workers are DataLoader processes for the peers and threads for mmtool (its default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import torch

from mmtool.data.loader import Loader, LoaderConfig
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.shards import load_manifest

from peer_loaders import PEERS, Stream, pad_collate, tokens_of

MMTOOL = ("mmtool-padded", "mmtool-packed")
COLLATE = "collate-only"  # the shared collate over samples already in memory: every peer's ceiling
SAME_DRAWS = {"mix_by": "samples", "splits": ["train", "validation", "test"]}


def build(root: Path, episodes: int, pydocs_modules: str) -> list[Path]:
    """Preprocesses the four built-in sources under `root` (reused when up to date)."""
    folders = []
    for source, opts in (("digits", []), ("spoken-digits", []), ("cartpole", [f"episodes={episodes}"]),
                         ("pydocs", [f"modules={pydocs_modules}"] if pydocs_modules else [])):
        preprocess(PreprocessConfig(source=source, out=root / source, options=opts, num_proc=2))
        folders.append(root / source)
    return folders


def stream_name(seg: dict) -> str:
    return f"{seg['modality']}_{seg['tokenizer']}".replace("-", "_")


def materialize(folders: list[Path], order: np.ndarray) -> tuple[list[dict], dict[str, Stream]]:
    """The samples of `order` (global numbers, as TokenIndex numbers them) as plain dicts."""
    paths = [f / s["path"] for f in folders for s in load_manifest(f)["shards"]]
    table = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in paths)
    unique = np.unique(order)
    rows = table.select(["label", "segments"]).take(pa.array(unique)).to_pylist()
    streams: dict[str, Stream] = {}
    base: dict[int, dict] = {}
    for number, row in zip(unique.tolist(), rows):
        sample = {"label": -1 if row["label"] is None else int(row["label"])}
        for seg in row["segments"]:
            name = stream_name(seg)
            if seg["ids"] is not None:
                tok = np.asarray(seg["ids"], np.int32)  # [n]
                streams.setdefault(name, Stream(name, "int32", None))
            else:
                dim = int(seg["shape"][-1])
                tok = np.asarray(seg["values"], np.float32).reshape(-1, dim)  # [n, dim]
                streams.setdefault(name, Stream(name, "float32", dim))
            sample[name] = tok if name not in sample else np.concatenate([sample[name], tok])
        base[number] = sample
    return [{"draw": d, **base[n]} for d, n in enumerate(order.tolist())], dict(sorted(streams.items()))


class Deadline:
    """Raises TimeoutError in the main thread after `seconds` (a hung loader becomes a row)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def fire(*_):
            raise TimeoutError(f"no end after {self.seconds} s (--timeout)")
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)


def one_pass(make: Callable[[], Iterable], count: Callable[[dict], tuple[np.ndarray, int]],
             written: int, timeout: int, warm: int = 1) -> dict:
    """One full pass: samples/s and tokens/s after the first `warm` batches; which draws were read.

    The first batch of each worker (workers take batches in turn) carries its start-up, which a
    training run pays once, not per batch: those `warm` batches are counted but not timed.
    """
    with Deadline(timeout):
        it = iter(make())
        seen, tokens, t, n0, tok0 = [], 0, None, 0, 0
        for i, batch in enumerate(it):
            draws, tok = count(batch)
            seen.append(draws)
            tokens += tok
            if i == warm - 1:
                t, n0, tok0 = time.perf_counter(), sum(map(len, seen)), tokens
        if t is None:
            raise RuntimeError(f"{len(seen)} batches, fewer than the {warm} warm-up ones: nothing timed")
        dt = time.perf_counter() - t
        del it
    seen = np.concatenate(seen)
    n = len(seen)
    return {"samples": n, "tokens": tokens, "samples_per_s": (n - n0) / dt, "tokens_per_s": (tokens - tok0) / dt,
            "each_draw_once": bool(n == written and (np.bincount(seen, minlength=written) == 1).all())}


def peer_count(batch: dict) -> tuple[np.ndarray, int]:
    """A collated batch's draws and data tokens (its masks' true entries)."""
    return batch["draw"].numpy(), int(sum(v.sum() for k, v in batch.items() if k.endswith(".mask")))


def mmtool_pass(name: str, data: list[str], samples: int, batch: int, workers: int,
                draw_of: dict[int, list[int]]) -> Callable[[], Iterable]:
    """The loader of `name` as a pass maker; its batches' draws numbered like the peers'."""
    def make():
        loader = Loader(LoaderConfig(data, **SAME_DRAWS, strategy=name.split("-")[1], samples_per_epoch=samples,
                                     batch_samples=batch, num_workers=workers, verify=False))
        queues = {k: list(v) for k, v in draw_of.items()}  # a sample drawn twice: both its draws
        try:
            for b in loader:
                # a sample read more often than drawn gets the out-of-range draw `samples`: the
                # each-draw-once check then fails (one draw fewer, or one sample more, than written)
                draws = np.array([queues[s].pop() if queues[s] else samples for s in b["sample_index"].tolist()])
                yield {"draws": draws, "tokens": b.real_tokens - b.num_separators}
        finally:
            loader.close()
    return make


def mmtool_count(batch: dict) -> tuple[np.ndarray, int]:
    """An mmtool batch's draws and data tokens (as `mmtool_pass` yields them)."""
    return batch["draws"], int(batch["tokens"])


def summarize(name: str, form: str, workers: int, runs: list[dict], written: int, tokens: int,
              broke: list[str], write_s: float | None) -> dict:
    """One table row: median and spread of the passes that ran; what broke, including a pass that
    did not read each draw once or lost tokens (its rate is still shown)."""
    row = {"loader": name, "form": form, "workers": workers, "written": written, "write_s": write_s,
           "broke": list(broke)}
    ok = [r for r in runs if "error" not in r]
    for r in runs:
        if "error" in r and r["error"] not in row["broke"]:
            row["broke"].append(r["error"])
    if not ok:
        return {**row, "status": "failed"}
    sps, tps = [r["samples_per_s"] for r in ok], [r["tokens_per_s"] for r in ok]
    last = ok[-1]
    if not last["each_draw_once"]:
        row["broke"].append(f"read {last['samples']:,} samples for {written:,} written, not each draw once")
    if last["tokens"] != tokens:
        row["broke"].append(f"read {last['tokens']:,} tokens for {tokens:,} written")
    return {**row, "status": "ran", "repeats": len(ok), "samples_read": last["samples"],
            "tokens_read": last["tokens"], "each_draw_once": last["each_draw_once"],
            "samples_per_s": statistics.median(sps), "samples_per_s_range": [min(sps), max(sps)],
            "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)]}


class PeerState:
    """A peer's files: the form it is stored in now, what broke so far; moves on to the next form."""

    def __init__(self, peer, samples: list[dict], streams: dict[str, Stream], root: Path):
        self.peer, self.samples, self.streams, self.root = peer, samples, streams, root
        self.form, self.write_s, self.broke, self._next = None, None, [], 0
        self.advance()

    def advance(self) -> None:
        """Writes the next form that its writer accepts (`form` None when none is left)."""
        self.form = None
        while self._next < len(self.peer.forms):
            form = self.peer.forms[self._next]
            self._next += 1
            out = self.root / self.peer.name / form
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            try:
                self.peer.write(self.samples, out, form, self.streams)
            except Exception as e:
                self.broke.append(f"write {form}: {short(e)}")
                continue
            self.form, self.write_s = form, time.perf_counter() - t
            return

    def maker(self, batch: int, workers: int) -> Callable[[], Iterable]:
        out, form = self.root / self.peer.name / self.form, self.form
        return lambda: self.peer.read(out, form, self.streams, batch, workers)


def short(e: BaseException) -> str:
    """`Type: message` in one line. The innermost cause speaks; of a message that carries a worker's
    traceback as text, its first `...Error: ...` line."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    text = errors[0] if errors else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text[:200]}"


def measure_peer(state: PeerState, workers: int, runs: dict, args, written: int) -> None:
    """One pass of a peer at `workers`; on an exception, records it and moves to the next form."""
    while state.form is not None:
        try:
            result = one_pass(state.maker(args.batch, workers), peer_count, written, args.timeout, max(1, workers))
        except Exception as e:
            if args.verbose:
                traceback.print_exc()
            state.broke.append(f"read {state.form}, {workers} workers: {short(e)}")
            for key in runs:
                if key[0] == state.peer.name:
                    runs[key].clear()  # every row of a peer reads one form
            state.advance()
            continue
        runs[(state.peer.name, workers)].append(result)
        return


def collate_only(samples: list[dict], batch: int, workers: int) -> Iterable[dict]:
    """The shared collate over the samples in memory: in this process, or in `workers` DataLoader
    processes (what moving the batches between processes costs, without any reading)."""
    if workers == 0:
        return (pad_collate(samples[i:i + batch]) for i in range(0, len(samples), batch))
    return torch.utils.data.DataLoader(samples, batch_size=batch, collate_fn=pad_collate, num_workers=workers)


def mixture(args: argparse.Namespace, root: Path) -> tuple[list[str], list[dict], dict[str, Stream], dict]:
    """The built mixture's `--data` entries, its epoch of draws as samples, their streams, and
    the draws of each sample number."""
    folders = build(root / "mixture", args.cartpole_episodes, args.pydocs_modules)
    data = [f"{f}=1" for f in folders]  # equal weights
    order = Loader(LoaderConfig(data, **SAME_DRAWS, samples_per_epoch=args.samples, batch_samples=1,
                                verify=False)).order(0)
    samples, streams = materialize(folders, order)
    draw_of: dict[int, list[int]] = {}
    for d, n in enumerate(order.tolist()):
        draw_of.setdefault(n, []).append(d)
    return data, samples, streams, draw_of


def run(args: argparse.Namespace, root: Path) -> dict:
    """Builds, writes and measures everything asked for; returns the report (rows + setup)."""
    names = [*MMTOOL, COLLATE, *PEERS]
    wanted = args.only or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"--only {','.join(unknown)}: unknown; choose from {', '.join(names)}")
    data, samples, streams, draw_of = mixture(args, root)
    written, tokens = len(samples), sum(tokens_of(s, streams) for s in samples)
    rows, states = [], {}
    for name in wanted:
        if name in PEERS:
            why = PEERS[name].missing()
            if why:
                rows.append({"loader": name, "status": "skipped", "reason": why, "broke": []})
            else:
                print(f"  writing {name}", flush=True)
                states[name] = PeerState(PEERS[name], samples, streams, root / "peers")
    keys = [(n, w) for n in wanted if n in MMTOOL or n == COLLATE or n in states for w in args.workers]
    runs: dict[tuple[str, int], list[dict]] = {k: [] for k in keys}
    b = args.batch
    for r in range(args.repeats):  # interleaved: every loader once per round, same stretch of time
        print(f"  round {r + 1}/{args.repeats}", flush=True)
        for name, w in keys:
            if name in MMTOOL:
                try:
                    runs[(name, w)].append(one_pass(mmtool_pass(name, data, written, b, w, draw_of),
                                                    mmtool_count, written, args.timeout, max(1, w)))
                except Exception as e:  # mmtool's own failures are rows too, not a crash
                    runs[(name, w)].append({"error": f"read: {short(e)}"})
            elif name == COLLATE:
                runs[(name, w)].append(one_pass(lambda w=w: collate_only(samples, b, w), peer_count, written,
                                                args.timeout, max(1, w)))
            else:
                measure_peer(states[name], w, runs, args, written)
    for name, w in keys:
        st = states.get(name)
        form = st.form if st else ("in memory" if name == COLLATE else "mmtool shards")
        rows.append(summarize(name, form, w, runs[(name, w)], written, tokens,
                              st.broke if st else [], st.write_s if st else None))
    rows.sort(key=lambda r: (wanted.index(r["loader"]), r.get("workers", -1)))
    return {"setup": {"samples": written, "tokens": tokens, "unique_samples": len(draw_of),
                      "streams": {k: [s.dtype, s.dim] for k, s in streams.items()}, "batch": b,
                      "workers": args.workers, "repeats": args.repeats, "torch": torch.__version__,
                      "cpus": os.cpu_count()},
            "rows": rows}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in (("hf-datasets", "datasets"), ("litdata", "litdata"), ("mosaic-streaming", "mosaicml-streaming"),
                       ("webdataset", "webdataset"), ("megatron-energon", "megatron-energon")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def fmt_rate(row: dict, key: str, scale: float = 1.0, unit: str = "") -> str:
    """`median (min–max)`: whole numbers, or two decimals when scaled (millions)."""
    lo, hi = row[key + "_range"]
    d = 2 if scale > 1 else 0
    return f"{row[key] / scale:,.{d}f}{unit} ({lo / scale:,.{d}f}–{hi / scale:,.{d}f})"


def table(report: dict) -> str:
    """The report as a markdown table."""
    vers = report.get("versions", {})
    lines = ["| loader | stored as | write s | workers | samples/s (min–max) | real tokens/s (min–max) | "
             "read / written | what broke |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = r["loader"] + (f" {vers[r['loader']]}" if r["loader"] in vers else "")
        broke = "; ".join(r["broke"]) or "—"
        if r["status"] == "skipped":
            lines.append(f"| {name} | | | | skipped | | | {r['reason']} |")
        elif r["status"] == "failed":
            lines.append(f"| {name} | {r.get('form') or ''} | | {r.get('workers', '')} | failed | | | {broke} |")
        else:
            read = f"{r['samples_read']:,} / {r['written']:,}" + ("" if r["each_draw_once"] else " ✗")
            write = "" if r["write_s"] is None else f"{r['write_s']:.1f}"
            lines.append(f"| {name} | {r['form']} | {write} | {r['workers']} | {fmt_rate(r, 'samples_per_s')} | "
                         f"{fmt_rate(r, 'tokens_per_s', 1e6, 'M')} | {read} | {broke} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="mixture draws every loader reads")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch")
    parser.add_argument("--workers", default="0,2", help="worker counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="passes per loader and worker count (median)")
    parser.add_argument("--only", default="", help=f"loaders to run, comma-separated: {', '.join([*MMTOOL, COLLATE, *PEERS])}")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--workdir", type=Path, help="keep the mixture and the peers' files here")
    parser.add_argument("--cartpole-episodes", type=int, default=1000)
    parser.add_argument("--pydocs-modules", default="", help="pydocs modules (empty: the whole stdlib)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one pass may take")
    parser.add_argument("--verbose", action="store_true", help="print read tracebacks")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, args.workdir or Path(tmp))
    report["versions"] = versions()
    s = report["setup"]
    print(f"\n{s['samples']:,} draws of {s['unique_samples']:,} samples, {s['tokens']:,} data tokens; "
          f"batch {s['batch']}; median of {s['repeats']} passes (min–max)\n")
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.json.with_name(args.json.name + ".tmp")
        tmp_path.write_text(json.dumps(report, indent=2))
        os.replace(tmp_path, args.json)


if __name__ == "__main__":
    main()
