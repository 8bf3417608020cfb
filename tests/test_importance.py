"""Importance-sampled diffusion time: a proper proposal, unbiased, and lower variance."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import importance, schedules, toy

GAMMA = schedules.fixed_linear()


def test_proposal_is_a_normalised_floored_density_sampled_by_inverse_cdf():
  m2 = np.r_[np.zeros(5), np.linspace(1.0, 9.0, 10) ** 2, np.ones(5)]
  params = importance.proposal_from_second_moment(m2, uniform_mix=0.2, spread=0)
  probs = np.asarray(params["probs"])
  assert probs.shape == (20,) and abs(probs.sum() - 1.0) < 1e-6
  assert probs.min() >= 0.2 / 20 - 1e-7  # q(t) >= uniform_mix
  # q ∝ sqrt(m2) away from the floor
  np.testing.assert_allclose((probs[5:15] - 0.01) / (probs[5] - 0.01), np.linspace(1, 9, 10), rtol=1e-4)
  proposal = importance.time_proposal(params)
  u = jax.random.uniform(jax.random.PRNGKey(0), (200_000,))
  t, q = jax.jit(lambda p, u: p(u))(proposal, u)  # a pytree: crosses jit as an argument
  t, q = np.asarray(t), np.asarray(q)
  assert t.min() >= 0.0 and t.max() <= 1.0
  np.testing.assert_allclose(q, np.asarray(importance.density(params, t)), rtol=1e-5)
  freq = np.histogram(t, bins=20, range=(0, 1))[0] / t.size
  assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs / t.size) + 1e-4)
  assert len(jax.tree_util.tree_leaves(proposal)) == 1


def test_every_draw_has_the_density_of_its_bin_at_many_bins():
  """(t, q) from the proposal agree with density(t) even at bin edges: with 1,000 bins fp32
  rounding put 54 of 2M draws on the next bin's edge, where q differed from density(t) up to
  97×, and the train step's EMA filed ℓ(t)·q_{b+1}/q_b under bin b + 1."""
  m2 = np.exp(3 * np.random.default_rng(0).normal(size=1000))
  params = importance.proposal_from_second_moment(m2, spread=0)
  u = jax.random.uniform(jax.random.PRNGKey(0), (2_000_000,))
  t, q = jax.jit(importance.time_proposal(params))(u)
  np.testing.assert_allclose(q, importance.density(params, t), rtol=1e-5)


def test_padding_takes_the_top_of_each_bin():
  """A padded batch's padding (keep False) sat anywhere in the bin, so in a bf16 network's fp32
  share (the least noisy rows) it could take the place of a real row. It takes the top of the
  bin now, behind every real row, which keeps its own times."""
  keep = jnp.arange(8) < 5
  for b in (0, 3):
    t, _ = importance.times_in_bin(jax.random.PRNGKey(1), jnp.int32(b), 8, 4, keep)
    alone, _ = importance.times_in_bin(jax.random.PRNGKey(1), jnp.int32(b), 8, 4)
    np.testing.assert_array_equal(t[:5], alone[:5])
    assert t[5:].min() > t[:5].max() and t[5:].max() < (b + 1) / 4 and t.min() >= b / 4


def test_proposal_inputs_are_validated():
  with pytest.raises(ValueError, match="uniform_mix"):
    importance.proposal_from_second_moment(np.ones(4), uniform_mix=0.0)
  # A nan bin used to give the uniform proposal, an inf bin nan times for every draw.
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match=r"not finite in bins \[1\]"):
      importance.proposal_from_second_moment(np.array([1.0, bad, 1.0, 1.0]))
  for shape in ((4, 1), (0,)):
    with pytest.raises(ValueError, match="one value per bin"):
      importance.proposal_from_second_moment(np.ones(shape))


def test_update_second_moment_tracks_per_bin_means():
  m2 = jnp.ones(4)
  t = jnp.array([0.1, 0.15, 0.6])
  loss = jnp.array([2.0, 4.0, 3.0])
  new = importance.update_second_moment(m2, t, loss, decay=0.5)
  np.testing.assert_allclose(np.asarray(new), [0.5 + 0.5 * 10.0, 1.0, 0.5 + 0.5 * 9.0, 1.0])


def test_importance_sampling_is_unbiased_and_reduces_variance_on_a_fixed_batch():
  data = toy.FactorizedDiscrete.random(0, dims=4, vocab_size=4)
  eps_fn = data.eps_fn()
  x = data.sample(jax.random.PRNGKey(0), 256)
  params = importance.fit_time_proposal(eps_fn, GAMMA, [data.sample(jax.random.PRNGKey(1), 256)],
                                        jax.random.PRNGKey(2), vocab_size=4, num_bins=50,
                                        uniform_mix=0.1, spread=1)
  res = importance.estimator_variance(eps_fn, GAMMA, x, jax.random.PRNGKey(3),
                                     importance.time_proposal(params), vocab_size=4, repeats=200)
  ratio_u = res["ratios"]["uniform/importance+antithetic"]
  ratio_a = res["ratios"]["antithetic/importance+antithetic"]
  mu_u, mu_is = res["uniform"]["mean"], res["importance+antithetic"]["mean"]
  se = math.hypot(res["uniform"]["mean_se"], res["importance+antithetic"]["mean_se"])
  print(f"batch-mean diffusion term (bits/dim): uniform {mu_u:.4f}, importance+antithetic {mu_is:.4f} "
        f"(SE of the difference {se:.4f}); variance ratios {res['ratios']}")
  assert abs(mu_u - mu_is) < 4 * se
  assert ratio_u > 2.5 and ratio_a > 2.0


def test_draws_follow_the_exact_piecewise_linear_quantile_function():
  """t = F⁻¹(u) for the piecewise-linear CDF F(t) = Σ_{c<b} p_c + (t·n − b) p_b, b = ⌊t·n⌋: uniform
  inside each bin, not just the right mass per bin (checked on a grid of u against float64)."""
  probs = np.random.default_rng(1).uniform(0.2, 3.0, size=7)
  params = {"probs": jnp.asarray(probs, jnp.float32)}
  u = np.linspace(0.0, 1.0, 2001, dtype=np.float32)[:-1] + 1e-4
  t, q = (np.asarray(a, np.float64) for a in jax.jit(importance.time_proposal(params))(jnp.asarray(u)))
  p = probs / probs.sum()
  b = np.minimum(np.floor(t * 7), 6).astype(int)
  cdf_t = np.r_[0.0, np.cumsum(p)][b] + (t * 7 - b) * p[b]
  np.testing.assert_allclose(cdf_t, u, atol=2e-6)
  np.testing.assert_allclose(q, 7 * p[b], rtol=1e-5)


def test_update_second_moment_weights_the_old_value_by_decay():
  """m₂ ← decay·m₂ + (1 − decay)·mean_{t∈b} ℓ², with an asymmetric decay; t = 1 falls in the last
  bin (b = ⌊t·n⌋ clipped to n − 1), as density(1) reads it."""
  m2 = jnp.array([1.0, 2.0, 3.0, 4.0])
  t = jnp.array([0.1, 0.15, 1.0])
  new = importance.update_second_moment(m2, t, jnp.array([2.0, 4.0, 3.0]), decay=0.9)
  np.testing.assert_allclose(np.asarray(new), [0.9 + 0.1 * 10.0, 2.0, 3.0, 0.9 * 4.0 + 0.1 * 9.0],
                             rtol=1e-6)


def test_spread_takes_the_maximum_over_both_neighbours():
  """spread = k: r_b → max_{|c−b|≤k} r_c on both sides, then p_b = (1 − λ) r_b/Σr + λ/n (and
  p_b = 1/n when Σr = 0)."""
  m2 = np.zeros(12)
  m2[5] = 4.0
  for k, support in [(1, [4, 5, 6]), (2, [3, 4, 5, 6, 7])]:
    r = np.zeros(12)
    r[support] = 2.0
    probs = np.asarray(importance.proposal_from_second_moment(m2, uniform_mix=0.3, spread=k)["probs"])
    np.testing.assert_allclose(probs, 0.7 * r / r.sum() + 0.3 / 12, rtol=1e-6)
  # an all-zero m₂ (no loss seen yet) gives the uniform proposal, still normalised
  np.testing.assert_allclose(importance.proposal_from_second_moment(np.zeros(12))["probs"],
                             np.full(12, 1 / 12), rtol=1e-6)


def test_loss_moments_are_bin_averages_of_the_closed_form():
  """With ε̂ = 0, ℓ(t) = ½ γ'(t) ||ε||², so per bin E[ℓ] = ½ D · n(γ(t_{b+1}) − γ(t_b)) and
  E[ℓ²] = ¼ (D² + 2D) · n ∫_bin γ'(t)² dt; γ(t) = −5 + 10 t³ makes γ' vary inside a bin (the
  draws must be uniform over the bin, not at its centre) and the moments are per image."""
  dims, n = 16, 4
  gamma_fn = lambda t: -5.0 + 10.0 * jnp.asarray(t, jnp.float32) ** 3
  x = np.zeros((4096, dims), np.int32)
  res = importance.loss_moments(lambda z, g: jnp.zeros_like(z), gamma_fn, [x, x],
                                jax.random.PRNGKey(0), vocab_size=4, num_bins=n)
  lo, hi = np.arange(n) / n, np.arange(1, n + 1) / n
  mean = 0.5 * dims * n * 10.0 * (hi**3 - lo**3)
  second = 0.25 * (dims**2 + 2 * dims) * n * 900.0 * (hi**5 - lo**5) / 5.0
  assert res["num_images"] == 8192
  np.testing.assert_allclose(res["mean"], mean, rtol=0.06)
  np.testing.assert_allclose(res["second_moment"], second, rtol=0.1)


def test_estimator_variance_matches_the_closed_form_for_a_zero_denoiser():
  """With ε̂ = 0 and linear γ, ℓ = ½ Δγ ||ε||² whatever t is: the batch mean in bits/dim has mean
  Δγ/(2 ln 2) and variance (Δγ/(2 ln 2))² · 2/(D B) under every method (a uniform proposal has
  q = 1, and all methods share ε), and mean_se = sqrt(variance/repeats)."""
  dims, batch, repeats = 8, 16, 400
  proposal = importance.time_proposal({"probs": jnp.full((10,), 0.1)})
  res = importance.estimator_variance(lambda z, g: jnp.zeros_like(z), GAMMA,
                                      np.zeros((batch, dims), np.int32), jax.random.PRNGKey(0),
                                      proposal, vocab_size=4, repeats=repeats)
  mean = float(GAMMA(1.0) - GAMMA(0.0)) / (2 * math.log(2))
  var = mean**2 * 2 / (dims * batch)
  for name in ("uniform", "antithetic", "importance", "importance+antithetic"):
    r = res[name]
    assert abs(r["mean"] - mean) < 4 * math.sqrt(var / repeats), (name, r)
    assert abs(r["variance"] / var - 1) < 0.3, (name, r)  # the estimate's sd: 7 %
    np.testing.assert_allclose(r["mean_se"], math.sqrt(r["variance"] / repeats), rtol=1e-6)
  np.testing.assert_allclose(list(res["ratios"].values()), 1.0, rtol=1e-4)
