"""The synthetic-knowledge measurements: recall, stored bits, erase, edit, entity selectivity (see measure.py)."""
