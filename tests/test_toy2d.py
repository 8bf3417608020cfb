"""The 2-D swirl toy of the notebooks: its entropy floor and its trainer's bad input."""
import math

import jax
import numpy as np
import pytest

from vdm import toy2d


def test_swirl_entropy_is_the_histograms():
  """The estimate against numpy's float64 plug-in entropy of the same draws' grid histogram, and
  between the bounds a 64×64 grid allows (0, log2 64 bits per coordinate)."""
  n, vocab = 200_000, 64
  got = toy2d.swirl_entropy_bits(vocab, n=n, rng=jax.random.PRNGKey(3))
  counts = np.zeros(vocab * vocab)
  for i in range(-(-n // 10**6)):
    x = np.asarray(toy2d.swirl(jax.random.fold_in(jax.random.PRNGKey(3), i), n, vocab))
    np.add.at(counts, x[:, 0] * vocab + x[:, 1], 1)
  p = counts[counts > 0] / n
  assert abs(got - float(-(p * np.log2(p)).sum() / 2)) < 1e-4
  assert 4.5 < got < math.log2(vocab)


def test_train_takes_one_step_and_refuses_none():
  out = toy2d.train(jax.random.PRNGKey(0), jax.random.PRNGKey(1), steps=1, batch=8, hidden=16,
                    n_features=8)
  assert out["losses"].shape == (1,) and np.isfinite(out["losses"]).all()
  for kwargs in (dict(steps=0), dict(steps=5, batch=0)):
    with pytest.raises(ValueError, match="must be >= 1"):
      toy2d.train(jax.random.PRNGKey(0), jax.random.PRNGKey(1), **{"batch": 8, **kwargs})
