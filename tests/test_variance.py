"""The variance-minimising schedule: exact gradients from one backward pass, and lower variance."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import elbo, schedules, toy, variance

V, D = 16, 4


class TinyDenoiser(nn.Module):
  @nn.compact
  def __call__(self, z, gamma):
    h = jnp.concatenate([z, jnp.tanh(gamma[:, None] / 5.0)], axis=-1)
    return z + nn.Dense(D)(nn.swish(nn.Dense(32)(h)))


def _assert_trees_close(a, b, rtol=1e-4):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(np.abs(y).max(), 1e-3),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("decoder", ["vdm", pytest.param("discretized_gaussian", marks=pytest.mark.slow)])
def test_gradients_equal_two_naive_backward_passes(decoder):
  data = toy.FactorizedDiscrete.random(0, D, V)
  x = data.sample(jax.random.PRNGKey(1), 32)
  den = TinyDenoiser()
  score_params = den.init(jax.random.PRNGKey(0), jnp.zeros((1, D)), jnp.zeros((1,)))
  module = schedules.LearnedMonotone(n_features=16)
  gamma_params = module.init(jax.random.PRNGKey(2), jnp.zeros((1,)))
  eps_fn_of = lambda p: (lambda z, g: den.apply(p, z, g))
  gamma_fn_of = lambda p: schedules.bind(module, p)
  rng = jax.random.PRNGKey(3)

  def terms(sp, gp):
    return elbo.elbo_terms(eps_fn_of(sp), gamma_fn_of(gp), x, rng, vocab_size=V, decoder=decoder)

  second_moment = lambda gp: jnp.mean(elbo.nats_to_bpd(terms(score_params, gp)["diffusion"], D) ** 2)

  @jax.jit
  def both(sp, gp):
    res = variance.elbo_and_grads(eps_fn_of, sp, gamma_fn_of, gp, x, rng, vocab_size=V, decoder=decoder)
    naive = jax.value_and_grad(lambda sp, gp: elbo.training_loss(terms(sp, gp), x), argnums=(0, 1))(sp, gp)
    return res, naive, terms(sp, gp), second_moment(gp), jax.grad(second_moment)(gp)

  res, (loss, (g_score, g_gamma_elbo)), naive_terms, naive_m2, g_gamma_var = both(score_params, gamma_params)
  np.testing.assert_allclose(res.loss, loss, rtol=1e-5)
  np.testing.assert_allclose(res.second_moment, naive_m2, rtol=1e-5)
  for key in ("prior", "diffusion", "reconstruction"):
    np.testing.assert_allclose(res.terms[key], naive_terms[key], rtol=1e-5, atol=1e-4)
  _assert_trees_close(res.score_grads, g_score)
  got, elbo_p, var_p = res.gamma_grads["params"], g_gamma_elbo["params"], g_gamma_var["params"]
  _assert_trees_close({k: got[k] for k in ("gamma_min", "gamma_max")},
                      {k: elbo_p[k] for k in ("gamma_min", "gamma_max")})
  shape = ("l2", "l3")  # l1's bias cancels in the normalisation: its gradient is rounding noise
  _assert_trees_close({k: got[k] for k in shape}, {k: var_p[k] for k in shape})
  _assert_trees_close(got["l1"]["kernel"], var_p["l1"]["kernel"])
  # and the shape's variance gradient is not its (zero-mean) ELBO gradient
  assert not np.allclose(got["l3"]["kernel"], elbo_p["l3"]["kernel"], rtol=0.1)


def test_schedules_without_endpoints_or_shape_raise():
  data = toy.FactorizedDiscrete.random(0, D, V)
  x = data.sample(jax.random.PRNGKey(1), 8)
  module = schedules.LearnedLinear()
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="explicit endpoints"):
    variance.elbo_and_grads(lambda p: data.eps_fn(), {}, lambda p: schedules.bind(module, p),
                            params, x, jax.random.PRNGKey(0), vocab_size=V)
  with pytest.raises(ValueError, match="no shape"):
    variance.elbo_and_grads(lambda p: data.eps_fn(), {}, lambda p: schedules.bind(module, p),
                            params, x, jax.random.PRNGKey(0), vocab_size=V, endpoint_names=("b", "w"))


def test_learned_shape_lowers_variance_at_equal_elbo():
  """Adam on the shape only (endpoints fixed at the linear schedule's), Bayes-optimal denoiser.

  The variance is that of the per-example diffusion loss over independent draws of (t, ε) on a
  fixed batch; the ELBO's mean stays the same within its standard error.
  """
  dims, batch, steps = 16, 128, 300
  data = toy.FactorizedDiscrete.random(0, dims, V)
  rng = jax.random.PRNGKey(2)
  module, start = variance.linear_monotone(rng, schedules.GAMMA_MIN, schedules.GAMMA_MAX,
                                           n_features=32, l3=1e-2)
  _, linear = variance.linear_monotone(rng, schedules.GAMMA_MIN, schedules.GAMMA_MAX, n_features=32)
  t_grid = jnp.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(module.apply(linear, t_grid), schedules.fixed_linear()(t_grid), atol=1e-5)
  assert np.abs(module.apply(start, t_grid) - schedules.fixed_linear()(t_grid)).max() < 0.02

  xs = np.asarray(data.sample(jax.random.PRNGKey(100), steps * batch)).reshape(steps, batch, dims)
  fitted, second_moments = variance.fit_shape(data.eps_fn(), module, start, lambda k: xs[k],
                                              jax.random.PRNGKey(101), steps=steps, learning_rate=0.3,
                                              vocab_size=V)
  assert second_moments.shape == (steps,)
  np.testing.assert_allclose(module.apply(fitted, jnp.array([0.0, 1.0])),
                             [schedules.GAMMA_MIN, schedules.GAMMA_MAX], atol=1e-4)

  x = data.sample(jax.random.PRNGKey(1), 64)  # a fixed batch
  res = variance.compare_shapes(data.eps_fn(), module, linear, fitted, x, jax.random.PRNGKey(9),
                                draws=200, vocab_size=V)
  print(res)
  assert abs(res["mean_difference"]) < 3 * res["mean_difference_se"]  # the same ELBO
  assert res["variance_ratio"] < 0.8


def test_comparison_uses_the_same_draws_and_the_per_example_variance():
  """A shape compared with itself differs by exactly nothing (the same t and ε for both: with a
  key per shape the ratio was 6.6), and the variance is over draws per example, not the spread
  between examples."""
  data = toy.FactorizedDiscrete.random(0, D, V)
  x = data.sample(jax.random.PRNGKey(1), 8)
  module, linear = variance.linear_monotone(jax.random.PRNGKey(0), -8.0, 6.0, n_features=8)
  res = variance.compare_shapes(data.eps_fn(), module, linear, linear, x, jax.random.PRNGKey(3),
                                draws=4, vocab_size=V)
  assert (res["variance_ratio"], res["mean_difference"], res["mean_difference_se"]) == (1, 0, 0)
  offsets = np.arange(8.0) * 100.0  # examples far apart, each with noise of variance 1 over draws
  noise = np.random.default_rng(0).standard_normal((4000, 8))
  stats = variance.summarize_draws(offsets[None, :] + noise)
  assert abs(stats["variance"] - 1.0) < 0.05 and stats["num_examples"] == 8, stats


def test_fit_and_measurement_reject_bad_arguments():
  data = toy.FactorizedDiscrete.random(0, D, V)
  x = data.sample(jax.random.PRNGKey(1), 8)
  module, params = variance.linear_monotone(jax.random.PRNGKey(0), -5.0, 5.0, n_features=4)
  fit = lambda **kw: variance.fit_shape(data.eps_fn(), module, params, lambda k: x,
                                        jax.random.PRNGKey(0), vocab_size=V, **kw)
  with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
    fit(steps=0, learning_rate=0.1)
  with pytest.raises(ValueError, match="learning_rate=0.0 must be > 0"):
    fit(steps=1, learning_rate=0.0)
  with pytest.raises(ValueError, match="draws=1 must be an integer >= 2.*raise draws"):
    variance.diffusion_loss_draws(data.eps_fn(), schedules.fixed_linear(), x, jax.random.PRNGKey(0),
                                  draws=1, vocab_size=V)
  with pytest.raises(ValueError, match="gamma_min=5.0 must be < gamma_max=-5.0"):
    variance.linear_monotone(jax.random.PRNGKey(0), 5.0, -5.0)
  for n in (0, -3):  # 0 divided by zero (NaN figures), -3 failed in Flax
    with pytest.raises(ValueError, match=f"^n_features={n} must be an integer >= 1"):
      variance.linear_monotone(jax.random.PRNGKey(0), -5.0, 5.0, n_features=n)


def test_comparison_reports_fitted_minus_linear():
  """mean_difference = mean(fitted) − mean(linear) on the same draws, signed (two different
  shapes: a schedule bent towards high γ early has a different batch mean on few draws)."""
  data = toy.FactorizedDiscrete.random(0, D, V)
  x = data.sample(jax.random.PRNGKey(1), 8)
  module, linear = variance.linear_monotone(jax.random.PRNGKey(0), -8.0, 6.0, n_features=8)
  _, bent = variance.linear_monotone(jax.random.PRNGKey(0), -8.0, 6.0, n_features=8, l3=3.0)
  res = variance.compare_shapes(data.eps_fn(), module, linear, bent, x, jax.random.PRNGKey(3),
                                draws=4, vocab_size=V)
  assert res["mean_difference"] != 0
  np.testing.assert_allclose(res["mean_difference"], res["fitted"]["mean"] - res["linear"]["mean"],
                             rtol=1e-6)
  np.testing.assert_allclose(res["variance_ratio"], res["fitted"]["variance"] / res["linear"]["variance"],
                             rtol=1e-12)
