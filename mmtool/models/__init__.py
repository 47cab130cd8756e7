"""Model parts: encoders, attention backends over packed batches, fusion, heads, objectives.

The entry point is `build_model(ModelConfig(...), index.streams)` → `UnifiedModel`; import it from
`mmtool.models.model` (this package stays import-light: nothing here imports torch).
"""
