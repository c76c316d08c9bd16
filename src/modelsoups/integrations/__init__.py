"""Bridges to the tools users already have (each one an optional extra, imported lazily)."""
