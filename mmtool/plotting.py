"""Figures without global state: matplotlib `Figure` objects, saved atomically.

`subplots` builds a `matplotlib.figure.Figure` directly — no pyplot, no backend switch
(`matplotlib.use`), nothing registered globally — so library code never changes how the caller's
own matplotlib behaves, and a figure is freed when it goes out of scope. `save_figure` writes it
to a temporary file next to `path` and renames it into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8),
             squeeze: bool = True) -> tuple[Any, Any]:
    """(Figure, axes) like `pyplot.subplots`, but the figure belongs to no pyplot state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def colors(n: int = 10) -> list[Any]:
    """The first `n` colours of matplotlib's tab10 cycle (repeating)."""
    import matplotlib

    base = matplotlib.colormaps["tab10"].colors
    return [base[i % len(base)] for i in range(n)]


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Saves a figure atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
