"""Fusion: constants, recognition, float64 algebra, chains and branches, the engine and its pass."""
