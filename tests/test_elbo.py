"""The ELBO terms against closed forms, numerical integration and a known entropy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from vdm import elbo, schedules, toy

GAMMA = schedules.fixed_linear()


def test_prior_equals_closed_form_gaussian_kl():
  x = jax.random.randint(jax.random.PRNGKey(0), (5, 3, 2), 0, 256)
  for gamma_1 in [-2.0, 0.0, 5.0, 9.0]:
    got = elbo.prior_loss(elbo.scale_data(x, 256), jnp.float32(gamma_1))
    mu = np.sqrt(1 / (1 + np.exp(gamma_1))) * (2 * (np.asarray(x, np.float64) + 0.5) / 256 - 1)
    var = 1 / (1 + np.exp(-gamma_1))
    kl = 0.5 * (var + mu**2 - 1 - np.log(var))  # KL(N(mu, var) || N(0, 1))
    np.testing.assert_allclose(got, kl.reshape(5, -1).sum(-1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("x", [0, 3, 7])
def test_discretized_gaussian_decoder_equals_integral_of_density(x):
  vocab, log_scale = 8, math.log(0.3)
  means = np.linspace(-1.4, 1.4, 9)
  got = -elbo.reconstruction_loss(jnp.full((9, 1), x), jnp.zeros((9, 1)), jnp.float32(2 * log_scale),
                                  vocab_size=vocab, decoder="discretized_gaussian",
                                  x_hat=jnp.asarray(means[:, None], jnp.float32))
  centre = 2 * (x + 0.5) / vocab - 1
  lo = -np.inf if x == 0 else centre - 1 / vocab
  hi = np.inf if x == vocab - 1 else centre + 1 / vocab
  want = [np.log(integrate.quad(stats.norm(m, 0.3).pdf, lo, hi)[0]) for m in means]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", elbo.DECODERS)
def test_decoders_are_normalised(decoder):
  vocab = 16
  xs = jnp.arange(vocab)[:, None]
  z_0 = jnp.full((vocab, 1), 0.37)
  x_hat = jnp.full((vocab, 1), 0.05) if decoder == "discretized_gaussian" else None
  logp = -elbo.reconstruction_loss(xs, z_0, jnp.float32(-3.0), vocab_size=vocab, decoder=decoder,
                                   x_hat=x_hat)
  np.testing.assert_allclose(jax.scipy.special.logsumexp(logp), 0.0, atol=1e-5)
  # The whole distribution (sampling reads it) is the same decoder.
  every = elbo.decoder_log_probs(z_0[:1], jnp.float32(-3.0), vocab, decoder,
                                 None if x_hat is None else x_hat[:1])
  np.testing.assert_allclose(every[0, 0], logp, rtol=1e-6, atol=1e-6)
  # The other decoder's x_hat (missing, or given to the VDM decoder) is refused, not ignored.
  wrong = jnp.full((vocab, 1), 0.05) if x_hat is None else None
  for fn in (lambda: elbo.reconstruction_loss(xs, z_0, jnp.float32(-3.0), vocab_size=vocab,
                                              decoder=decoder, x_hat=wrong),
             lambda: elbo.decoder_log_probs(z_0, jnp.float32(-3.0), vocab, decoder, wrong)):
    with pytest.raises(ValueError, match=f"decoder='{decoder}' with x_hat"):
      fn()


def test_gamma_min_floor_is_where_float32_still_holds_the_noise():
  """schedules.check_endpoints refuses γ_min below the floor: there float32's z_t = α_t x + σ_t ε
  rounds σ_t ε coarsely or away, and even the exact denoiser of the data misses ε (an inflated
  bound). At the floor, its per-dimension error ||ε − ε̂||²/D is still small, and the decoder is
  exact."""
  data = toy.FactorizedDiscrete.random(0, dims=3072, vocab_size=256)
  x = data.sample(jax.random.PRNGKey(1), 16)
  eps = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  def error(gamma):
    z = elbo.diffuse(elbo.scale_data(x, 256), jnp.float32(gamma), eps)
    return float(jnp.mean((eps - data.eps_fn()(z, jnp.full((16,), gamma))) ** 2))
  floor = schedules.GAMMA_MIN_FLOOR
  assert error(floor) < 5e-3 and error(floor - 4) > 0.05  # 0.0018 and 0.099
  levels = jnp.arange(256)[:, None]
  z_0 = jnp.sqrt(schedules.alpha2(jnp.float32(floor))) * elbo.scale_data(levels, 256)
  np.testing.assert_allclose(elbo.reconstruction_loss(levels, z_0, jnp.float32(floor)), 0.0,
                             atol=1e-6)


@pytest.mark.parametrize("decoder", elbo.DECODERS)
def test_reconstruction_term_equals_numerical_integration(decoder):
  """E_{z_0 ~ q(z_0|x)}[−log p(x|z_0)] by quadrature over ε vs. the mean of the one-sample term."""
  vocab, gamma_0, n = 16, -4.0, 200_000
  gamma_fn = schedules.fixed_linear(gamma_0, 5.0)
  eps_fn = lambda z, g: jnp.zeros_like(z)  # so the Gaussian decoder's mean is z_0/α_0, like the VDM decoder's
  x_level = 5
  x = jnp.full((n, 1), x_level)
  terms = jax.jit(lambda r: elbo.elbo_terms(eps_fn, gamma_fn, x, r, vocab_size=vocab, decoder=decoder))(
      jax.random.PRNGKey(1))
  mc = np.asarray(terms["reconstruction"], np.float64)

  scale = math.exp(gamma_0 / 2)  # z_0/α_0 = x + e^{γ_0/2} ε
  centre = 2 * (x_level + 0.5) / vocab - 1
  levels = 2 * (np.arange(vocab) + 0.5) / vocab - 1

  def neg_log_p(e):
    y = centre + scale * e
    if decoder == "vdm":
      logits = -0.5 * (y - levels) ** 2 / scale**2
      return -(logits[x_level] - np.logaddexp.reduce(logits))
    a, b = (centre - 1 / vocab - y) / scale, (centre + 1 / vocab - y) / scale
    return -np.log(stats.norm.sf(a) - stats.norm.sf(b) if a > 0 else stats.norm.cdf(b) - stats.norm.cdf(a))

  exact = integrate.quad(lambda e: neg_log_p(e) * stats.norm.pdf(e), -8, 8, limit=200)[0]
  se = mc.std() / math.sqrt(n)
  assert abs(mc.mean() - exact) < 4 * se + 1e-4, (mc.mean(), exact, se)


def test_discrete_time_loss_converges_to_continuous_time():
  dist = toy.FactorizedDiscrete.random(1, dims=16, vocab_size=16, concentration=1.0)
  x = dist.sample(jax.random.PRNGKey(0), 8192)

  def diffusion(num_timesteps):  # common random numbers across T
    fn = jax.jit(lambda r: jnp.mean(elbo.elbo_terms(dist.eps_fn(), GAMMA, x, r, vocab_size=16,
                                                    num_timesteps=num_timesteps)["diffusion"]))
    return np.mean([fn(jax.random.PRNGKey(k)) for k in range(4)])

  l_inf = diffusion(0)
  l_t = [diffusion(t) for t in (10, 100, 1000)]
  assert l_t[0] > l_t[1] > l_t[2] > l_inf * 0.995
  assert abs(l_t[2] - l_inf) / l_inf < 0.02
  assert abs(l_t[1] - l_inf) > abs(l_t[2] - l_inf)


def test_discrete_time_loss_of_gaussian_data_equals_closed_form_and_falls_with_t():
  """Gaussian data N(μ, L Lᵀ), L = R diag(s), with its Bayes ε̂: E||ε − ε̂(z; γ)||² =
  Σ_d s²_d / (s²_d + e^γ), so L_T = Σ_{i=1}^T ½ (e^{γ_i − γ_{i−1}} − 1) Σ_d s²_d / (s²_d + e^{γ_i})
  and L_∞ = ½ Σ_d [γ − log(s²_d + e^γ)] from γ_0 to γ_1. ε − ε̂ is linear in (x − μ, ε) and 0 at
  (μ, 0), so its expected square is its sum over the rows (μ + L e_j, 0) and (μ, e_k), and the
  code's L_T, averaged over one u in each of the T steps, is exact. L_T ≥ L_{2T} ≥ L_∞."""
  gauss = toy.Gaussian.random(0, dims=4)
  dims, s2 = gauss.dims, gauss.scales.astype(np.float64) ** 2
  chol = np.asarray(gauss.rotation) * gauss.scales
  rows_x = np.concatenate([gauss.mean + chol.T, np.tile(gauss.mean, (dims, 1))])
  rows_eps = np.concatenate([np.zeros((dims, dims)), np.eye(dims)])
  gamma_0, gamma_1 = float(GAMMA(0.0)), float(GAMMA(1.0))

  def code(num_timesteps):
    u = np.repeat((np.arange(num_timesteps) + 0.5) / num_timesteps, 2 * dims)
    _, g, w = elbo.diffusion_weight(GAMMA, jnp.asarray(u, jnp.float32), num_timesteps)
    loss, _ = elbo.diffusion_loss(gauss.eps_fn(), jnp.asarray(np.tile(rows_x, (num_timesteps, 1)), jnp.float32),
                                  g, w, jnp.asarray(np.tile(rows_eps, (num_timesteps, 1)), jnp.float32))
    return float(np.asarray(loss, np.float64).sum()) / num_timesteps

  def closed(num_timesteps):
    g = gamma_0 + (gamma_1 - gamma_0) * np.arange(num_timesteps + 1) / num_timesteps
    return sum(0.5 * np.expm1(g[i] - g[i - 1]) * np.sum(s2 / (s2 + np.exp(g[i])))
               for i in range(1, num_timesteps + 1))

  l_inf = 0.5 * np.sum((gamma_1 - np.log(s2 + np.exp(gamma_1))) - (gamma_0 - np.log(s2 + np.exp(gamma_0))))
  l_t = [code(t) for t in (1, 4, 16, 64)]
  np.testing.assert_allclose(l_t, [closed(t) for t in (1, 4, 16, 64)], rtol=1e-5)
  assert l_t[0] > l_t[1] > l_t[2] > l_t[3] > l_inf, (l_t, l_inf)


def test_ddpm_schedule_gives_ddpms_weights():
  """On ``schedules.ddpm(kind, T)`` (x_i at t = (i − 1)/(T − 1)) the T − 1 step loss's weight
  ½ w_t/(T − 1) = ½ (e^{γ_t − γ_s} − 1) is DDPM's L_{t−1} weight ½ β_t / (α_t (1 − ᾱ_{t−1})) for
  t = 2..T (ε-parametrisation, σ²_t = β̃_t), since e^{γ_t − γ_s} = SNR_s / SNR_t."""
  num_steps = 1000
  for kind in ("linear", "cosine"):
    betas = schedules.ddpm_betas(kind, num_steps)
    alpha_bar = np.cumprod(1.0 - betas)
    want = 0.5 * betas[1:] / ((1.0 - betas[1:]) * (1.0 - alpha_bar[:-1]))
    u = (np.arange(num_steps - 1) + 0.5) / (num_steps - 1)
    _, _, w = elbo.diffusion_weight(schedules.ddpm(kind, num_steps), jnp.asarray(u, jnp.float32),
                                    num_steps - 1)
    np.testing.assert_allclose(0.5 * np.asarray(w, np.float64) / (num_steps - 1), want, rtol=2e-4,
                               err_msg=kind)


def test_discrete_time_grid_and_weight():
  """t_i = i/T for i = ⌊uT⌋ + 1 ∈ {1..T} (never s < 0), and w = T (e^{γ_t − γ_s} − 1), s = t − 1/T."""
  u = jnp.array([0.0, 0.05, 0.5, 1.0 - 1e-6])
  t, gamma_t, w = elbo.diffusion_weight(GAMMA, u, 10)
  np.testing.assert_allclose(t, [0.1, 0.1, 0.6, 1.0], rtol=1e-6)
  np.testing.assert_allclose(gamma_t, GAMMA(t), rtol=1e-6)
  g = np.asarray(GAMMA(jnp.asarray(t, jnp.float32)), np.float64)
  g_s = np.asarray(GAMMA(jnp.asarray(t - 0.1, jnp.float32)), np.float64)
  np.testing.assert_allclose(w, 10 * np.expm1(g - g_s), rtol=1e-4)


def test_elbo_of_optimal_denoiser_sits_at_the_entropy():
  dist = toy.FactorizedDiscrete.random(0, dims=64, vocab_size=16, concentration=1.0)
  entropy = dist.entropy_bits_per_dim()

  @jax.jit
  def batch_bpd(rng):
    rng_x, rng_elbo = jax.random.split(rng)
    x = dist.sample(rng_x, 4096)
    return elbo.bits_per_dim(elbo.elbo_terms(dist.eps_fn(), GAMMA, x, rng_elbo, vocab_size=16), x)

  bpd = np.array([batch_bpd(jax.random.PRNGKey(k)) for k in range(16)])
  mean, se = bpd.mean(), bpd.std(ddof=1) / math.sqrt(len(bpd))
  assert se < 0.01
  assert abs(mean - entropy) < 0.02, (mean, entropy, se)
  assert mean > entropy - 3 * se, (mean, entropy, se)


def test_antithetic_time_sampling_lowers_variance():
  dist = toy.FactorizedDiscrete.random(2, dims=16, vocab_size=16)
  x = dist.sample(jax.random.PRNGKey(3), 256)

  def variance(antithetic):
    fn = jax.jit(lambda r: elbo.bits_per_dim(
        elbo.elbo_terms(dist.eps_fn(), GAMMA, x, r, vocab_size=16, antithetic=antithetic), x))
    return np.var([fn(jax.random.PRNGKey(k)) for k in range(64)])

  assert variance(True) < 0.6 * variance(False)


def test_simple_loss_trains_the_discretized_gaussians_mean_at_z_0():
  """L_simple with T steps and the discretized Gaussian decoder averages the ε-MSE over DDPM's
  T + 1 latents, z_0 included: (T · mean ||ε − ε̂(z_t)||² + mean ||ε_0 − ε̂(z_0; γ_0)||²)/(T + 1)/D,
  where ε_0 is the noise of z_0 = α_0 x + σ_0 ε_0 (key 3 of the split). Without z_0 the loss had
  no gradient at γ_0, the one point that decoder's mean reads. The VDM decoder reads no ε̂."""
  dist = toy.FactorizedDiscrete.random(0, dims=4, vocab_size=8)
  x, rng, T = dist.sample(jax.random.PRNGKey(0), 32), jax.random.PRNGKey(1), 999

  def loss_and_grad_at_0(decoder):
    def loss(c):  # ε̂ scaled by ½ + c at γ_0 alone: off the optimum, where the MSE has a slope
      eps = lambda z, g: dist.eps_fn()(z, g) * jnp.where(g == GAMMA(0.0), 0.5 + c, 1.0)[:, None]
      terms = elbo.elbo_terms(eps, GAMMA, x, rng, vocab_size=8, num_timesteps=T, decoder=decoder)
      return elbo.training_loss(terms, x, "simple", T), terms
    return jax.value_and_grad(loss, has_aux=True)(0.0)

  (value, terms), grad = loss_and_grad_at_0("discretized_gaussian")
  eps_0 = jax.random.normal(jax.random.split(rng, 3)[2], x.shape)
  z_0 = elbo.diffuse(elbo.scale_data(x, 8), GAMMA(0.0), eps_0)
  mse_0 = np.sum((eps_0 - 0.5 * dist.eps_fn()(z_0, jnp.full((32,), GAMMA(0.0)))) ** 2, axis=1)
  np.testing.assert_allclose(terms["eps_mse_0"], mse_0, rtol=1e-5)
  np.testing.assert_allclose(value, (T * np.mean(terms["eps_mse"]) + mse_0.mean()) / (T + 1) / 4,
                             rtol=1e-5)
  assert grad < -1e-4  # ε̂ at γ_0 is trained, towards the optimum
  (value, terms), grad = loss_and_grad_at_0("vdm")
  assert "eps_mse_0" not in terms and grad == 0.0
  np.testing.assert_allclose(value, np.mean(terms["eps_mse"]) / 4, rtol=1e-6)


def test_training_loss_weightings():
  dist = toy.FactorizedDiscrete.random(0, dims=4, vocab_size=8)
  x = dist.sample(jax.random.PRNGKey(0), 32)
  terms = elbo.elbo_terms(dist.eps_fn(), GAMMA, x, jax.random.PRNGKey(1), vocab_size=8)
  np.testing.assert_allclose(elbo.training_loss(terms, x, "elbo"), elbo.bits_per_dim(terms, x))
  np.testing.assert_allclose(elbo.training_loss(terms, x, "simple"), np.mean(terms["eps_mse"]) / 4, rtol=1e-6)
  nats = terms["prior"] + terms["diffusion"] + terms["reconstruction"]
  np.testing.assert_allclose(elbo.bits_per_dim(terms, x), np.mean(nats) / (4 * math.log(2)), rtol=1e-6)


@pytest.mark.parametrize("decoder", elbo.DECODERS)
@pytest.mark.parametrize("num_timesteps", [0, 50])
def test_jit_gradients_are_finite_with_learned_schedule(decoder, num_timesteps):
  module = schedules.LearnedLinear()
  x = jax.random.randint(jax.random.PRNGKey(0), (8, 4, 4, 3), 0, 256)

  def loss(params, rng):
    eps_fn = lambda z, g: params["scale"] * z + g[:, None, None, None] * 1e-3
    gamma_fn = schedules.bind(module, params["gamma"])
    terms = elbo.elbo_terms(eps_fn, gamma_fn, x, rng, decoder=decoder, num_timesteps=num_timesteps)
    return elbo.training_loss(terms, x)

  params = {"scale": jnp.float32(0.5), "gamma": module.init(jax.random.PRNGKey(0), jnp.zeros(1))}
  value, grads = jax.jit(jax.value_and_grad(loss))(params, jax.random.PRNGKey(1))
  eager = loss(params, jax.random.PRNGKey(1))
  np.testing.assert_allclose(value, eager, rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads["gamma"]["params"]["w"])) > 0


def test_decoder_x_hat_is_the_closed_form_denoised_mean():
  """With ε̂(z; γ) = c·z, x̂_0 = (z_0 − σ_0 c z_0)/α_0 = z_0 (1 − c σ_0)/α_0; "vdm" reads z_0 alone."""
  c, gamma_0 = 0.3, jnp.float32(-5.0)
  z_0 = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  alpha_0, sigma_0 = math.sqrt(1 / (1 + math.exp(-5.0))), math.sqrt(1 / (1 + math.exp(5.0)))
  x_hat = elbo.decoder_x_hat(lambda z, g: c * z, z_0, gamma_0, "discretized_gaussian")
  np.testing.assert_allclose(x_hat, z_0 * (1 - c * sigma_0) / alpha_0, rtol=1e-6)
  assert elbo.decoder_x_hat(lambda z, g: c * z, z_0, gamma_0, "vdm") is None
  with pytest.raises(ValueError, match="unknown decoder 'logistic'"):
    elbo.decoder_x_hat(lambda z, g: c * z, z_0, gamma_0, "logistic")


def test_bad_arguments_raise_clear_errors():
  eps_fn = lambda z, g: z
  x = jnp.zeros((2, 3), jnp.int32)
  rng = jax.random.PRNGKey(0)
  cases = [
      (dict(vocab_size=1), "vocab_size"),
      (dict(num_timesteps=-1), "num_timesteps"),
      (dict(decoder="logistic"), "decoder"),
      (dict(num_timesteps=10, time_proposal=lambda u: (u, jnp.ones_like(u))), "continuous time"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      elbo.elbo_terms(eps_fn, GAMMA, x, rng, **kwargs)
  with pytest.raises(ValueError, match="dtype"):
    elbo.elbo_terms(eps_fn, GAMMA, jnp.zeros((2, 3)), rng)
  with pytest.raises(ValueError, match="outside"):
    elbo.elbo_terms(eps_fn, GAMMA, jnp.full((2, 3), 256), rng)
  with pytest.raises(ValueError, match="outside"):
    elbo.elbo_terms(eps_fn, GAMMA, jnp.full((2, 3), -1), rng)
  for u, num_timesteps in (([0.5, 1.5], 0), ([-0.5, 0.5], 0), ([0.5, 1.0], 10)):
    with pytest.raises(ValueError, match="u holds values in .*: times are drawn from"):
      elbo.diffusion_weight(GAMMA, jnp.array(u), num_timesteps)  # γ beyond its endpoints; t > 1
  for u, num_timesteps in (([0.0, 1.0], 0), ([0.0, 0.999], 10)):
    elbo.diffusion_weight(GAMMA, jnp.array(u), num_timesteps)
  with pytest.raises(ValueError, match="not increasing"):
    elbo.elbo_terms(eps_fn, lambda t: 5.0 - 18.3 * t, x, rng)
  with pytest.raises(ValueError, match="batch"):
    elbo.elbo_terms(eps_fn, GAMMA, jnp.zeros((3,), jnp.int32), rng)
  for bad in (lambda z, g: z[..., :1], lambda z, g: z.mean(0)):  # would broadcast silently
    for decoder in elbo.DECODERS:
      with pytest.raises(ValueError, match="eps_fn returned shape"):
        jax.jit(lambda r: elbo.elbo_terms(bad, GAMMA, x, r, decoder=decoder))(rng)


def test_time_proposal_keeps_the_diffusion_term_unbiased():
  """t ~ q(t) = ½ + t (inverse CDF t = √(¼ + 2u) − ½) and the term divided by q(t): with ε̂ = 0 and
  γ linear, E[½ γ' ||ε||² / q(t)] = ½ (γ_max − γ_min) D E_q[1/q] = ½ (γ_max − γ_min) D, as for
  uniform t (multiplying by q instead would give 13/12 of it)."""
  batch, dims = 16384, 4
  x = jnp.zeros((batch, dims), jnp.int32)

  def proposal(u):
    t = jnp.sqrt(0.25 + 2.0 * u) - 0.5
    return t, 0.5 + t

  terms = elbo.elbo_terms(lambda z, g: jnp.zeros_like(z), GAMMA, x, jax.random.PRNGKey(0),
                          vocab_size=16, time_proposal=proposal)
  got = np.asarray(terms["diffusion"], np.float64)
  se = got.std(ddof=1) / math.sqrt(batch)
  want = 0.5 * (5.0 + 13.3) * dims
  assert abs(got.mean() - want) < 4 * se, (got.mean(), want, se)
  t = np.asarray(terms["t"])
  assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 7 / 12) < 0.01  # E_q[t] = 7/12


def test_sample_times_put_one_antithetic_time_in_each_stratum():
  """Antithetic u_i = (u_0 + i/B) mod 1: exactly one u in each [k/B, (k + 1)/B)."""
  for seed, batch in [(0, 7), (1, 16), (2, 64)]:
    u = np.asarray(elbo.sample_times(jax.random.PRNGKey(seed), batch), np.float64)
    assert u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(np.sort(np.floor(u * batch)), np.arange(batch))
    np.testing.assert_allclose(np.diff(np.sort(u)), 1 / batch, atol=1e-6)
    iid = np.asarray(elbo.sample_times(jax.random.PRNGKey(seed), batch, antithetic=False))
    assert iid.shape == (batch,) and iid.min() >= 0 and iid.max() < 1


def test_masked_antithetic_times_are_those_of_the_kept_rows_alone():
  """sample_times with a mask: the n kept rows get, in order, the antithetic times of an unpadded
  batch of n (one per stratum of width 1/n); a mask of ones changes nothing. Spread over all B
  rows, the 3 kept rows of a batch of 64 would lie within 3/64 of each other. The padding comes
  after every kept row in t, so a bf16 bound's fp32 share (the least noisy rows) goes to kept rows
  alone; level with the last kept row, it took that share by the shared start u_0."""
  key = jax.random.PRNGKey(5)
  for mask in ([1, 1, 1] + [0] * 61, [1, 0, 1, 1, 0, 0, 1, 1], [0, 1, 1, 0]):
    mask = np.array(mask, np.float32)
    kept = mask > 0
    u = np.asarray(elbo.sample_times(key, mask.size, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(u[kept], elbo.sample_times(key, int(kept.sum())), atol=1e-7)
    assert u.min() >= 0 and u.max() < 1
    assert u[~kept].min() > u[kept].max()  # the padding ranks last by noise: no fp32 share
    iid = np.asarray(elbo.sample_times(key, mask.size, antithetic=False, mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(iid[kept], elbo.sample_times(key, mask.size, antithetic=False)[kept])
    assert iid[~kept].min() > iid[kept].max()  # i.i.d. times: the same padding rule
  for antithetic in (True, False):
    np.testing.assert_array_equal(elbo.sample_times(key, 8, antithetic, mask=jnp.ones(8)),
                                  elbo.sample_times(key, 8, antithetic))
  for shape in ((2,), (8, 1)):  # one t for all rows, or a broadcast deep inside
    with pytest.raises(ValueError, match=rf"mask has shape \({shape[0]},.*shape \(8,\), with 0"):
      elbo.sample_times(key, 8, mask=jnp.ones(shape))


def test_vdm_decoder_logits_equal_closed_form():
  """logits_v = −½ e^{−γ_0} (z_0/α_0 − x_v)², α_0 = sqrt(sigmoid(−γ_0)), and log p = log-softmax."""
  vocab, gamma_0 = 8, -1.0
  z_0 = np.array([[-0.9, 0.1], [0.35, 1.2]])
  alpha_0 = math.sqrt(1 / (1 + math.exp(gamma_0)))
  x_v = 2 * (np.arange(vocab) + 0.5) / vocab - 1
  want = -0.5 * math.exp(-gamma_0) * (z_0[..., None] / alpha_0 - x_v) ** 2
  got = elbo.vdm_decoder_logits(jnp.asarray(z_0, jnp.float32), jnp.float32(gamma_0), vocab)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(elbo.decoder_log_probs(jnp.asarray(z_0, jnp.float32), jnp.float32(gamma_0), vocab),
                             want - special.logsumexp(want, -1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_discretized_gaussian_reconstruction_of_the_oracle_denoiser_equals_closed_form():
  """ε̂(z; γ) = (z − α x)/σ recovers ε, so x̂_0 = (z_0 − σ_0 ε̂)/α_0 = x and
  L_0 = −Σ_d log ∫_bin N(y; x_d, e^{γ_0}) dy: −log(Φ(h) − Φ(−h)) inside, −log Φ(h) at the two
  edge levels, h = (1/V)/e^{γ_0/2}; whatever z_0's noise. In elbo_terms the decoder's ε̂ is taken
  at γ_0 = γ(0) exactly."""
  vocab, gamma_0 = 16, -2.0
  gamma_fn = schedules.fixed_linear(gamma_0, 5.0)
  x = jnp.tile(jnp.arange(vocab)[None], (4, 1))
  x_scaled = elbo.scale_data(x, vocab)

  def oracle(z, g):
    alpha, sigma = schedules.alpha_sigma(g[:, None])
    return (z - alpha * x_scaled) / sigma

  terms = elbo.elbo_terms(oracle, gamma_fn, x, jax.random.PRNGKey(0), vocab_size=vocab,
                          decoder="discretized_gaussian")
  h = (1 / vocab) / math.exp(gamma_0 / 2)
  want = -(2 * stats.norm.logcdf(h) + (vocab - 2) * math.log(stats.norm.cdf(h) - stats.norm.cdf(-h)))
  np.testing.assert_allclose(terms["reconstruction"], np.full(4, want), rtol=2e-5)


def test_noise_of_z_t_and_of_z_0_are_independent():
  """z_t and z_0 draw independent ε (keys 2 and 3 of split(rng, 3)): with ε̂ = 0 and γ linear the
  diffusion term is ½ γ' ||ε_t||², and L_0 of a middle level grows with ||ε_0||²; over 4096
  examples their correlation is 0 ± 0.016 (one shared ε made it ≈ 0.9)."""
  batch, vocab = 4096, 16
  x = jnp.full((batch, 4), 7, jnp.int32)
  terms = elbo.elbo_terms(lambda z, g: jnp.zeros_like(z), schedules.fixed_linear(-2.0, 5.0), x,
                          jax.random.PRNGKey(0), vocab_size=vocab)
  corr = np.corrcoef(np.asarray(terms["diffusion"]), np.asarray(terms["reconstruction"]))[0, 1]
  assert abs(corr) < 4 / math.sqrt(batch), corr
