"""mmtool: experiments on unified multi-modal, multi-task transformers.

The library lives in subpackages (`mmtool.data`, later `mmtool.models`, ...); the command line in
`mmtool.cli` is a thin layer over it.
"""

__version__ = "0.1.0"
