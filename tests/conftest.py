"""Suite-wide settings, applied before any test module imports jax.

The tests compile many small programs and run each briefly, so XLA's CPU backend skips its
slow optimisation passes (2-3x faster here); subprocesses started by tests inherit it.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
