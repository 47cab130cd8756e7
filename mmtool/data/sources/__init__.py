"""Sources: dataset adapters that read raw records. Each module registers its sources in `SOURCES`."""

from mmtool.data.sources.base import SOURCES, Source, build_source

__all__ = ["SOURCES", "Source", "build_source"]
