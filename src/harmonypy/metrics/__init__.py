"""Integration scores: LISI and evaluate, on the neighbour search of harmonypy.neighbors."""
