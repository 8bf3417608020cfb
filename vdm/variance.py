"""The paper's variance-minimising noise schedule (VDM, Kingma et al. 2021, Sec. 5 and App. I).

In continuous time the ELBO depends on γ only through γ(0) = γ_min and γ(1) = γ_max; the shape
of γ in between sets only the variance of the Monte-Carlo estimator of the diffusion loss,

    L_i = ½ γ'(t_i) ||ε_i − ε̂(z_t,i; γ_t,i)||² / (D ln 2),   t_i ~ U(0, 1),

in bits/dim (D = H·W·C).

Since E[L] does not depend on the shape, ∇_shape Var[L] = ∇_shape E[L²]. :func:`elbo_and_grads`
returns, from one backward pass through the denoiser, the ELBO gradients for the score network
and for the schedule's endpoints, and the gradient of the batch mean of L_i² for the schedule's
shape parameters:

1. The schedule is evaluated outside the main loss, with ``jax.vjp`` w.r.t. its parameters:
   (γ_t, γ'_t) per example and (γ_0, γ_1).
2. One ``value_and_grad`` of the batch-mean loss w.r.t. (score params, γ_t, γ'_t, γ_0, γ_1), via
   :func:`vdm.elbo.elbo_terms_from`. Example i's loss depends on γ_t,i and γ'_t,i alone, so the
   cotangents c_i = ∂L̄/∂γ_t,i = (1/B) ∂L_i/∂γ_t,i are exact per-example derivatives.
3. Two cheap schedule vjps: with the ELBO cotangents (endpoint gradients), and with
   2 L_i c_i (shape gradients of mean_i L_i² = (1/B) Σ_i 2 L_i ∂L_i/∂θ).

Losses are in bits/dim (the units of :func:`vdm.elbo.training_loss`), L_i included.
The denoiser must act on each example separately (no batch statistics, e.g. BatchNorm in
training mode), as any ε̂(z_t; γ_t) of a diffusion model does.

For a trained (frozen) denoiser, :func:`fit_shape` fits only the shape of a
:class:`vdm.schedules.LearnedMonotone` with the model's endpoints, starting near the linear
schedule of :func:`linear_monotone`, and :func:`compare_shapes` measures the variance of L_i over
(t, ε) on a fixed batch for both. The mean stays put because ε̂ takes γ_t, not t, as its input:
substituting γ = γ(t), E_t[γ'(t) f(γ(t))] = ∫_{γ_0}^{γ_1} f(γ) dγ for any increasing γ(t).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from vdm import elbo, importance, likelihood, schedules
from vdm.elbo import EpsFn, TimeProposal
from vdm.schedules import GammaFn

Params = Any
ENDPOINT_NAMES = ("gamma_min", "gamma_max")


class VarianceGrads(NamedTuple):
  loss: jax.Array             # the batch-mean ELBO in bits/dim (= training_loss(terms, x))
  terms: dict                 # elbo_terms' dict, per example, in nats
  score_grads: Params         # ∇ loss w.r.t. the score network's parameters
  gamma_grads: Params         # endpoints: ∇ loss; shape: ∇ second_moment
  second_moment: jax.Array    # mean_i L_i², L_i the diffusion loss in bits/dim


def _is_endpoint(path, names: Sequence[str]) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) in names for k in path)


def split_endpoints(tree: Params, names: Sequence[str] = ENDPOINT_NAMES) -> Params:
  """A pytree of bools like ``tree``: True at the schedule's endpoint parameters."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_endpoint(path, names), tree)


def _schedule_values(gamma_fn: GammaFn, t: jax.Array):
  """(γ_t, γ'_t, γ_0, γ_1), evaluated exactly as elbo_terms does."""
  gamma_0, gamma_1 = gamma_fn(jnp.array([0.0, 1.0]))
  _, gamma_t, dgamma_t = elbo.diffusion_weight(gamma_fn, t, 0)
  return gamma_t, dgamma_t, gamma_0, gamma_1


def elbo_and_grads(eps_fn_of: Callable[[Params], EpsFn], score_params: Params,
                   gamma_fn_of: Callable[[Params], GammaFn], gamma_params: Params,
                   x: jax.Array, rng: jax.Array, *, vocab_size: int = 256, antithetic: bool = True,
                   decoder: str = "vdm", time_proposal: Optional[TimeProposal] = None,
                   endpoint_names: Sequence[str] = ENDPOINT_NAMES) -> VarianceGrads:
  """The continuous-time ELBO (bits/dim) and the gradients of a variance-minimising step.

  eps_fn_of(score_params) -> eps_fn and gamma_fn_of(gamma_params) -> gamma_fn (e.g.
  ``lambda p: schedules.bind(schedules.LearnedMonotone(), p)``). The times and noise are those of
  ``elbo.elbo_terms(eps_fn, gamma_fn, x, rng, ...)`` with the same arguments, so ``loss`` and
  ``terms`` equal it, ``score_grads`` and the endpoint entries of ``gamma_grads`` (leaves under a
  key in ``endpoint_names``) are the gradients of ``elbo.training_loss(terms, x)``, and the other
  (shape) entries of ``gamma_grads`` are the gradient of ``second_moment``.
  """
  elbo.check_data(x, vocab_size)
  is_endpoint = split_endpoints(gamma_params, endpoint_names)
  flags = jax.tree_util.tree_leaves(is_endpoint)
  if not any(flags):
    raise ValueError(f"the schedule's parameters have no leaf under {tuple(endpoint_names)}: the "
                     "variance-minimising schedule needs explicit endpoints (schedules.LearnedMonotone).")
  if all(flags):
    raise ValueError("the schedule has only endpoint parameters, no shape to fit to the variance: "
                     "use schedules.LearnedMonotone.")

  dims = elbo.data_dims(x)
  rng_t = jax.random.split(rng, 3)[0]  # as elbo_terms: key 1 for t, keys 2 and 3 for the noise
  t = elbo.sample_times(rng_t, x.shape[0], antithetic)
  q_t = None
  if time_proposal is not None:
    t, q_t = time_proposal(t)

  # 1. The schedule's outputs and their vjp w.r.t. its parameters.
  sched_out, sched_vjp = jax.vjp(lambda p: _schedule_values(gamma_fn_of(p), t), gamma_params)

  # 2. One backward pass of the batch-mean ELBO w.r.t. the score params and the schedule's outputs.
  def mean_loss(score_params, gamma_t, dgamma_t, gamma_0, gamma_1):
    terms = elbo.elbo_terms_from(eps_fn_of(score_params), x, rng, t, gamma_t, dgamma_t, gamma_0,
                                 gamma_1, q_t=q_t, vocab_size=vocab_size, decoder=decoder)
    return elbo.bits_per_dim(terms, x), terms

  (loss, terms), (score_grads, *cot) = jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3, 4),
                                                          has_aux=True)(score_params, *sched_out)
  c_gamma_t, c_dgamma_t, c_gamma_0, c_gamma_1 = cot

  # 3. Endpoints: the ELBO cotangents. Shape: cotangents 2 L_i c_i of mean_i L_i².
  (elbo_gamma_grads,) = sched_vjp((c_gamma_t, c_dgamma_t, c_gamma_0, c_gamma_1))
  diff = elbo.nats_to_bpd(terms["diffusion"], dims)
  (var_gamma_grads,) = sched_vjp((2.0 * diff * c_gamma_t, 2.0 * diff * c_dgamma_t,
                                  jnp.zeros_like(c_gamma_0), jnp.zeros_like(c_gamma_1)))
  gamma_grads = jax.tree_util.tree_map(lambda e, g_elbo, g_var: g_elbo if e else g_var,
                                       is_endpoint, elbo_gamma_grads, var_gamma_grads)
  return VarianceGrads(loss, terms, score_grads, gamma_grads, jnp.mean(diff**2))


def linear_monotone(rng: jax.Array, gamma_min: float, gamma_max: float, *, n_features: int = 1024,
                    l3: float = 0.0, feature_scale: float = 4.0
                    ) -> tuple[schedules.LearnedMonotone, Params]:
  """A LearnedMonotone with endpoints (γ_min, γ_max) and parameters giving a linear shape.

  l1's kernel is 1 and l3's kernel is ``l3`` everywhere, so f(t) = t + l3 Σ_j φ_j(t) / n_features;
  l2's features are spread over t (kernels feature_scale · N(0, 1), biases U(±feature_scale)).
  ``l3 = 0`` is the linear schedule γ(t) = γ_min + (γ_max − γ_min) t exactly; a small ``l3`` (1e-2)
  is a start point for :func:`fit_shape` next to it, away from the kink of |W| at 0.
  """
  check_settings(n_features=n_features)
  module = schedules.LearnedMonotone(float(gamma_min), float(gamma_max), n_features=n_features)

  @jax.jit
  def make(rng):
    rng_init, rng_bias = jax.random.split(rng)
    params = module.init(rng_init, jnp.zeros((1,)))
    p = params["params"]
    p["l1"]["kernel"] = jnp.ones_like(p["l1"]["kernel"])
    p["l3"]["kernel"] = jnp.full_like(p["l3"]["kernel"], l3)
    p["l2"]["kernel"] = feature_scale * p["l2"]["kernel"]
    p["l2"]["bias"] = jax.random.uniform(rng_bias, p["l2"]["bias"].shape, minval=-feature_scale,
                                         maxval=feature_scale)
    return params

  return module, make(rng)


def check_settings(*, steps: Optional[int] = None, learning_rate: Optional[float] = None,
                   draws: Optional[int] = None, n_features: Optional[int] = None) -> None:
  """Raise ValueError naming the fix for a bad setting of :func:`fit_shape` (steps,
  learning_rate), :func:`diffusion_loss_draws` (draws) or :func:`linear_monotone` (n_features);
  None is not checked."""
  if steps is not None and (not isinstance(steps, (int, np.integer)) or steps < 1):
    raise ValueError(f"steps={steps!r} must be an integer >= 1: pass the number of Adam steps.")
  if learning_rate is not None and not learning_rate > 0:
    raise ValueError(f"learning_rate={learning_rate} must be > 0 (e.g. 0.3 for Adam on the shape).")
  if draws is not None and (not isinstance(draws, (int, np.integer)) or draws < 2):
    raise ValueError(f"draws={draws!r} must be an integer >= 2: a variance over draws needs at "
                     "least two; raise draws (e.g. 200).")
  if n_features is not None and (not isinstance(n_features, (int, np.integer)) or n_features < 1):
    raise ValueError(f"n_features={n_features!r} must be an integer >= 1: the width of the "
                     "LearnedMonotone network (e.g. 1024).")


def fit_shape(eps_fn: EpsFn, module: schedules.LearnedMonotone, params: Params,
              batch_at: Callable[[int], ArrayLike], rng: jax.Array, *, steps: int,
              learning_rate: float, vocab_size: int = 256) -> tuple[Params, np.ndarray]:
  """The schedule's shape fitted to minimise Var[L_i] for the frozen denoiser ``eps_fn``.

  ``steps`` steps of Adam with step size learning_rate · ½(1 + cos(π k / steps)) along the shape
  gradients of :func:`elbo_and_grads`, ∇ mean_i L_i² = ∇ Var[L] (E[L] is shape-free); the
  endpoints' updates are zero (``optax.set_to_zero``), so γ(0) and γ(1) stay exactly as given.
  Step k uses the batch ``batch_at(k)`` and the key fold_in(rng, k). The step compiles once (the
  denoiser's parameters are traced when ``eps_fn`` is a ``jax.tree_util.Partial``).
  Returns (fitted params, mean_i L_i² in (bits/dim)² at each step: the variance objective).
  """
  check_settings(steps=steps, learning_rate=learning_rate)
  labels = jax.tree_util.tree_map(lambda e: "endpoint" if e else "shape", split_endpoints(params))
  optimizer = optax.multi_transform(
      {"shape": optax.adam(optax.cosine_decay_schedule(learning_rate, steps)),
       "endpoint": optax.set_to_zero()}, labels)

  @eqx.filter_jit
  def step(eps_fn, params, opt_state, x, key):
    res = elbo_and_grads(lambda _: eps_fn, {}, lambda p: schedules.bind(module, p), params, x, key,
                         vocab_size=vocab_size)
    updates, opt_state = optimizer.update(res.gamma_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, res.second_moment

  opt_state, second_moments = optimizer.init(params), []
  for k in range(steps):
    x = np.asarray(batch_at(k))  # checked on the host: no device round trip between steps
    elbo.check_data(x, vocab_size)
    params, opt_state, m2 = step(eps_fn, params, opt_state, x, jax.random.fold_in(rng, k))
    second_moments.append(m2)
  return params, np.asarray(jnp.stack(second_moments), np.float64)


@eqx.filter_jit
def _diffusion_bpd(eps_fn, gamma_fn, x, keys, vocab_size: int):
  def draw(carry, key):
    key_t, key_eps = jax.random.split(key)
    t = jax.random.uniform(key_t, (x.shape[0],))
    loss = importance.diffusion_loss_at(eps_fn, gamma_fn, x, t, key_eps, vocab_size=vocab_size)
    return carry, elbo.nats_to_bpd(loss, elbo.data_dims(x))

  return jax.lax.scan(draw, None, keys)[1]


def diffusion_loss_draws(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, rng: jax.Array, *,
                         draws: int = 200, vocab_size: int = 256) -> np.ndarray:
  """L_i = ½ γ'(t) ||ε − ε̂(z_t; γ_t)||² / (D ln 2), in bits/dim, for each example of the fixed batch x, at
  ``draws`` independent (t, ε) each (t ~ U(0, 1) i.i.d., not antithetic): [draws, B].

  The draws run as a ``lax.scan`` over keys, one batch-sized denoiser call each. The same rng
  gives the same (t, ε) under any schedule (common random numbers).
  """
  check_settings(draws=draws)
  x = jnp.asarray(x)
  elbo.check_data(x, vocab_size)
  return np.asarray(_diffusion_bpd(eps_fn, gamma_fn, x, jax.random.split(rng, draws), vocab_size),
                    np.float64)


def summarize_draws(values: np.ndarray) -> dict[str, float]:
  """Of L [draws, B] (bits/dim): "mean" over all, "mean_se" = sd over draws of the batch mean
  / √draws (Monte-Carlo error only: the batch is fixed), "variance" = Var_{t,ε}[L_i] (ddof 1)
  averaged over examples i, and "draws", "num_examples"."""
  mean, se = likelihood.mean_and_se(values.mean(axis=1))
  return {"mean": mean, "mean_se": se, "variance": float(values.var(axis=0, ddof=1).mean()),
          "draws": int(values.shape[0]), "num_examples": int(values.shape[1])}


def compare_shapes(eps_fn: EpsFn, module: schedules.LearnedMonotone, linear_params: Params,
                   fitted_params: Params, x: jax.Array, rng: jax.Array, *, draws: int = 200,
                   vocab_size: int = 256) -> dict:
  """{"linear": stats, "fitted": stats} of :func:`summarize_draws` on the fixed batch x, the same
  (t, ε) for both, and "variance_ratio" = fitted / linear, "mean_difference" = fitted − linear
  with "mean_difference_se" (sd over draws of the paired difference of batch means / √draws).
  Equal endpoints give equal expected means: the difference should be within a few SE of 0."""
  values = {name: diffusion_loss_draws(eps_fn, jax.tree_util.Partial(module.apply, p), x, rng,
                                       draws=draws, vocab_size=vocab_size)
            for name, p in (("linear", linear_params), ("fitted", fitted_params))}
  out: dict = {name: summarize_draws(v) for name, v in values.items()}
  diff, diff_se = likelihood.mean_and_se(values["fitted"].mean(axis=1) - values["linear"].mean(axis=1))
  out.update(variance_ratio=out["fitted"]["variance"] / out["linear"]["variance"],
             mean_difference=diff, mean_difference_se=diff_se)
  return out
