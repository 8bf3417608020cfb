"""Samplers: with the Bayes-optimal denoiser each one reproduces a known discrete distribution."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from vdm import elbo, samplers, schedules, toy

GAMMA = schedules.fixed_linear()
DIST = toy.FactorizedDiscrete.random(4, dims=8, vocab_size=4, concentration=1.0)
N = 4000


def _z_1(dist, n=N):
  """z_1 ~ q(z_1) = ∫ q(z_1|x) p(x) dx: the exact marginal, so only the sampler's error is tested."""
  alpha_1, sigma_1 = schedules.alpha_sigma(GAMMA(1.0))
  x = elbo.scale_data(dist.sample(jax.random.PRNGKey(7), n), dist.vocab_size)
  return alpha_1 * x + sigma_1 * jax.random.normal(jax.random.PRNGKey(0), x.shape)


def _run(name, eps_fn, z_1, num_steps, **kwargs):
  fn = functools.partial(samplers.SAMPLERS[name], **kwargs)
  return jax.jit(lambda z, r: fn(eps_fn, GAMMA, z, num_steps, r))(z_1, jax.random.PRNGKey(1))


def _chi2_pvalue(x, probs):
  counts = np.stack([np.bincount(x[:, i], minlength=probs.shape[1]) for i in range(probs.shape[0])])
  expected = x.shape[0] * probs
  return stats.chi2.sf(((counts - expected) ** 2 / expected).sum(), probs.size - probs.shape[0])


STEPS = {"ancestral": 300, "ddim": 500, "euler_maruyama": 500, "probability_flow": 100}


@pytest.mark.parametrize("name", list(STEPS))
def test_sampler_reproduces_data_distribution(name):
  z_0 = _run(name, DIST.eps_fn(), _z_1(DIST), STEPS[name])
  x = np.asarray(samplers.decode(z_0, GAMMA(0.0), vocab_size=DIST.vocab_size))
  assert _chi2_pvalue(x, DIST.probs) > 1e-3


def test_frequency_test_detects_a_wrong_denoiser():
  other = toy.FactorizedDiscrete.random(5, dims=8, vocab_size=4, concentration=1.0)
  z_0 = _run("ancestral", other.eps_fn(), _z_1(DIST), STEPS["ancestral"])
  x = np.asarray(samplers.decode(z_0, GAMMA(0.0), vocab_size=4))
  assert _chi2_pvalue(x, DIST.probs) < 1e-6


def _point_mass_eps_fn(x_star):
  """The exact denoiser of data x = x*: ε̂ = (z_t − α_t x*)/σ_t."""
  return lambda z, g: (z - jnp.sqrt(jax.nn.sigmoid(-g))[:, None] * x_star) / jnp.sqrt(jax.nn.sigmoid(g))[:, None]


# γ from 95 to 100 puts α_s and α_t below float32's range (α² = sigmoid(−γ) flushes to 0): the steps
# must still be finite and exact, as they are where the samplers form α_s/α_t in log space.
GAMMA_STEPS = [(-3.0, 2.0), (95.0, 100.0)]


@pytest.mark.parametrize("gamma_s,gamma_t", GAMMA_STEPS)
def test_ancestral_step_is_the_analytic_posterior(gamma_s, gamma_t):
  """For a point mass x*, p(z_s|z_t) must be q(z_s|z_t, x*) = N(μ, σ²) with
  μ = α_{t|s} σ²_s/σ²_t z_t + α_s σ²_{t|s}/σ²_t x*, σ² = σ²_{t|s} σ²_s/σ²_t (α_{t|s} = α_t/α_s)."""
  gamma_fn = schedules.fixed_linear(gamma_s, gamma_t)
  x_star = 0.3
  z_1 = jnp.full((200_000, 1), 0.8)
  z_0 = np.asarray(samplers.ancestral(_point_mass_eps_fn(x_star), gamma_fn, z_1, 1, jax.random.PRNGKey(0)))
  a2_t, a2_s = special.expit(-gamma_t), special.expit(-gamma_s)
  s2_t, s2_s = 1 - a2_t, 1 - a2_s
  a_ts = np.sqrt(a2_t / a2_s)
  s2_ts = s2_t - a_ts**2 * s2_s
  mean = a_ts * s2_s / s2_t * 0.8 + np.sqrt(a2_s) * s2_ts / s2_t * x_star
  var = s2_ts * s2_s / s2_t
  assert abs(z_0.mean() - mean) < 4 * np.sqrt(var / z_0.size)
  assert abs(z_0.var() / var - 1) < 0.01


@pytest.mark.parametrize("gamma_s,gamma_t", GAMMA_STEPS)
def test_ddim_step_is_exact_for_a_point_mass(gamma_s, gamma_t):
  """With x̂ = x* exact, one DDIM step gives z_s = α_s x* + σ_s ε̂, ε̂ = (z_t − α_t x*)/σ_t."""
  gamma_fn = schedules.fixed_linear(gamma_s, gamma_t)
  x_star, z_t = 0.3, np.linspace(-2.0, 2.0, 5)[:, None]
  z_s = np.asarray(samplers.ddim(_point_mass_eps_fn(x_star), gamma_fn, jnp.asarray(z_t, jnp.float32), 1))
  a2_t, a2_s = special.expit(-gamma_t), special.expit(-gamma_s)
  eps = (z_t - np.sqrt(a2_t) * x_star) / np.sqrt(1 - a2_t)
  np.testing.assert_allclose(z_s, np.sqrt(a2_s) * x_star + np.sqrt(1 - a2_s) * eps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,order", [("ddim", 1), ("probability_flow", 2)])
def test_deterministic_samplers_converge_to_the_exact_flow_map_of_a_gaussian(name, order):
  """For Gaussian data the probability-flow ODE maps z_1 to z_0 linearly (toy.Gaussian.flow).
  DDIM is first-order in 1/N, Heun second-order: 10× the steps cut the error 10× or 100×."""
  gauss = toy.Gaussian.random(2, dims=3)
  z_1 = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
  exact = np.asarray(gauss.flow(z_1, GAMMA(1.0), GAMMA(0.0)))
  errors = [float(np.abs(np.asarray(_run(name, gauss.eps_fn(), z_1, n)) - exact).max())
            for n in (25, 250)]
  print(f"{name}: max |z_0 − exact| {errors}")
  assert errors[1] < 1.5 * 10.0**-order * errors[0] and errors[1] < 2e-2


@pytest.mark.parametrize("name,kwargs", [("ancestral", {}), ("euler_maruyama", {}),
                                         ("ddim", {"eta": 0.5})])
def test_stochastic_samplers_give_a_gaussians_moments(name, kwargs):
  """For y ~ N(0.3, 0.2²) the reverse process ends at z_0 ~ N(α_0 0.3, α²_0 0.04 + σ²_0). Unlike
  the discrete frequency test, a 5 % error in the injected noise's variance fails here (the
  samplers' own bias at N = 1000 is −0.9 % and +0.1 %; the estimate's standard error 0.6 %)."""
  gauss = toy.Gaussian(np.array([0.3]), np.array([0.2]))
  (alpha_1, sigma_1), (alpha_0, sigma_0) = (schedules.alpha_sigma(GAMMA(t)) for t in (1.0, 0.0))
  y = gauss.sample(jax.random.PRNGKey(5), 50_000)
  z_1 = alpha_1 * y + sigma_1 * jax.random.normal(jax.random.PRNGKey(6), y.shape)
  z_0 = np.asarray(_run(name, gauss.eps_fn(), z_1, 1000, **kwargs), np.float64)
  variance = float(alpha_0**2 * 0.04 + sigma_0**2)
  assert abs(z_0.mean() - float(alpha_0) * 0.3) < 0.005
  print(f"{name}: var(z_0) / the exact one {z_0.var() / variance:.4f}")
  assert abs(z_0.var() / variance - 1) < 0.025


def test_ddim_eta_spans_deterministic_ddim_and_ancestral():
  """η = 0 is DDIM (and draws nothing); η = 1 is the ancestral step, posterior noise included;
  an η outside [0, 1] (√ of a negative variance) and a missing key are refused."""
  z_1 = _z_1(DIST, 64)
  np.testing.assert_array_equal(_run("ddim", DIST.eps_fn(), z_1, 20, eta=0.0),
                                samplers.ddim(DIST.eps_fn(), GAMMA, z_1, 20))
  np.testing.assert_allclose(_run("ddim", DIST.eps_fn(), z_1, 20, eta=1.0),
                             _run("ancestral", DIST.eps_fn(), z_1, 20), atol=1e-6)
  # One step from γ_t = 2 to γ_s = −3 with the exact denoiser of a point mass x* = 0.3:
  # z_s ~ N(α_s x* + σ_s sqrt(1 − η² c) ε̂, η² c σ²_s), c = 1 − e^{γ_s − γ_t}.
  z_s = np.asarray(samplers.ddim(_point_mass_eps_fn(0.3), schedules.fixed_linear(-3.0, 2.0),
                                 jnp.full((100_000, 1), 0.8), 1, jax.random.PRNGKey(0), eta=0.5))
  c, eps_hat = -math.expm1(-5.0), (0.8 - math.sqrt(special.expit(-2.0)) * 0.3) / math.sqrt(
      special.expit(2.0))
  var = 0.25 * c * special.expit(-3.0)
  mean = (math.sqrt(special.expit(3.0)) * 0.3
          + math.sqrt(special.expit(-3.0) * (1 - 0.25 * c)) * eps_hat)
  assert abs(z_s.mean() - mean) < 4 * math.sqrt(var / z_s.size)
  assert abs(z_s.var() / var - 1) < 0.02
  with pytest.raises(ValueError, match=r"eta=1.5 must be in \[0, 1\]"):
    samplers.ddim(DIST.eps_fn(), GAMMA, z_1, 10, jax.random.PRNGKey(0), eta=1.5)
  for name in ("ancestral", "euler_maruyama"):
    with pytest.raises(ValueError, match=f"{name} draws noise: pass rng"):
      samplers.SAMPLERS[name](DIST.eps_fn(), GAMMA, z_1, 10)


def test_decode_modes():
  a = _run("ddim", DIST.eps_fn(), _z_1(DIST, 64), 20)
  x_argmax = samplers.decode(a, GAMMA(0.0), vocab_size=4)
  x_sample = samplers.decode(a, GAMMA(0.0), vocab_size=4, rng=jax.random.PRNGKey(3))
  assert x_argmax.dtype == jnp.int32 and x_argmax.shape == a.shape
  np.testing.assert_array_equal(x_argmax, x_sample)  # σ_0/α_0 ≈ 1e-3 ≪ the bin width 0.5


def test_discretized_gaussian_decode_is_centred_on_x_hat_not_z_0():
  """DDPM's decoder N(x̂_0, e^{γ_0}) per bin: without rng decode gives x̂_0's bin whatever z_0 is,
  and its samples follow the bins' masses (here a scale of half a bin, so neighbours get some)."""
  vocab, gamma_0 = 16, jnp.float32(2 * math.log(1 / 16))  # e^{γ_0/2} = 1/16, half a bin
  x = jnp.arange(vocab)
  x_hat = elbo.scale_data(x, vocab) + 0.3 / vocab  # inside each bin, off centre
  z_0 = jnp.zeros(vocab)  # the VDM decoder would read every pixel as the middle of the range
  np.testing.assert_array_equal(samplers.decode(z_0, gamma_0, vocab_size=vocab,
                                                decoder="discretized_gaussian", x_hat=x_hat), x)
  many = (2000, vocab)
  draws = np.asarray(samplers.decode(jnp.zeros(many), gamma_0, vocab_size=vocab,
                                     decoder="discretized_gaussian",
                                     x_hat=jnp.broadcast_to(x_hat, many),
                                     rng=jax.random.PRNGKey(3)))
  probs = np.exp(np.asarray(elbo.decoder_log_probs(z_0, gamma_0, vocab, "discretized_gaussian",
                                                   x_hat)))
  freq = np.stack([np.bincount(draws[:, i], minlength=vocab) for i in range(vocab)]) / many[0]
  assert np.abs(freq - probs).sum(axis=1).max() < 0.08  # total variation; always the argmax: 0.48


def test_discretized_gaussian_decode_keeps_every_value_at_ddpm_noise_level():
  """At DDPM's γ_0 (β_1 = 1e-4) the decoder's scale is 1.28 bins, so the open-ended edge bins
  outweigh bins 1 and V − 2 even when x̂_0 sits at their centre: an argmax would map 1 → 0 and
  254 → 255. decode without rng returns x̂_0's bin, DDPM's noiseless output."""
  vocab, gamma_0 = 256, schedules.ddpm("linear")(0.0)
  assert float(jnp.exp(gamma_0 / 2)) / (2 / vocab) > 1.2  # the regime where the argmax is wrong
  x = jnp.arange(vocab)[None]
  x_hat = elbo.scale_data(x, vocab)
  logp = elbo.decoder_log_probs(x_hat, gamma_0, vocab, "discretized_gaussian", x_hat)
  assert np.asarray(jnp.argmax(logp, -1))[0, [1, 254]].tolist() == [0, 255]
  np.testing.assert_array_equal(samplers.decode(jnp.zeros(x.shape), gamma_0, vocab_size=vocab,
                                                decoder="discretized_gaussian", x_hat=x_hat), x)


def test_decode_refuses_a_decoder_without_its_mean():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="needs x_hat"):
    samplers.decode(z, GAMMA(0.0), decoder="discretized_gaussian")
  with pytest.raises(ValueError, match="reads z_0 alone"):
    samplers.decode(z, GAMMA(0.0), x_hat=z)
  with pytest.raises(ValueError, match="unknown decoder"):
    samplers.decode(z, GAMMA(0.0), decoder="logistic")
  with pytest.raises(ValueError, match="vocab_size=1 must be an integer >= 2"):
    samplers.decode(z, GAMMA(0.0), vocab_size=1)  # would give every value 0


def test_bad_sampler_arguments_raise():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="num_steps"):
    samplers.ddim(DIST.eps_fn(), GAMMA, z, 0)
  with pytest.raises(ValueError, match="not increasing"):
    samplers.ancestral(DIST.eps_fn(), lambda t: -t, z, 10, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="eps_fn returned shape"):
    samplers.ddim(lambda z, g: z[..., :1], GAMMA, z, 10)
  for name in samplers.SAMPLERS:  # integer noise: a scan's carry-type error, five lines long
    with pytest.raises(ValueError, match="z_1 has dtype uint8: the samplers start from float"):
      samplers.SAMPLERS[name](DIST.eps_fn(), GAMMA, z.astype(jnp.uint8), 2, jax.random.PRNGKey(0))


def test_decode_floors_into_bins_and_clips_to_the_vocabulary():
  """Without rng, x = ⌊(z_0/α_0 + 1) V/2⌋ clipped to [0, V − 1]: bin centres α_0 x̃_k give k, and
  z_0/α_0 at or beyond ±1 (c = 1 would be bin V) gives the edge values."""
  vocab, gamma_0 = 8, GAMMA(0.0)
  alpha_0 = float(schedules.alpha_sigma(gamma_0)[0])
  centres = alpha_0 * elbo.scale_data(jnp.arange(vocab), vocab)
  np.testing.assert_array_equal(samplers.decode(centres[None], gamma_0, vocab_size=vocab)[0],
                                np.arange(vocab))
  edges = jnp.array([[-3.0, -alpha_0, alpha_0, 3.0]])
  np.testing.assert_array_equal(samplers.decode(edges, gamma_0, vocab_size=vocab)[0],
                                [0, 0, vocab - 1, vocab - 1])


def test_euler_maruyama_steps_are_the_explicit_discretisation_at_t():
  """Two steps (h = ½) with the exact denoiser of a point mass x*: z_s = z_t − h f(z_t, t)
  + sqrt(β_t h) ξ, f = −½β_t z + β_t ε̂/σ_t, ε̂ = (z − α_t x*)/σ_t, β_t = γ'(t) σ²_t (drift and noise
  at t, the step's start). Each step is z ↦ a_t z + b_t + sqrt(β_t h) ξ, a_t = 1 + β_t h (½ − 1/σ²_t),
  b_t = β_t h α_t x*/σ²_t, so z_0 ~ N(a_½ (a_1 z_1 + b_1) + b_½, a²_½ β_1 h + β_½ h)."""
  gamma_min, gamma_max, x_star, z_1, h = -3.0, 2.0, 0.3, 0.8, 0.5
  z_0 = np.asarray(samplers.euler_maruyama(_point_mass_eps_fn(x_star),
                                           schedules.fixed_linear(gamma_min, gamma_max),
                                           jnp.full((100_000, 1), z_1), 2, jax.random.PRNGKey(0)))

  def step(t):
    gamma = gamma_min + (gamma_max - gamma_min) * t
    s2, beta = special.expit(gamma), (gamma_max - gamma_min) * special.expit(gamma)
    return 1 + beta * h * (0.5 - 1 / s2), beta * h * math.sqrt(special.expit(-gamma)) * x_star / s2, beta * h

  (a_1, b_1, v_1), (a_2, b_2, v_2) = step(1.0), step(0.5)
  mean, var = a_2 * (a_1 * z_1 + b_1) + b_2, a_2**2 * v_1 + v_2
  assert abs(z_0.mean() - mean) < 4 * math.sqrt(var / z_0.size)
  assert abs(z_0.var() / var - 1) < 0.02


def test_a_new_sampler_is_a_step_run_by_reverse_loop():
  """DDIM in its x̂ form, z_s = α_s x̂ + σ_s ε̂ with x̂ = (z_t − σ_t ε̂)/α_t, written as a step with
  the public ``reverse_loop`` and ``eps_at``, gives ``ddim``'s η = 0 samples; the loop checks z_1,
  N and γ as the package's samplers do."""
  eps_fn = DIST.eps_fn()

  def step(z, t, s, key):
    (a_t, s_t), (a_s, s_s) = schedules.alpha_sigma(GAMMA(t)), schedules.alpha_sigma(GAMMA(s))
    eps_hat = samplers.eps_at(eps_fn, z, GAMMA(t))
    return a_s * (z - s_t * eps_hat) / a_t + s_s * eps_hat

  z_1 = _z_1(DIST, 256)
  np.testing.assert_allclose(samplers.reverse_loop(step, GAMMA, z_1, 20),
                             samplers.ddim(eps_fn, GAMMA, z_1, 20), atol=2e-5)
  with pytest.raises(ValueError, match="z_1 has dtype int32: the samplers start from float"):
    samplers.reverse_loop(step, GAMMA, z_1.astype(jnp.int32), 20)
  with pytest.raises(ValueError, match="num_steps=0 must be"):
    samplers.reverse_loop(step, GAMMA, z_1, 0)
