"""Builders: size presets and the plain functions that assemble a model from its parts.

Size presets are registered (`mmtool ls sizes`), each a typed function returning a `ModelSize`,
torchtune-style. The parts — encoders, trunk (with its fusion), objectives — are built by the
functions below; `mmtool.models.model.build_model` calls them from a `ModelConfig`.

Parameter counts do not depend on the fusion: the three fusions run the same blocks and differ only
in which tokens attention connects (`mmtool.models.fusion`). They do depend on the data's streams:
each discrete stream brings an embedding table (vocab × d, tied to its output head), so a 30k-word
text vocabulary dominates the `tiny` model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from mmtool.data.index import Stream
from mmtool.errors import MMToolError
from mmtool.models.encoders import Embedder
from mmtool.models.fusion import FUSIONS, Trunk
from mmtool.models.objectives import build_objective
from mmtool.registry import Registry


@dataclass(frozen=True)
class ModelSize:
    """Trunk dimensions."""

    d_model: int
    """Token vector width."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Attention heads per block (d_model / n_heads per head)."""
    d_mlp: int
    """Hidden width of each block's MLP."""


SIZES: Registry = Registry("sizes", "model size presets: width, layers, heads, MLP width")


@SIZES.register("tiny")
def tiny() -> ModelSize:
    """d 64, 2 layers, 4 heads, MLP 256: tests and smoke runs on a laptop CPU."""
    return ModelSize(d_model=64, n_layers=2, n_heads=4, d_mlp=256)


@SIZES.register("small")
def small() -> ModelSize:
    """d 256, 4 layers, 4 heads, MLP 1024: CPU experiments and benchmarks."""
    return ModelSize(d_model=256, n_layers=4, n_heads=4, d_mlp=1024)


@SIZES.register("base")
def base() -> ModelSize:
    """d 512, 8 layers, 8 heads, MLP 2048: GPU runs."""
    return ModelSize(d_model=512, n_layers=8, n_heads=8, d_mlp=2048)


def model_size(name: str) -> ModelSize:
    """The preset `name` (raises, listing close matches, when unknown)."""
    return SIZES.get(name)()


def build_embedder(streams: list[Stream], size: ModelSize, max_positions: int) -> Embedder:
    """One encoder per stream plus stream, position and task embeddings."""
    if max_positions < 1:
        raise MMToolError(f"max_positions must be positive, got {max_positions}")
    return Embedder(streams, size.d_model, max_positions)


def build_trunk(size: ModelSize, fusion: str, fusion_layer: int) -> Trunk:
    """The block stack under fusion `fusion` (`early`, `mid`, `late`, or a plug-in)."""
    return Trunk(size.d_model, size.n_layers, size.n_heads, size.d_mlp,
                 FUSIONS.get(fusion)(size.n_layers, fusion_layer))


def build_objectives(specs: dict[str, str], streams: list[Stream], size: ModelSize,
                     mask_ratio: float) -> nn.ModuleDict:
    """Objectives by name (a preset's or the objective's), from `TaskTable.specs`.

    Raises:
        MMToolError: an unknown name or option, or an objective the streams cannot feed.
    """
    return nn.ModuleDict({name: build_objective(spec, streams, size.d_model, mask_ratio)
                          for name, spec in specs.items()})


def feedable_objectives(objectives: dict[str, float], streams: list[Stream]) -> tuple[dict[str, float], dict[str, str]]:
    """Splits `objectives` into those these streams can feed and those they cannot.

    Used where the objectives are a default rather than a choice (`mmtool train` without
    `--model.objectives`, `mmtool profile`): masked-patch on text-only data, or next-token on an
    embedding folder, would otherwise fail. An explicit choice is never filtered.

    Returns:
        ({spec: weight} that build on `streams}, {spec: why not} of the others).

    Raises:
        MMToolError: none can (the first one's error says what it needs).
    """
    fit, dropped, first_error = {}, {}, None
    for spec, weight in objectives.items():
        try:
            build_objective(spec, streams, d_model=8, mask_ratio=0.5)
        except MMToolError as err:
            first_error = first_error or err
            dropped[spec] = str(err).split(";")[0]
            continue
        fit[spec] = weight
    if not fit:
        raise first_error
    return fit, dropped
