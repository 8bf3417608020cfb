"""Probability-flow ODE likelihood: exact on Gaussians, valid bounds on discrete data."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, logsumexp
from scipy.stats import norm

from vdm import elbo, ode_likelihood, schedules, toy

GAMMA = schedules.fixed_linear()
G0, G1 = (float(g) for g in GAMMA(jnp.array([0.0, 1.0])))
ALPHA_0, SIGMA_0 = (float(a) for a in schedules.alpha_sigma(jnp.float32(G0)))


def _z0(gauss, n, seed):
  """Points distributed as q(z_0) = N(α_0 μ, α_0² Σ + σ_0² I)."""
  y = gauss.sample(jax.random.PRNGKey(seed), n)
  return ALPHA_0 * y + SIGMA_0 * jax.random.normal(jax.random.PRNGKey(seed + 1), y.shape)


def test_gaussian_toy_denoiser_is_minus_sigma_times_the_score():
  gauss = toy.Gaussian.random(2, dims=3)
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  gamma = jnp.linspace(-8.0, 4.0, 5)
  score = jax.vmap(jax.grad(lambda zi, gi: gauss.log_prob(zi[None], gi)[0]))(z, gamma)
  sigma = jnp.sqrt(schedules.sigma2(gamma))[:, None]
  np.testing.assert_allclose(np.asarray(gauss.eps_fn()(z, gamma)), np.asarray(-sigma * score),
                             rtol=1e-4, atol=1e-5)
  # q(z_t) tends to the data density as γ → −∞: compare with scipy at γ = −30.
  from scipy.stats import multivariate_normal
  cov = gauss.rotation @ np.diag(gauss.scales**2) @ gauss.rotation.T
  np.testing.assert_allclose(np.asarray(gauss.log_prob(z, -30.0)),
                             multivariate_normal(gauss.mean, cov).logpdf(np.asarray(z)), rtol=1e-4)


def test_exact_divergence_matches_the_diffused_gaussian_density():
  gauss = toy.Gaussian.random(0, dims=3)
  z0 = _z0(gauss, 16, 1)
  out = ode_likelihood.ode_log_density(gauss.eps_fn(), GAMMA, z0, divergence="exact",
                                       rtol=1e-6, atol=1e-6,
                                       prior_log_prob=lambda z: gauss.log_prob(z, G1))
  err = np.abs(np.asarray(out["log_prob"] - gauss.log_prob(z0, G0)))
  print(f"exact divergence: max |ODE − analytic| log q(z_0) = {err.max():.2e} nats, NFE {int(out['nfe'])}")
  assert bool(out["converged"])
  assert err.max() < 1e-3
  # The flow of a Gaussian is linear, and the solve follows it to z_1.
  np.testing.assert_allclose(out["z_1"], gauss.flow(z0, G0, G1), atol=1e-4)


def test_hutchinson_is_unbiased_for_a_non_diagonal_jacobian():
  """One point, 512 independent single-probe solves (one batched solve): their mean matches the
  analytic log-density, with the standard N(0, I) prior accounted for exactly via z_1."""
  gauss = toy.Gaussian.random(3, dims=3)
  z0 = jnp.repeat(_z0(gauss, 1, 5), 512, axis=0)
  out = ode_likelihood.ode_log_density(gauss.eps_fn(), GAMMA, z0, jax.random.PRNGKey(0),
                                       divergence="hutchinson", num_probes=1, rtol=1e-5, atol=1e-5)
  z1 = out["z_1"]
  expected = (gauss.log_prob(z0, G0) + ode_likelihood.standard_normal_log_prob(z1)
              - gauss.log_prob(z1, G1))
  diff = np.asarray(out["log_prob"] - expected)
  se = diff.std(ddof=1) / math.sqrt(diff.size)
  print(f"Hutchinson (1 probe): mean error {diff.mean():+.4f} ± {se:.4f} nats, per-solve sd {diff.std():.3f}")
  assert diff.std() > 0.05  # the rotation makes single probes noisy ...
  assert abs(diff.mean()) < 4 * se + 1e-3  # ... but unbiased


def _discretized_gaussian_nll(gauss, x, vocab_size):
  """−log ∫_bin(x) N(y; μ, s² + σ_0²/α_0²) dy, exactly (diagonal Gaussian, bins of width 2/V)."""
  scale = np.sqrt(np.asarray(gauss.scales, np.float64) ** 2 + (SIGMA_0 / ALPHA_0) ** 2)
  lo = 2.0 * x / vocab_size - 1.0
  hi = lo + 2.0 / vocab_size
  p = norm.cdf((hi - gauss.mean) / scale) - norm.cdf((lo - gauss.mean) / scale)
  return -np.log(p).sum(-1)


def _mixture_log_q(data, z, gamma, xp):
  """log q(z_t) of factorised discrete data: Σ_i log Σ_v p_iv N(z_i; α_t x_v, σ²_t)."""
  x_v = 2 * (np.arange(data.vocab_size) + 0.5) / data.vocab_size - 1
  alpha, sigma = math.sqrt(expit(-gamma)), math.sqrt(expit(gamma))
  log_n = -0.5 * ((z[..., None] - alpha * x_v) / sigma) ** 2 - math.log(math.sqrt(2 * math.pi) * sigma)
  lse = logsumexp if xp is np else jax.scipy.special.logsumexp
  return lse(xp.log(xp.asarray(data.probs)) + log_n, axis=-1).sum(-1)


def test_exact_for_diffused_discrete_data_a_non_gaussian_density():
  """Factorised discrete data x_i ∈ {x_v} under the forward process is a Gaussian mixture per
  dimension, log q(z_t) = Σ_i log Σ_v p_iv N(z_i; α_t x_v, σ²_t); with q(z_1) as the prior and the
  data's exact ε̂, the ODE gives log q(z_0) (against float64; the Jacobian is diagonal, so one
  Rademacher probe is its exact trace)."""
  data = toy.FactorizedDiscrete.random(0, dims=64, vocab_size=4)
  x = np.asarray(data.sample(jax.random.PRNGKey(1), 8))
  x_v = 2 * (np.arange(4) + 0.5) / 4 - 1
  z_0 = ALPHA_0 * x_v[x] + SIGMA_0 * np.random.default_rng(0).normal(size=x.shape)
  out = ode_likelihood.ode_log_density(
      data.eps_fn(), GAMMA, jnp.asarray(z_0, jnp.float32), jax.random.PRNGKey(0), rtol=1e-8,
      atol=1e-8, prior_log_prob=lambda z: _mixture_log_q(data, z, G1, jnp))
  err = np.asarray(out["log_prob"]) - _mixture_log_q(data, np.asarray(z_0, np.float32).astype(np.float64), G0, np)
  print(f"max |ODE − exact| {np.abs(err).max():.2e} nats")
  assert bool(out["converged"]) and np.abs(err).max() < 1e-2


def test_exact_for_a_learned_schedule_and_the_standard_prior():
  """Gaussian data, exact ε̂, p_1 = N(0, I): log p_0(z_0) = log N(Φ(z_0); 0, I) + ½ Σ log(v_1/v_0),
  Φ the exact linear flow from γ(0) to γ(1), v_t = α²_t s² + σ²_t; any increasing γ with those
  endpoints gives the same, here a LearnedMonotone with perturbed (non-linear) parameters."""
  gauss = toy.Gaussian.random(4, dims=4)
  sched = schedules.LearnedMonotone()
  params = sched.init(jax.random.PRNGKey(3), jnp.zeros((1,)))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  gamma_fn = schedules.bind(sched, params)
  g0, g1 = (float(g) for g in gamma_fn(jnp.array([0.0, 1.0])))
  y = gauss.sample(jax.random.PRNGKey(1), 16)
  z_0 = math.sqrt(expit(-g0)) * y + math.sqrt(expit(g0)) * jax.random.normal(jax.random.PRNGKey(2), y.shape)
  v0, v1 = (expit(-g) * gauss.scales**2 + expit(g) for g in (g0, g1))
  z_1 = np.asarray(gauss.flow(z_0, g0, g1), np.float64)
  expected = -0.5 * (z_1**2).sum(-1) - 2 * math.log(2 * math.pi) + 0.5 * np.log(v1 / v0).sum()
  out = ode_likelihood.ode_log_density(gauss.eps_fn(), gamma_fn, z_0, divergence="exact")
  t = jnp.linspace(0.0, 1.0, 11)
  assert float(jnp.abs(gamma_fn(t) - (g0 + t * (g1 - g0))).max()) > 0.3  # visibly non-linear
  assert bool(out["converged"])
  np.testing.assert_allclose(np.asarray(out["log_prob"]), expected, atol=1e-3)


def test_uniform_dequantization_bounds_the_discretized_density():
  """Checks the Jacobian bookkeeping: with the Gaussian's optimal ε̂ (and its exact q_1 as prior)
  the ODE model over y is N(μ, s² + σ_0²/α_0²), whose discretisation is known in closed form; the
  uniform-dequantised bound must sit just above it (a Jensen gap, tiny for narrow bins)."""
  vocab_size = 64
  gauss = toy.Gaussian.random(1, dims=2, rotate=False)
  y = np.asarray(gauss.sample(jax.random.PRNGKey(2), 128))
  x = np.clip(np.floor((y + 1.0) * vocab_size / 2.0), 0, vocab_size - 1).astype(np.int32)
  out = ode_likelihood.ode_nll_bound(gauss.eps_fn(), GAMMA, jnp.asarray(x), jax.random.PRNGKey(3),
                                     vocab_size=vocab_size, dequantization="uniform",
                                     divergence="exact", rtol=1e-6, atol=1e-6,
                                     prior_log_prob=lambda z: gauss.log_prob(z, G1))
  gap = (np.asarray(out["nats"]) - _discretized_gaussian_nll(gauss, x, vocab_size)) / (2 * math.log(2))
  se = gap.std(ddof=1) / math.sqrt(gap.size)
  print(f"uniform dequantization: bound − exact = {gap.mean():+.5f} ± {se:.5f} bits/dim")
  assert gap.mean() > -3 * se - 1e-4
  assert gap.mean() < 0.01


def _factorized_nll(data, x):
  return -np.log(data.probs[np.arange(data.dims), np.asarray(x)]).sum(-1)


def test_vdm_dequantized_ode_bound_is_close_to_the_true_nll_of_discrete_data():
  data = toy.FactorizedDiscrete.random(0, dims=2, vocab_size=4)
  x = data.sample(jax.random.PRNGKey(0), 256)
  out = ode_likelihood.ode_nll_bound(data.eps_fn(), GAMMA, x, jax.random.PRNGKey(1), vocab_size=4,
                                     dequantization="vdm", divergence="hutchinson", rtol=1e-6, atol=1e-6)
  bound = np.asarray(out["nats"]) / (data.dims * math.log(2))
  gap = bound - _factorized_nll(data, x) / (data.dims * math.log(2))
  se = gap.std(ddof=1) / math.sqrt(gap.size)
  print(f"ODE ('vdm') bound {bound.mean():.4f} bits/dim, entropy {data.entropy_bits_per_dim():.4f}, "
        f"bound − exact NLL on the same images {gap.mean():+.4f} ± {se:.4f}, NFE {int(out['nfe'])}")
  assert bool(out["converged"])
  assert gap.mean() > -3 * se - 1e-3
  assert gap.mean() < 0.02


def test_default_tolerance_keeps_the_solve_error_below_the_bounds_scale():
  """At D = 3072 the adaptive solve's error in the bound is one-sided: with rtol = atol = 1e-5 it
  was ≈ −5 nats per image (the bound 0.002 bits/dim below the true NLL). The defaults stay within
  0.5 nats of a 1e-8 solve on the same draws."""
  data = toy.FactorizedDiscrete.random(0, dims=3072, vocab_size=4)
  x = data.sample(jax.random.PRNGKey(1), 8)
  bound = lambda **tol: np.asarray(ode_likelihood.ode_nll_bound(
      data.eps_fn(), GAMMA, x, jax.random.PRNGKey(0), vocab_size=4, dequantization="vdm",
      **tol)["nats"])
  error = bound() - bound(rtol=1e-8, atol=1e-8)
  assert np.abs(error).max() < 0.5, error


def test_nfe_counts_denoiser_calls_and_grows_with_tighter_tolerance():
  gauss = toy.Gaussian.random(0, dims=2, rotate=False)
  base = gauss.eps_fn()
  calls = []

  def eps_fn(z, gamma):
    jax.debug.callback(lambda: calls.append(1))
    return base(z, gamma)

  z0 = _z0(gauss, 4, 0)
  nfe = {}
  for tol in (1e-3, 1e-6):
    calls.clear()
    out = jax.block_until_ready(ode_likelihood.ode_log_density(eps_fn, GAMMA, z0, divergence="exact",
                                                               rtol=tol, atol=tol))
    nfe[tol] = int(out["nfe"])
    assert nfe[tol] == len(calls)
  assert nfe[1e-6] > nfe[1e-3]


def test_evaluate_ode_likelihood_aggregates_draws():
  data = toy.FactorizedDiscrete.random(1, dims=2, vocab_size=4)
  x = np.asarray(data.sample(jax.random.PRNGKey(0), 64))
  res = ode_likelihood.evaluate_ode_likelihood(data.eps_fn(), GAMMA, [x[:32], x[32:]], jax.random.PRNGKey(0),
                                               vocab_size=4, num_draws=2, dequantization="vdm",
                                               rtol=1e-3, atol=1e-3)
  assert res["num_images"] == 64 and res["num_solves"] == 4 and res["all_converged"]
  assert res["bpd_se"] > 0 and res["nfe_mean"] > 0
  assert abs(res["bpd"] - data.entropy_bits_per_dim()) < 5 * res["bpd_se"] + 0.05


def test_a_solve_that_runs_out_of_steps_gives_nan_not_a_finite_bound():
  data = toy.FactorizedDiscrete.random(1, dims=2, vocab_size=4)
  x = np.asarray(data.sample(jax.random.PRNGKey(0), 16))
  out = ode_likelihood.ode_log_density(data.eps_fn(), GAMMA, _z0(toy.Gaussian.random(0, 2), 4, 0),
                                       divergence="exact", max_steps=3)
  assert not bool(out["converged"]) and np.all(np.isnan(out["log_prob"]))
  res = ode_likelihood.evaluate_ode_likelihood(data.eps_fn(), GAMMA, [x[:8], x[8:]], jax.random.PRNGKey(0),
                                               vocab_size=4, max_steps=3)
  assert res["num_unconverged"] == res["num_solves"] == 2 and not res["all_converged"]
  assert math.isnan(res["bpd"]) and math.isnan(res["bpd_se"])


def test_rejects_bad_arguments():
  z = jnp.zeros((2, 3))
  eps_fn = toy.Gaussian.random(0, 3).eps_fn()
  with pytest.raises(ValueError, match="divergence"):
    ode_likelihood.ode_log_density(eps_fn, GAMMA, z, divergence="trace")
  with pytest.raises(ValueError, match="rng"):
    ode_likelihood.ode_log_density(eps_fn, GAMMA, z, divergence="hutchinson")
  with pytest.raises(ValueError, match="solver"):
    ode_likelihood.ode_log_density(eps_fn, GAMMA, z, divergence="exact", solver="euler")
  with pytest.raises(ValueError, match="dequantization"):
    ode_likelihood.ode_nll_bound(eps_fn, GAMMA, jnp.zeros((2, 3), jnp.int32), jax.random.PRNGKey(0),
                                 vocab_size=4, dequantization="gaussian")
  # Checked before compiling, where the values are known (inside the jitted solve they are not).
  with pytest.raises(ValueError, match="outside"):
    ode_likelihood.evaluate_ode_likelihood(eps_fn, GAMMA, [np.full((2, 3), 9)], jax.random.PRNGKey(0),
                                           vocab_size=4)
  with pytest.raises(ValueError, match="not increasing"):
    ode_likelihood.ode_nll_bound(eps_fn, lambda t: 5.0 - 18.3 * t, jnp.zeros((2, 3), jnp.int32),
                                 jax.random.PRNGKey(0), vocab_size=4)
  # The public solve itself: a decreasing γ, a prior of the wrong shape, an unbounded tolerance,
  # no steps and integer data would each give a wrong number (or an unrelated error) otherwise.
  exact = dict(divergence="exact")
  for kwargs, message in [(dict(gamma_fn=lambda t: 5.0 - 18.3 * t), "not increasing"),
                          (dict(prior_log_prob=lambda z: jnp.zeros((z.shape[0], 1))),
                           r"prior_log_prob returned shape \(2, 1\)"),
                          (dict(rtol=math.inf), "must be finite and > 0"),
                          (dict(max_steps=0), "max_steps=0 must be an integer >= 1"),
                          (dict(z_0=jnp.zeros((2, 3), jnp.int32)), "expected a float32")]:
    args = dict(eps_fn=eps_fn, gamma_fn=GAMMA, z_0=z, **exact) | kwargs
    with pytest.raises(ValueError, match=message):
      ode_likelihood.ode_log_density(args.pop("eps_fn"), args.pop("gamma_fn"), args.pop("z_0"),
                                     **args)


def test_hutchinson_averages_its_probes():
  """With a diagonal Jacobian every Rademacher probe gives vᵀ(∂f/∂z)v = tr(∂f/∂z) exactly, so the
  mean over num_probes = 3 probes must equal the exact divergence (their sum, or Gaussian probes,
  would not)."""
  gauss = toy.Gaussian.random(0, dims=3, rotate=False)
  z0 = _z0(gauss, 8, 1)
  log_p = lambda **kw: np.asarray(ode_likelihood.ode_log_density(
      gauss.eps_fn(), GAMMA, z0, jax.random.PRNGKey(0), rtol=1e-6, atol=1e-6, **kw)["log_prob"])
  np.testing.assert_allclose(log_p(divergence="hutchinson", num_probes=3), log_p(divergence="exact"),
                             atol=1e-3)


# α²_0 = sigmoid(2) = 0.88: under GAMMA α_0 = 1 − 9e-7, which hides every factor α_0 of a bound.
G0_WIDE, G1_WIDE = -2.0, 6.0


def _recording(eps_fn):
  """eps_fn that records its inputs, and a function giving the z it saw at γ = G0_WIDE: the solve's
  first evaluation is at (z_0, γ(0)), so this is the dequantised z_0 the bound used."""
  seen = []

  def wrapped(z, gamma):
    jax.debug.callback(lambda z, g: seen.append((np.asarray(z), np.asarray(g))), z, gamma)
    return eps_fn(z, gamma)

  def z_0():
    at_0 = [z for z, g in seen if np.all(g == np.float32(G0_WIDE))]
    assert at_0 and all(np.array_equal(z, at_0[0]) for z in at_0)
    return at_0[0].astype(np.float64)

  return wrapped, z_0


def test_uniform_dequantization_bound_is_exact_per_draw_at_a_small_alpha_0():
  """Per draw: z_0 = α_0 y with y = 2(x + u)/V − 1 inside x's bin (u ∈ [0, 1)), and
  nats = −log p(y) + D log(V/2) with log p(y) = log p_0(α_0 y) + D log α_0 = log N(y; μ, s² + σ²_0/α²_0)
  (Gaussian data: exact ε̂, q(z_1) as the prior)."""
  vocab = 16
  gauss = toy.Gaussian.random(1, dims=3, rotate=False)
  y = np.asarray(gauss.sample(jax.random.PRNGKey(2), 64))
  x = np.clip(np.floor((y + 1.0) * vocab / 2.0), 0, vocab - 1).astype(np.int32)
  eps_fn, z_0_of = _recording(gauss.eps_fn())
  out = ode_likelihood.ode_nll_bound(eps_fn, schedules.fixed_linear(G0_WIDE, G1_WIDE), jnp.asarray(x),
                                     jax.random.PRNGKey(3), vocab_size=vocab, dequantization="uniform",
                                     divergence="exact", prior_log_prob=lambda z: gauss.log_prob(z, G1_WIDE))
  y_deq = z_0_of() / math.sqrt(expit(-G0_WIDE))
  u = (y_deq + 1.0) * vocab / 2.0 - x
  assert u.min() > -1e-4 and u.max() < 1.0 + 1e-4 and u.std() > 0.2
  scale = np.sqrt(gauss.scales**2 + expit(G0_WIDE) / expit(-G0_WIDE))
  expected = -norm.logpdf(y_deq, gauss.mean, scale).sum(-1) + 3 * math.log(vocab / 2.0)
  assert bool(out["converged"])
  np.testing.assert_allclose(np.asarray(out["nats"]), expected, atol=2e-3)


def test_vdm_dequantization_bound_is_the_elbo_with_the_exact_prior_per_draw():
  """Per draw z_0 = α_0 x̃ + σ_0 ε ~ q(z_0|x): nats = −log p(x|z_0) − log p_0(z_0) + log N(z_0; α_0 x̃, σ²_0 I),
  p_0 the exact q(z_0) (factorised discrete data: exact ε̂, q(z_1) as the prior), at α²_0 = 0.88."""
  data = toy.FactorizedDiscrete.random(0, dims=2, vocab_size=4)
  x = np.asarray(data.sample(jax.random.PRNGKey(1), 64))
  eps_fn, z_0_of = _recording(data.eps_fn())
  out = ode_likelihood.ode_nll_bound(eps_fn, schedules.fixed_linear(G0_WIDE, G1_WIDE), jnp.asarray(x),
                                     jax.random.PRNGKey(2), vocab_size=4, dequantization="vdm",
                                     divergence="exact",
                                     prior_log_prob=lambda z: _mixture_log_q(data, z, G1_WIDE, jnp))
  z_0 = z_0_of()
  alpha_0, sigma_0 = math.sqrt(expit(-G0_WIDE)), math.sqrt(expit(G0_WIDE))
  x_tilde = 2 * (x + 0.5) / 4 - 1
  eps = (z_0 - alpha_0 * x_tilde) / sigma_0
  assert abs(eps.mean()) < 0.4 and abs(eps.std() - 1.0) < 0.2  # 128 draws of N(0, 1)
  recon = np.asarray(elbo.reconstruction_loss(jnp.asarray(x), jnp.asarray(z_0, jnp.float32),
                                              jnp.float32(G0_WIDE), vocab_size=4))
  expected = (recon - _mixture_log_q(data, z_0, G0_WIDE, np)
              + norm.logpdf(z_0, alpha_0 * x_tilde, sigma_0).sum(-1))
  assert bool(out["converged"])
  np.testing.assert_allclose(np.asarray(out["nats"]), expected, atol=2e-3)
