"""Schedules: monotone, exact endpoints, DDPM schedules equal to their β definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import schedules

T_GRID = jnp.linspace(0.0, 1.0, 2001)


def _learned(module, seed=0):
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1,)))
  return schedules.bind(module, params), params


def all_schedules():
  return {
      "fixed_linear": schedules.fixed_linear(),
      "learned_linear": _learned(schedules.LearnedLinear())[0],
      "learned_monotone": _learned(schedules.LearnedMonotone(n_features=64))[0],
      "ddpm_linear": schedules.ddpm("linear"),
      "ddpm_cosine": schedules.ddpm("cosine"),
  }


@pytest.mark.parametrize("name", list(all_schedules()))
def test_every_schedule_is_increasing_and_differentiable(name):
  gamma_fn = all_schedules()[name]
  g = np.asarray(gamma_fn(T_GRID))
  assert g.shape == T_GRID.shape
  assert np.all(np.diff(g) > 0), name
  _, dg = jax.jvp(gamma_fn, (T_GRID,), (jnp.ones_like(T_GRID),))
  assert np.all(np.asarray(dg) > 0), name
  schedules.check_increasing(gamma_fn)


def test_fixed_linear_values():
  g = schedules.fixed_linear(-13.3, 5.0)
  np.testing.assert_allclose(g(jnp.array([0.0, 0.5, 1.0])), [-13.3, -4.15, 5.0], rtol=1e-6)


def test_learned_monotone_endpoints_are_its_parameters():
  module = schedules.LearnedMonotone(gamma_min=-10.0, gamma_max=7.0, n_features=32)
  gamma_fn, params = _learned(module, seed=3)
  assert np.asarray(gamma_fn(jnp.array([0.0, 1.0]))).tolist() == [-10.0, 7.0]  # exactly
  params = jax.tree_util.tree_map(lambda p: p, params)
  params["params"]["gamma_min"] = jnp.array(-12.0)
  params["params"]["gamma_max"] = jnp.array(4.0)
  assert np.asarray(schedules.bind(module, params)(jnp.array([0.0, 1.0]))).tolist() == [-12.0, 4.0]


@pytest.mark.parametrize("gamma_min,gamma_max", [(-13.3, 5.0), (5.0, -13.3)])
def test_learned_monotone_stays_monotone_for_any_weights(gamma_min, gamma_max):
  """Random weights, each leaf its own noise, with the l3 term dominating l1 (without |W|, 35 of
  50 such draws decrease somewhere); and endpoints that cross, which gave a decreasing γ."""
  module = schedules.LearnedMonotone(n_features=16)
  _, params = _learned(module)
  leaves, tree = jax.tree_util.tree_flatten(params)
  t = jnp.linspace(0.0, 1.0, 2001)
  for seed in range(20):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = tree.unflatten([p + 3.0 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    noisy["params"]["l1"]["kernel"] *= 0.01
    noisy["params"]["l3"]["kernel"] *= 16
    noisy["params"]["gamma_min"], noisy["params"]["gamma_max"] = gamma_min, gamma_max
    gamma = np.asarray(schedules.bind(module, noisy)(t))
    assert np.all(np.diff(gamma) > 0) and gamma[0] == np.float32(gamma_min), seed


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_schedule_matches_beta_definition_at_grid(kind):
  num_steps = 1000
  if kind == "linear":
    betas = np.linspace(1e-4, 0.02, num_steps)
  else:
    s, tau = 0.008, np.arange(num_steps + 1) / num_steps
    abar = np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2
    abar = abar / abar[0]
    betas = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
  np.testing.assert_allclose(schedules.ddpm_betas(kind, num_steps), betas, rtol=1e-9)
  alpha_bar = np.array([np.prod(1.0 - betas[:i]) for i in range(1, num_steps + 1)])
  t_grid = np.arange(num_steps) / (num_steps - 1)  # x_i at t = (i − 1)/(T − 1)
  gamma = np.asarray(schedules.ddpm(kind, num_steps)(jnp.asarray(t_grid)), np.float64)
  np.testing.assert_allclose(schedules.alpha2(gamma), alpha_bar, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(gamma[0], np.log(betas[0] / (1 - betas[0])), rtol=1e-5)


def test_bad_schedules_raise():
  with pytest.raises(ValueError, match="^gamma_min=5.0 must be < gamma_max=-13.3"):
    schedules.fixed_linear(5.0, -13.3)
  with pytest.raises(ValueError, match="^gamma_min=1.0 must be < gamma_max=1.0"):
    schedules.LearnedLinear(gamma_min=1.0, gamma_max=1.0).init(jax.random.PRNGKey(0), jnp.zeros(1))
  with pytest.raises(ValueError, match="not increasing"):
    schedules.check_increasing(lambda t: 5.0 - 18.3 * t)
  with pytest.raises(ValueError, match=r"^model.gamma_min=-31.0 is below -30: float32's z_t"):
    schedules.check_endpoints(-31.0, 5.0, "model.")
  with pytest.raises(ValueError, match="unknown DDPM"):
    schedules.ddpm("quadratic")


def test_noise_and_signal_variances_equal_float64_closed_forms():
  """σ²_t = 1/(1 + e^{−γ}), α²_t = 1/(1 + e^{γ}) (so SNR = α²/σ² = e^{−γ}), and
  α_s/α_t = sqrt(α²_s/α²_t), finite also where α_t underflows float32 (γ_t = 100)."""
  g = np.array([-13.3, -4.0, 0.0, 2.5, 5.0])
  np.testing.assert_allclose(schedules.sigma2(jnp.asarray(g, jnp.float32)), 1 / (1 + np.exp(-g)),
                             rtol=1e-6)
  np.testing.assert_allclose(schedules.alpha2(jnp.asarray(g, jnp.float32)), 1 / (1 + np.exp(g)),
                             rtol=1e-6)
  alpha, sigma = schedules.alpha_sigma(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(alpha**2 / sigma**2, np.exp(-g), rtol=1e-5)
  gamma_s, gamma_t = np.array([-13.3, -4.0, 0.0, 3.0, 60.0]), np.array([-10.0, 1.0, 0.5, 100.0, 100.0])
  log_alpha2 = lambda v: -np.logaddexp(0.0, v)  # log sigmoid(−γ), float64
  want = np.exp(0.5 * (log_alpha2(gamma_s) - log_alpha2(gamma_t)))
  got = schedules.alpha_ratio(jnp.asarray(gamma_s, jnp.float32), jnp.asarray(gamma_t, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[-2] > 1e20  # α_t = e^{−50} underflows α_t² in float32; the ratio does not


def test_learned_linear_is_increasing_for_a_negative_weight():
  """γ(t) = b + |w| t: a weight that training drives negative still gives γ_min + |w| t."""
  module = schedules.LearnedLinear()
  params = {"params": {"b": jnp.float32(-13.3), "w": jnp.float32(-18.3)}}
  np.testing.assert_allclose(schedules.bind(module, params)(jnp.array([0.0, 0.5, 1.0])),
                             [-13.3, -4.15, 5.0], rtol=1e-6)


def test_check_increasing_refuses_a_flat_stretch_and_accepts_the_floor():
  """γ must be strictly increasing (a plateau has γ' = 0 there); γ_min = GAMMA_MIN_FLOOR itself is
  allowed (only below it is refused)."""
  with pytest.raises(ValueError, match="not increasing"):
    schedules.check_increasing(lambda t: jnp.minimum(-13.3 + 18.3 * t, 0.0))
  schedules.check_endpoints(schedules.GAMMA_MIN_FLOOR, 5.0)
  schedules.check_increasing(schedules.fixed_linear(schedules.GAMMA_MIN_FLOOR, 5.0))


def test_check_increasing_names_where_gamma_is_infinite_and_how_to_fix_it():
  """γ(t) = log(t / (1 − t)) is −∞ at t = 0 and +∞ at t = 1. The fix is to rescale t, not to
  clip γ (a clipped γ is flat there, which is refused too)."""
  logit = lambda t: jnp.log(t) - jnp.log1p(-t)
  with pytest.raises(ValueError, match=r"^gamma_fn gives non-finite γ\(t\) at t in \[0.0000, 1.0000\]: "
                     r"map \[0, 1\] into times where it is finite, e.g. γ\(t_0 \+ \(t_1 − t_0\) t\), not "
                     r"by clipping γ"):
    schedules.check_increasing(logit)
  with pytest.raises(ValueError, match="not increasing"):
    schedules.check_increasing(lambda t: jnp.clip(logit(t), -13.0, 5.0))
  schedules.check_increasing(lambda t: logit(0.01 + 0.98 * t))
