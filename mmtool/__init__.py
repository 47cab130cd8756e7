"""mmtool: experiments on unified multi-modal, multi-task transformers.

The library lives in one subpackage per stage (`data`, `models`, `train`, `embed`, `analysis`,
`transfer`, `experiments`); the command line in
`mmtool.cli` is a thin layer over it. `mmtool.load_pretrained(DIR)` loads an `mmtool export` folder
(the model and its tokenizers); importing `mmtool` stays light (torch loads on first call).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained"]


def load_pretrained(folder: Any, device: str = "cpu") -> Any:
    """Loads an `mmtool export` folder: `model, tokenizers = mmtool.load_pretrained(DIR)`.

    See `mmtool.train.export.load_pretrained` (returns a `Pretrained`: model, tokenizers, config).
    """
    from mmtool.train.export import load_pretrained as _load

    return _load(folder, device)
