"""Experiment configurations: `configs/default.py` is the base, the others override it."""
