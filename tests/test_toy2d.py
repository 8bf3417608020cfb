"""The 2-D swirl toy of the notebooks: its entropy floor, its shape and grid, its denoiser's
input and its trainer (keys, flag, endpoints, bad input)."""
import math

import jax
import jax.numpy as jnp
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


def test_swirl_moments_are_the_spirals_and_its_grid_is_floored():
  """Cell centres (x + ½)·2/V − 1 of 10⁶ draws against the spiral's closed-form moments: r² ~
  U(0.02, 1), xy = 0.85 r (cos 4πr, sin 4πr) + N(0, 0.04²). With noise wider than a cell the
  floor's error averages out (a rounding grid sits half a cell off); E|c|² = 0.85² E r² + 2·0.04²
  + 2·h²/12, h = 2/V. Noise wider than the square is clipped onto the grid's edge cells."""
  from scipy.integrate import quad
  vocab, n = 64, 10**6
  x = toy2d.swirl(jax.random.PRNGKey(0), n, vocab)
  assert x.dtype == np.int32 and x.shape == (n, 2)
  c = (np.asarray(x, np.float64) + 0.5) * 2 / vocab - 1
  r_lo = math.sqrt(0.02)
  want = [quad(lambda r, f=f: 0.85 * r * f(4 * math.pi * r) * 2 * r / 0.98, r_lo, 1, limit=200)[0]
          for f in (math.cos, math.sin)]
  np.testing.assert_allclose(c.mean(0), want, atol=2e-3)
  h = 2 / vocab
  np.testing.assert_allclose((c**2).sum(-1).mean(), 0.85**2 * 0.51 + 2 * 0.04**2 + 2 * h**2 / 12,
                             rtol=5e-3)
  wide = np.asarray(toy2d.swirl(jax.random.PRNGKey(1), 10_000, vocab, noise=2.0))
  assert wide.min() == 0 and wide.max() == vocab - 1
  assert (wide == 0).mean() > 0.2 and (wide == vocab - 1).mean() > 0.2


def test_mlp_denoiser_sees_gamma_rescaled_to_the_unit_interval():
  """ε̂ depends on γ only through t = (γ − γ_min)/(γ_max − γ_min): the same parameters with
  endpoints (0, 1) given t agree exactly, and ε̂ does change with γ (random, nonzero weights)."""
  net = toy2d.MLPDenoiser(hidden=16, gamma_min=-9.0, gamma_max=5.0)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  z = jax.random.normal(jax.random.PRNGKey(2), (5, 2))
  gamma = jnp.array([-9.0, -6.0, -1.0, 2.0, 5.0])
  got = net.apply(params, z, gamma)
  unit = toy2d.MLPDenoiser(hidden=16, gamma_min=0.0, gamma_max=1.0)
  np.testing.assert_allclose(got, unit.apply(params, z, (gamma + 9.0) / 14.0), rtol=1e-5, atol=1e-6)
  moved = net.apply(params, z, gamma[::-1])
  assert np.abs(np.asarray(got - moved)).min(-1)[[0, 1, 3, 4]].min() > 1e-3


def test_train_uses_its_data_key_flag_and_endpoints_and_refuses_none():
  """Three steps (the first at learning rate 0): the same keys give the same first losses in
  both modes, variance_minimizing changes the later ones (the γ gradients differ), another
  data key changes the batches, and γ starts at the endpoints given. No steps or no batch is
  refused."""
  kw = dict(steps=3, batch=8, hidden=16, n_features=8, gamma_min=-9.0, gamma_max=5.0)
  key, data = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  var_min = toy2d.train(key, data, **kw)
  plain = toy2d.train(key, data, variance_minimizing=False, **kw)
  other_data = toy2d.train(key, jax.random.PRNGKey(2), variance_minimizing=False, **kw)
  np.testing.assert_allclose(var_min["losses"][:2], plain["losses"][:2], rtol=1e-5)
  assert var_min["losses"][2] != plain["losses"][2]
  assert np.all(np.asarray(other_data["losses"]) != np.asarray(plain["losses"]))
  for out in (var_min, plain):
    np.testing.assert_allclose(out["gamma_fn"](jnp.array([0.0, 1.0])), [-9.0, 5.0], atol=0.05)
    assert (out["denoiser"].gamma_min, out["denoiser"].gamma_max) == (-9.0, 5.0)
  assert var_min["losses"].shape == (3,) and np.isfinite(var_min["losses"]).all()
  for kwargs in (dict(steps=0), dict(steps=5, batch=0)):
    with pytest.raises(ValueError, match="must be >= 1"):
      toy2d.train(jax.random.PRNGKey(0), jax.random.PRNGKey(1), **{"batch": 8, **kwargs})
