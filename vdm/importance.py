"""Importance sampling of the diffusion time t for the continuous-time loss.

The continuous-time diffusion term is L = E_{t~U(0,1)} E_{x,ε}[ℓ(t)], ℓ(t) = ½ γ'(t) ||ε − ε̂(z_t; γ_t)||².
Drawing t ~ q(t) and weighting by 1/q(t) keeps it unbiased; the variance of one draw is
∫ m₂(t)/q(t) dt − L², with m₂(t) = E_{x,ε}[ℓ(t)²], and is smallest for q ∝ sqrt(m₂).

We estimate m₂ on a grid of equal-width bins of [0, 1] from a few batches
(:func:`loss_moments`), set q ∝ sqrt(m₂) piecewise-constant on the bins, mixed with a fraction
of the uniform density so that q ≥ ``uniform_mix`` everywhere (a bin whose m₂ was underestimated
cannot blow up the weights 1/q), and sample it by the inverse CDF (:func:`time_proposal`).
Combined with antithetic u (``elbo.sample_times``) the batch's times are stratified in
q-quantiles.

The proposal's parameters are a pytree, {"probs": [num_bins]} (bin probabilities), so they can
live in a training state. For training with it:

* fit once with :func:`fit_time_proposal` on the current model (or periodically refit), keep
  the params in the train state, and pass ``time_proposal=time_proposal(params)`` to
  ``elbo.elbo_terms`` inside the jitted step: the loss stays an unbiased estimate of the ELBO and
  its gradient estimate is unbiased too (the params carry no gradient);
* or track m₂ online from the training losses with :func:`update_second_moment` (an EMA per bin
  of ℓ(t)², the unweighted loss ``0.5 * w_t * eps_mse``) and rebuild the params with
  :func:`proposal_from_second_moment` every so often: what ``vdm.train`` does
  (``loss.time_sampling='importance'``), at every step. ``experiments/likelihood.py`` fits once.

m₂ depends on γ: with a learned schedule, refit (or track online) as γ changes. The ELBO's value
does not depend on q, only its variance does.
"""
from __future__ import annotations

from typing import Iterable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from vdm import elbo, schedules
from vdm.elbo import EpsFn, TimeProposal
from vdm.schedules import GammaFn

ProposalParams = dict  # {"probs": [num_bins] bin probabilities on equal-width bins of [0, 1]}


def diffusion_loss_at(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, t: jax.Array, rng: jax.Array,
                      *, vocab_size: int = 256) -> jax.Array:
  """ℓ(t) = ½ γ'(t) ||ε − ε̂(z_t; γ_t)||² per example at given times t [B] (continuous time, nats)."""
  x_scaled = elbo.scale_data(x, vocab_size)
  _, gamma_t, w_t = elbo.diffusion_weight(gamma_fn, jnp.asarray(t, jnp.float32), 0)
  return elbo.diffusion_loss(eps_fn, x_scaled, gamma_t, w_t,
                             jax.random.normal(rng, x_scaled.shape))[0]


def times_in_bin(rng: jax.Array, b: jax.Array, batch: int, num_bins: int,
                 keep: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """t [batch] uniform in bin b of ``num_bins`` equal-width bins of [0, 1], and a key for ε: the
  draws of bin b, a function of (rng, b) alone. Rows that ``keep`` marks False (a padded batch's
  padding) take the top of the bin: they rank last by noise, outside a bf16 network's fp32 share
  (:func:`vdm.model.split_by_noise`)."""
  key_t, key_eps = jax.random.split(jax.random.fold_in(rng, b))
  t = (b + jax.random.uniform(key_t, (batch,))) / num_bins
  if keep is not None:
    t = jnp.where(keep, t, jnp.nextafter((b + 1.0) / num_bins, 0.0))
  return t, key_eps


@eqx.filter_jit
def _batch_moments(eps_fn, gamma_fn, x, rng, keep, num_bins: int, vocab_size: int):
  """Σ over the rows ``keep`` marks of ℓ and ℓ² in each bin, t uniform inside the bin: two arrays
  [num_bins]."""
  def one_bin(carry, b):
    t, key_eps = times_in_bin(rng, b, x.shape[0], num_bins, keep)
    loss = jnp.where(keep, diffusion_loss_at(eps_fn, gamma_fn, x, t, key_eps, vocab_size=vocab_size),
                     0.0)
    return carry, (jnp.sum(loss), jnp.sum(loss**2))

  _, (s1, s2) = jax.lax.scan(one_bin, None, jnp.arange(num_bins))
  return s1, s2


def loss_moments(eps_fn: EpsFn, gamma_fn: GammaFn, batches: Iterable[ArrayLike], rng: jax.Array, *,
                 vocab_size: int = 256, num_bins: int = 64) -> dict[str, np.ndarray | int]:
  """Per-bin Monte-Carlo estimates of E[ℓ(t)] and E[ℓ(t)²] on equal-width bins of [0, 1].

  Every image of every batch is evaluated once per bin, at t uniform within the bin (one
  batch-sized denoiser call per bin, as a ``lax.scan``). Returns {"mean", "second_moment": [num_bins],
  "num_images"}; the bin-average of "mean" estimates the continuous-time diffusion term.
  """
  schedules.check_increasing(gamma_fn)

  def sums(x, key, keep):
    s1, s2 = _batch_moments(eps_fn, gamma_fn, x, key, keep, num_bins, vocab_size)
    return np.asarray(s1, np.float64), np.asarray(s2, np.float64), int(np.sum(keep))

  per_batch, _ = elbo.over_batches(batches, rng, vocab_size, sums)
  s1, s2, n = (sum(b[k] for b in per_batch) for k in range(3))
  return {"mean": s1 / n, "second_moment": s2 / n, "num_images": n}


def proposal_from_second_moment(second_moment, uniform_mix: float = 0.1, spread: int = 1
                                ) -> ProposalParams:
  """q ∝ r = sqrt(m₂) per bin, mixed with the uniform density: p_b = (1 − λ) r_b/Σ r + λ/n.

  λ = ``uniform_mix`` ∈ (0, 1] floors the density at q(t) ≥ λ, bounding the weights 1/q(t) ≤ 1/λ.
  ``spread`` = k replaces r_b by its maximum over bins b−k..b+k first. ℓ(t) is heavy-tailed where
  the denoiser starts to confuse data points (rare draws with huge loss), so a bin's m₂ from a few
  batches can come out far too low; under-weighting a bin is what inflates the variance (through
  1/q), while over-weighting its neighbours costs little, so we err upwards. A known non-finite
  m₂ is refused (inside ``jit`` the train step's finiteness guard keeps it out).
  """
  if not 0.0 < uniform_mix <= 1.0:
    raise ValueError(f"uniform_mix={uniform_mix} must be in (0, 1]: it floors q(t) so that the "
                     "importance weights 1/q stay bounded.")
  if not isinstance(spread, (int, np.integer)) or spread < 0:
    raise ValueError(f"spread={spread!r} must be an integer >= 0.")
  if jnp.ndim(second_moment) != 1 or not jnp.shape(second_moment)[0]:
    raise ValueError(f"second_moment has shape {jnp.shape(second_moment)}: expected one value per "
                     "bin, shape [num_bins] with num_bins >= 1.")
  value = elbo.concrete_value(second_moment)
  if value is not None and not np.all(np.isfinite(value)):
    bins = np.flatnonzero(~np.isfinite(value))[:8].tolist()
    raise ValueError(f"second_moment is not finite in bins {bins}: the denoiser's loss is nan or "
                     "inf at those t; check the model or the data.")
  root = jnp.sqrt(jnp.maximum(jnp.asarray(second_moment, jnp.float32), 0.0))
  num_bins = root.shape[0]
  if spread:
    padded = jnp.pad(root, spread, mode="edge")
    root = jnp.max(jnp.stack([padded[i:i + num_bins] for i in range(2 * spread + 1)]), axis=0)
  total = jnp.sum(root)
  shape = jnp.where(total > 0, root / jnp.where(total > 0, total, 1.0), 1.0 / num_bins)
  return {"probs": (1.0 - uniform_mix) * shape + uniform_mix / num_bins}


def fit_time_proposal(eps_fn: EpsFn, gamma_fn: GammaFn, batches: Iterable[ArrayLike], rng: jax.Array,
                      *, vocab_size: int = 256, num_bins: int = 64, uniform_mix: float = 0.1,
                      spread: int = 1) -> ProposalParams:
  """Fit q(t) ∝ sqrt(E[ℓ(t)²]) (floored by ``uniform_mix``, widened by ``spread`` bins) on a few
  batches; see the module doc and :func:`proposal_from_second_moment`."""
  moments = loss_moments(eps_fn, gamma_fn, batches, rng, vocab_size=vocab_size, num_bins=num_bins)
  return proposal_from_second_moment(moments["second_moment"], uniform_mix, spread)


def update_second_moment(second_moment: jax.Array, t: jax.Array, loss: jax.Array,
                         decay: float = 0.99) -> jax.Array:
  """EMA per bin of ℓ(t)² from training samples (t [B], the unweighted loss ℓ [B]); bins that
  received no sample this step keep their value. Jit-friendly."""
  num_bins = second_moment.shape[0]
  idx = _bin_index(t, num_bins)
  count = jnp.zeros(num_bins).at[idx].add(1.0)
  total = jnp.zeros(num_bins).at[idx].add(loss**2)
  batch_mean = total / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, decay * second_moment + (1.0 - decay) * batch_mean, second_moment)


def _bin_index(t: jax.Array, num_bins: int) -> jax.Array:
  """b = ⌊t·n⌋ clipped to [0, n): the bin of t, as the density, the draws and the EMA all read it."""
  return jnp.clip(jnp.floor(jnp.asarray(t) * num_bins).astype(jnp.int32), 0, num_bins - 1)


def _inverse_cdf(params: ProposalParams, u: jax.Array) -> tuple[jax.Array, jax.Array]:
  probs = params["probs"] / jnp.sum(params["probs"])
  num_bins = probs.shape[0]
  cdf = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(probs)])
  b = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, num_bins - 1)
  frac = jnp.clip((u - cdf[b]) / probs[b], 0.0, 1.0)
  t = (b + frac) / num_bins
  # fp32 rounding can carry t onto the next bin's edge (⌊t·n⌋ = b + 1). A few ulps back keep it in
  # bin b (two at most, checked for every n < 600 and for 1,000 to 10,000 bins), so that
  # q(t) = density(t) and the second-moment EMA files ℓ(t) under its own q.
  for _ in range(4):
    off = _bin_index(t, num_bins) - b
    t = jnp.where(off > 0, jnp.nextafter(t, 0.0), jnp.where(off < 0, jnp.nextafter(t, 1.0), t))
  return t, probs[b] * num_bins


def time_proposal(params: ProposalParams) -> TimeProposal:
  """The :data:`vdm.elbo.TimeProposal` u ↦ (t, q(t)) of the piecewise-constant density, by inverse
  CDF. It is a ``jax.tree_util.Partial``: a callable pytree whose leaves are the params, so it
  can be passed through ``jit`` boundaries and stored in a train state."""
  return jax.tree_util.Partial(_inverse_cdf, params)


def density(params: ProposalParams, t: jax.Array) -> jax.Array:
  """q(t) for t in [0, 1]."""
  probs = params["probs"] / jnp.sum(params["probs"])
  return probs[_bin_index(t, probs.shape[0])] * probs.shape[0]


@eqx.filter_jit
def _repeated_batch_means(eps_fn, gamma_fn, x, keys, vocab_size: int, antithetic: bool, proposal):
  def one(key):
    terms = elbo.elbo_terms(eps_fn, gamma_fn, x, key, vocab_size=vocab_size, antithetic=antithetic,
                            time_proposal=proposal)
    return jnp.mean(terms["diffusion"])
  return jax.lax.map(one, keys)


def estimator_variance(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, rng: jax.Array,
                       proposal: TimeProposal, *, vocab_size: int = 256, repeats: int = 200
                       ) -> dict[str, dict[str, float]]:
  """Variance of the batch-mean continuous-time diffusion term on one fixed batch x, over
  ``repeats`` draws of (t, ε), for uniform, antithetic, importance and importance+antithetic times.

  Returns {method: {"mean", "mean_se", "variance"}} in bits/dim, plus under "ratios" the entries
  "<method>/importance+antithetic" (variance of each method / variance of importance+antithetic).
  All methods use the same keys.
  """
  x = np.asarray(x)  # checked on the host: inside the jitted draws its values are unknown
  elbo.check_data(x, vocab_size)
  schedules.check_increasing(gamma_fn)
  keys = jax.random.split(rng, repeats)
  methods = {"uniform": (False, None), "antithetic": (True, None), "importance": (False, proposal),
             "importance+antithetic": (True, proposal)}
  out: dict = {}
  for name, (antithetic, prop) in methods.items():
    v = np.asarray(_repeated_batch_means(eps_fn, gamma_fn, jnp.asarray(x), keys, vocab_size, antithetic,
                                         prop), np.float64)
    v = elbo.nats_to_bpd(v, elbo.data_dims(x))
    out[name] = {"mean": float(v.mean()), "mean_se": float(v.std(ddof=1) / np.sqrt(v.size)),
                 "variance": float(v.var(ddof=1))}
  best = out["importance+antithetic"]["variance"]
  out["ratios"] = {f"{k}/importance+antithetic": out[k]["variance"] / best for k in methods}
  return out
