"""`known-answer`: image + caption pairs where exactly one modality carries the label, the other is noise.

A sanity check for modality-importance measurements (`mmtool sanity`, `tests/analysis/test_sanity.py`):
an ablation, an attention probe or a gradient probe that does not single out the informative
modality on this data is broken. Every record is made deterministically from its index (no random
state outside it), so the same options give byte-identical shards.

* `informative=image` (default): the image is a real handwritten digit (scikit-learn's bundled
  8×8 digits, class = the label) and the caption is `words` random words from a fixed neutral
  vocabulary — no word depends on the label.
* `informative=text`: the caption names the class ("a handwritten seven") and the image is uniform
  random noise (8×8, 0..255).

Each record ends with the class as a `label` token (option `label_token`, on by default). Why: the
training objectives are self-supervised, so without it nothing in training tells the model which
modality is "informative" — the label would be a property of the data that the model never has a
reason to look for, and attention or gradient probes could not be expected to find it. With the
label as the last token, next-token prediction must read it off the informative modality (the
noise one cannot help), which is the known answer the probes and the ablation must recover.
`mmtool ablate` never feeds label tokens to its linear probe and does not ablate them.

The field order is a coin flip per record by default (`order`), independent of the label: the token
just before the label feeds its prediction through the residual stream, so with a fixed order the
modality that sits there would get most of the gradient whatever it carries.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, Source
from mmtool.data.sources.digits import DIGIT_WORDS, _load, digits_file
from mmtool.errors import MMToolError

NOISE_WORDS = ("red", "blue", "green", "table", "river", "stone", "cloud", "paper", "light", "music",
               "window", "garden", "yellow", "bright", "quiet", "north", "bread", "chair", "ocean", "wood")
"""The vocabulary of noise captions: common words, none a digit name."""


@dataclasses.dataclass
class KnownAnswerOptions:
    """Options of the `known-answer` source."""

    informative: str = dataclasses.field(default="image", metadata={
        "help": "the modality that carries the label: image (digit image, random-word caption) or "
                "text (caption names the class, noise image)"})
    samples: int = dataclasses.field(default=600, metadata={"help": "number of records"})
    classes: int = dataclasses.field(default=10, metadata={"help": "number of classes (2..10)"})
    words: int = dataclasses.field(default=4, metadata={"help": "words per noise caption"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the noise"})
    order: str = dataclasses.field(default="random", metadata={
        "help": "field order: random (a coin flip per record, independent of the label), image-first, text-first"})
    label_token: bool = dataclasses.field(default=True, metadata={
        "help": "end each sample with its class as a label token (the target of next-token training)"})


@SOURCES.register("known-answer")
class KnownAnswerSource(Source):
    """Synthetic image + caption pairs where only one modality (option `informative`) carries the label."""

    Options = KnownAnswerOptions

    def __init__(self, options, split="all"):
        super().__init__(options, split)
        if options.informative not in ("image", "text"):
            raise MMToolError(f"--opt informative={options.informative}: expected image or text")
        if not 2 <= options.classes <= 10:
            raise MMToolError(f"--opt classes={options.classes}: expected 2..10")
        if options.order not in ("random", "image-first", "text-first"):
            raise MMToolError(f"--opt order={options.order}: expected random, image-first or text-first")
        if options.samples < 1 or options.words < 1:
            raise MMToolError("--opt samples and words must be positive")

    def __len__(self) -> int:
        return self.options.samples

    def record_id(self, index: int) -> str:
        return f"known-answer-{self.options.informative}-{index}"

    def input_files(self) -> list[Path]:
        return [digits_file()] if self.options.informative == "image" else []

    def record_files(self, index: int) -> list[Path]:
        return self.input_files()

    def read(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"known-answer: record {index} out of range 0..{len(self) - 1}")
        o = self.options
        label = index % o.classes
        rng = np.random.default_rng([o.seed, index])  # the record's own noise, from its index
        if o.informative == "image":
            images, labels = _load()
            of_class = np.flatnonzero(labels == label)
            image = images[of_class[(index // o.classes) % len(of_class)]].copy()  # uint8 [8, 8]
            caption = " ".join(NOISE_WORDS[i] for i in rng.integers(0, len(NOISE_WORDS), o.words))
        else:
            image = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # uint8 [8, 8]
            caption = f"a handwritten {DIGIT_WORDS[label]}"
        fields = [Field("image", "image", image), Field("text", "caption", caption)]
        if o.order == "text-first" or (o.order == "random" and rng.random() < 0.5):
            fields.reverse()
        if o.label_token:
            fields.append(Field("label", "answer", label, options={"num_classes": o.classes}))
        return Record(id=self.record_id(index), task="known-answer", fields=fields, label=label,
                      meta={"informative": o.informative})
