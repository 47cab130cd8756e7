"""`digits`: scikit-learn's bundled handwritten digits (1,797 images of 8×8 pixels) with captions.

The data ships inside scikit-learn (UCI "Optical Recognition of Handwritten Digits", test part), so
the source works offline. Each record is one image and the caption "a handwritten <digit word>",
labelled with the digit: a tiny real image–text pair set for captioning, retrieval and probes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import numpy as np

from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, Source

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """Loads the images once per process: uint8 `[1797, 8, 8]` scaled 0..255 and int labels `[1797]`."""
    from sklearn.datasets import load_digits  # importing scikit-learn takes ~1 s: only when read

    data = load_digits()
    # Pixels are counts 0..16 (ink in 4×4 blocks of a 32×32 bitmap); scale to 0..255, round half up.
    images = np.floor(data.images * (255.0 / 16.0) + 0.5).astype(np.uint8)
    images.setflags(write=False)
    return images, data.target.astype(np.int64)


def digits_file() -> Path:
    """scikit-learn's bundled `digits.csv.gz` (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations \
        else Path("sklearn")
    return root / "datasets" / "data" / "digits.csv.gz"


@dataclasses.dataclass
class DigitsOptions:
    """Options of the `digits` source."""

    caption_first: bool = dataclasses.field(default=False, metadata={
        "help": "put the caption before the image (text→image order) instead of after it"})


@SOURCES.register("digits")
class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten digits (8×8, offline) captioned "a handwritten seven"."""

    Options = DigitsOptions
    N_RECORDS = 1797  # fixed by the bundled data; lets len() and record_id() skip loading it

    def __len__(self) -> int:
        return self.N_RECORDS

    def record_id(self, index: int) -> str:
        return f"digits-{index}"

    def input_files(self) -> list[Path]:
        return [digits_file()]

    def record_files(self, index: int) -> list[Path]:
        return [digits_file()]

    def read(self, index: int) -> Record:
        if not 0 <= index < self.N_RECORDS:  # a negative index would wrap to another record
            raise IndexError(f"digits: record {index} out of range 0..{self.N_RECORDS - 1}")
        images, labels = _load()
        image = images[index].copy()  # uint8 [8, 8]
        label = int(labels[index])
        fields = [Field("image", "image", image),
                  Field("text", "caption", f"a handwritten {DIGIT_WORDS[label]}")]
        if self.options.caption_first:
            fields.reverse()
        return Record(id=self.record_id(index), task="caption", fields=fields, label=label,
                      meta={"digit": label})
