"""Interpretability: capture unit activations, label concepts, score units, compare with baselines."""
