"""The paper's variance-minimising noise schedule (VDM, Kingma et al. 2021, Sec. 5 and App. I).

In continuous time the ELBO depends on γ only through γ(0) = γ_min and γ(1) = γ_max; the shape
of γ in between sets only the variance of the Monte-Carlo estimator of the diffusion loss,

    L_i = ½ γ'(t_i) ||ε_i − ε̂(z_t,i; γ_t,i)||²,   t_i ~ U(0, 1).

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
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from vdm import elbo
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
    return elbo.nats_to_bpd(jnp.mean(elbo.total_nats(terms)), dims), terms

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
