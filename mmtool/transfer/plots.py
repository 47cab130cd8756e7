"""One PNG per task: data-efficiency curves, pretrained vs scratch (95% bootstrap intervals), with
the chance level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES = {"linear-probe": "linear probe", "finetune": "fine-tune"}


def plot_task(name: str, entry: dict[str, Any], path: Path) -> bool:
    """Draws the task's curves (probe/fine-tune vs fraction, k-shot vs k) atomically; False if none."""
    panels = [(p, r) for p, r in entry["results"].items()
              if r["curve"] and (p in CURVES or p == "kshot")]
    if not panels:
        return False
    from mmtool.plotting import save_figure, subplots

    fig, axes = subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    style = {"pretrained": ("tab:blue", "o"), "scratch": ("tab:orange", "s")}
    for ax, (proto, res) in zip(axes[0], panels):
        xkey = "k" if proto == "kshot" else "fraction"
        xs = [pt[xkey] for pt in res["curve"]]
        for which, (color, marker) in style.items():
            ys = [pt[which] for pt in res["curve"]]
            ci = [pt.get(f"{which}_ci95") for pt in res["curve"]]  # [low, high] per point
            if all(c is not None and c[0] == c[0] for c in ci):
                err = [[y - c[0] for y, c in zip(ys, ci)], [c[1] - y for y, c in zip(ys, ci)]]
                ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, capsize=3, label=which)
            else:
                ax.plot(xs, ys, color=color, marker=marker, label=which)
        ax.axhline(entry["chance"], color="grey", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("labelled examples per class (k)" if proto == "kshot"
                      else "fraction of the labelled train/validation data")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(CURVES.get(proto, "k-shot") + " (95% bootstrap interval)")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=8, frameon=False)
    split = entry["split"]["sizes"]
    fig.suptitle(f"{name} ({'+'.join(entry['modalities'])}): pretrained vs scratch · split seed "
                 f"{entry['split']['seed']}, train/val/test {split['train']}/{split['validation']}/"
                 f"{split['test']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return True
