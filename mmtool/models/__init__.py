"""Model parts: encoders, attention backends over packed batches, fusion, heads, objectives."""
