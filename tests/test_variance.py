"""The variance-minimising schedule: exact gradients from one backward pass, and lower variance."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm import elbo, schedules, toy, variance

V, D = 16, 4


class TinyDenoiser(nn.Module):
  @nn.compact
  def __call__(self, z, gamma):
    h = jnp.concatenate([z, jnp.tanh(gamma[:, None] / 5.0)], axis=-1)
    return z + nn.Dense(D)(nn.swish(nn.Dense(32)(h)))


def _bpd(nats):
  return nats / (D * math.log(2.0))


def _linear_shaped_monotone(n_features=32, feature_scale=4.0, seed=2):
  """LearnedMonotone whose shape is linear to within 1e-2 in γ: l1 = t, l3 ≈ 0, l2 spread out."""
  module = schedules.LearnedMonotone(n_features=n_features)
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1,)))
  p = params["params"]
  p["l1"]["kernel"] = jnp.ones_like(p["l1"]["kernel"])
  p["l3"]["kernel"] = jnp.full_like(p["l3"]["kernel"], 1e-2)
  p["l2"]["kernel"] = feature_scale * p["l2"]["kernel"]
  p["l2"]["bias"] = jax.random.uniform(jax.random.PRNGKey(seed + 1), p["l2"]["bias"].shape,
                                       minval=-feature_scale, maxval=feature_scale)
  return module, params


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

  second_moment = lambda gp: jnp.mean(_bpd(terms(score_params, gp)["diffusion"]) ** 2)

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
  dims, batch, steps, draws = 16, 128, 300, 200
  data = toy.FactorizedDiscrete.random(0, dims, V)
  eps_fn = data.eps_fn()
  module, params = _linear_shaped_monotone()
  gamma_fn_of = lambda p: schedules.bind(module, p)
  t_grid = jnp.linspace(0.0, 1.0, 101)
  assert np.abs(gamma_fn_of(params)(t_grid) - schedules.fixed_linear()(t_grid)).max() < 0.02

  labels = jax.tree_util.tree_map(lambda e: "endpoint" if e else "shape",
                                  variance.split_endpoints(params))
  opt = optax.multi_transform({"shape": optax.adam(optax.cosine_decay_schedule(0.3, steps)),
                               "endpoint": optax.set_to_zero()}, labels)

  @jax.jit
  def train(params):
    def step(carry, rng):
      params, state = carry
      x = data.sample(jax.random.fold_in(rng, 1), batch)
      res = variance.elbo_and_grads(lambda p: eps_fn, {}, gamma_fn_of, params, x, rng, vocab_size=V)
      updates, state = opt.update(res.gamma_grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                  jax.random.split(jax.random.PRNGKey(100), steps))
    return params

  learned = train(params)
  np.testing.assert_allclose(gamma_fn_of(learned)(jnp.array([0.0, 1.0])),
                             [schedules.GAMMA_MIN, schedules.GAMMA_MAX], atol=1e-4)
  # The fixed linear schedule, exactly, as parameters of the same module (l3 = 0): one compile.
  linear = jax.tree_util.tree_map(lambda a: a, params)
  linear["params"]["l3"]["kernel"] = jnp.zeros_like(linear["params"]["l3"]["kernel"])
  np.testing.assert_allclose(gamma_fn_of(linear)(t_grid), schedules.fixed_linear()(t_grid), atol=1e-5)

  x = jnp.tile(data.sample(jax.random.PRNGKey(1), 64), (draws, 1))  # a fixed batch, `draws` times

  @jax.jit
  def diffusion_bpd(p):  # [draws, 64]: independent t and ε for every entry
    terms = elbo.elbo_terms(eps_fn, gamma_fn_of(p), x, jax.random.PRNGKey(9), vocab_size=V,
                            antithetic=False)
    return (terms["diffusion"] / (dims * math.log(2.0))).reshape(draws, -1)

  lin, new = np.asarray(diffusion_bpd(linear)), np.asarray(diffusion_bpd(learned))
  se = np.hypot(lin.std(), new.std()) / math.sqrt(lin.size)
  assert abs(lin.mean() - new.mean()) < 3 * se, (lin.mean(), new.mean(), se)  # the same ELBO
  ratio = new.var(axis=0).mean() / lin.var(axis=0).mean()
  print(f"variance ratio learned/linear = {ratio:.3f}; diffusion loss {new.mean():.4f} vs "
        f"{lin.mean():.4f} bits/dim (SE of the difference {se:.4f})")
  assert ratio < 0.8
