"""Benchmarks: `monoroute bench layer | train | shard-memory` (see each module's docstring)."""
