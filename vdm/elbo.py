"""The VDM variational bound, −log p(x) ≤ L_T(x) + L_diffusion(x) + L_0(x), in nats per example.

Data x are integers in [0, vocab_size), mapped to [−1, 1] by x ↦ 2(x + ½)/V − 1.
The forward process is q(z_t|x) = N(α_t x, σ²_t I) with σ²_t = sigmoid(γ_t),
α²_t = sigmoid(−γ_t), and the denoiser is any callable ``eps_fn(z_t, gamma_t) -> ε̂``.
The terms are named as in DDPM: L_T = KL(q(z_1|x) ‖ N(0, I)) the prior term, L_{t−1} the
diffusion terms (their sum L_diffusion, T steps or continuous time), L_0 the reconstruction; the
VDM paper writes the prior term D_KL and its T-step diffusion loss L_T (L_∞ in continuous time).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from jax.typing import ArrayLike

from vdm import schedules
from vdm.schedules import GammaFn

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
# An importance proposal over t ∈ [0, 1]: maps uniform u to (t, q(t)), q the proposal density.
TimeProposal = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

DECODERS = ("vdm", "discretized_gaussian")
WEIGHTINGS = ("elbo", "simple")
TERMS = ("prior", "diffusion", "reconstruction")  # the bound's terms, as elbo_terms names them


def concrete_value(a) -> Optional[np.ndarray]:
  """The value of `a` as a NumPy array, or None when it is traced inside a transformation."""
  try:
    return np.asarray(a)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_vocab_size(vocab_size: int) -> None:
  """Raise ValueError unless V = ``vocab_size`` is an integer >= 2 (the data's levels)."""
  if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
    raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 2 (256 for 8-bit images).")


def check_data(x: ArrayLike, vocab_size: int) -> None:
  """Raise ValueError unless x is a batch [B, ...] of integers in [0, vocab_size)."""
  check_vocab_size(vocab_size)
  if jnp.ndim(x) < 2:
    raise ValueError(f"x has shape {jnp.shape(x)}: expected a batch [B, ...] with at least one "
                     "data dimension; add a trailing axis.")
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(f"x has dtype {jnp.result_type(x)}: expected integers in [0, {vocab_size}) "
                     "(e.g. uint8 pixels), not values already scaled to [-1, 1].")
  value = concrete_value(x)
  if value is not None and value.size and (value.min() < 0 or value.max() >= vocab_size):
    raise ValueError(f"x holds values in [{value.min()}, {value.max()}], outside [0, {vocab_size}): "
                     "set vocab_size to the number of distinct levels or fix the data.")


def check_batches(batches: Iterable[ArrayLike]) -> None:
  """Raise ValueError if ``batches``, meant as an iterable of [B, ...] batches, is one array:
  iterating it would give its rows, each taken for a batch."""
  if hasattr(batches, "shape"):
    raise ValueError(f"batches is one array of shape {batches.shape}: pass an iterable of [B, ...] "
                     "batches, e.g. [x] for one batch (list(x) for batches stacked on axis 0).")


def over_batches(batches: Iterable[ArrayLike], rng: jax.Array, vocab_size: int,
                 fn: Callable[[jax.Array, jax.Array, jax.Array], Any], pad: bool = True
                 ) -> tuple[list, int]:
  """[fn(x, fold_in(rng, i), keep) for each batch x, i = 0, 1, ...] and D, after checking each
  batch's data; the same keys for every fn, so evaluations of the same batches share their draws.

  With ``pad``, a batch smaller than the first is padded to the first one's size with copies of
  its first row, and ``keep`` [B] is True on its own rows: ``fn`` returns values for those alone,
  and passes ``keep`` on where it draws times (the mask of :func:`elbo_terms`), so that the
  padding neither shifts the real rows' antithetic times nor ranks before them by noise. A split
  is then evaluated by one compiled program however its last batch falls, not two. The real rows
  get the values they get alone, but for a bf16 network's fp32 share, which is a share of the
  padded batch (:func:`vdm.model.split_by_noise`): they get at least their own. Without ``pad``
  (a computation coupled across the batch, as an adaptive ODE solve's step size) every batch is
  passed as it is, ``keep`` all True."""
  check_batches(batches)
  results, dims, size = [], None, None
  for i, x in enumerate(batches):
    x = jnp.asarray(x)
    check_data(x, vocab_size)
    if dims is not None and data_dims(x) != dims:
      raise ValueError(f"batch {i} has {data_dims(x)} values per image (shape {x.shape}) but "
                       f"batch 0 has {dims}: bits/dim needs one image shape; evaluate each shape "
                       "separately.")
    dims, size, n = data_dims(x), size or x.shape[0], x.shape[0]
    if not n:
      raise ValueError(f"batch {i} has no images (shape {x.shape}): drop it from batches.")
    if pad and n < size:
      x = jnp.concatenate([x, jnp.repeat(x[:1], size - n, axis=0)])
    results.append(fn(x, jax.random.fold_in(rng, i), jnp.arange(x.shape[0]) < n))
  if dims is None:
    raise ValueError("batches yielded no data: pass at least one batch of images (is the "
                     "split or num_images empty?).")
  return results, dims


def check_decoder(decoder: str, x_hat: Optional[jax.Array] = None, reads_x_hat: bool = False
                  ) -> None:
  """Raise ValueError unless ``decoder`` is one of :data:`DECODERS` and, where the decoder is
  applied (``reads_x_hat``), ``x_hat`` is given for the discretized Gaussian and only for it: one
  centred on z_0/α_0 instead would be the bound of another model, silently."""
  if decoder not in DECODERS:
    raise ValueError(f"unknown decoder {decoder!r}: use one of {DECODERS}.")
  if reads_x_hat and (decoder == "discretized_gaussian") != (x_hat is not None):
    raise ValueError(f"decoder={decoder!r} with x_hat {'missing' if x_hat is None else 'given'}: the "
                     "discretized Gaussian decoder needs x_hat = "
                     "vdm.elbo.decoder_x_hat(eps_fn, z_0, γ_0, decoder), and the VDM decoder reads z_0 alone.")


def check_num_timesteps(num_timesteps: int) -> None:
  """Raise ValueError unless T is an integer >= 0 (0 = continuous time)."""
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 0:
    raise ValueError(f"num_timesteps={num_timesteps!r} must be an integer >= 0 (0 = continuous time).")


def denoise(eps_fn: EpsFn, z_t: jax.Array, gamma_t: jax.Array) -> jax.Array:
  """ε̂ = eps_fn(z_t, γ_t), refused unless it has z_t's shape (a mismatch would broadcast)."""
  eps_hat = eps_fn(z_t, gamma_t)
  if jnp.shape(eps_hat) != z_t.shape:
    raise ValueError(f"eps_fn returned shape {jnp.shape(eps_hat)} for z_t of shape {z_t.shape}: "
                     "it must return ε̂ with z_t's shape.")
  return eps_hat


def data_dims(x: ArrayLike) -> int:
  """D = the number of dimensions per example (H·W·C for images)."""
  return int(np.prod(jnp.shape(x)[1:]))


def scale_data(x: jax.Array, vocab_size: int) -> jax.Array:
  """x ↦ 2(x + ½)/V − 1: the centres of V equal bins tiling [−1, 1]."""
  return 2.0 * (jnp.asarray(x, jnp.float32) + 0.5) / vocab_size - 1.0


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
  """Broadcast a per-example [B] array against [B, ...]."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def diffuse(x_scaled: jax.Array, gamma_t: jax.Array, eps: jax.Array) -> jax.Array:
  """z_t = α_t x + σ_t ε, for γ_t per example [B] or a scalar."""
  alpha_t, sigma_t = schedules.alpha_sigma(_bcast(jnp.asarray(gamma_t, jnp.float32), x_scaled))
  return alpha_t * x_scaled + sigma_t * eps


def sum_per_example(a: jax.Array) -> jax.Array:
  """Σ over all but the batch axis: [B, ...] -> [B]."""
  return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def prior_loss(x_scaled: jax.Array, gamma_1: jax.Array) -> jax.Array:
  """L_T = KL(N(α_1 x, σ²_1) || N(0, 1)) = ½ Σ (σ²_1 + α²_1 x² − 1 − log σ²_1), per example.

  Evaluated as ½ Σ (α²_1 (x² − 1) + softplus(−γ_1)), which avoids σ²_1 − 1 cancelling in fp32.
  """
  g = jnp.broadcast_to(_bcast(jnp.asarray(gamma_1, jnp.float32), x_scaled), x_scaled.shape)
  kl = 0.5 * (schedules.alpha2(g) * (x_scaled**2 - 1.0) + jax.nn.softplus(-g))
  return sum_per_example(kl)


def _bin_log_prob(x: jax.Array, mean: jax.Array, log_scale: jax.Array, vocab_size: int) -> jax.Array:
  """log ∫_bin(x) N(y; mean, e^{2 log_scale}) dy, bins of width 2/V, the two edge bins open-ended."""
  centre = scale_data(x, vocab_size)
  inv_s = jnp.exp(-log_scale)
  lo = jnp.where(x == 0, -jnp.inf, (centre - 1.0 / vocab_size - mean) * inv_s)
  hi = jnp.where(x == vocab_size - 1, jnp.inf, (centre + 1.0 / vocab_size - mean) * inv_s)

  def log_diff(a, b):  # log(Φ(b) − Φ(a)) for a < b, accurate in the lower tail
    log_b = log_ndtr(b)
    return log_b + jnp.log1p(-jnp.minimum(jnp.exp(log_ndtr(a) - log_b), 1.0 - 1e-7))

  mirror = lo > 0  # in the upper tail use Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
  return log_diff(jnp.where(mirror, -hi, lo), jnp.where(mirror, -lo, hi))


def vdm_decoder_logits(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
  """Logits of the paper's factorised decoder: −½ e^{−γ_0} (z_0/α_0 − x_v)², shape [..., V]."""
  g = _bcast(jnp.asarray(gamma_0, jnp.float32), z_0)
  x_v = scale_data(jnp.arange(vocab_size), vocab_size)
  return -0.5 * jnp.exp(-g)[..., None] * (decoder_centre(z_0, gamma_0)[..., None] - x_v) ** 2


def reconstruction_loss(x: jax.Array, z_0: jax.Array, gamma_0: jax.Array, *, vocab_size: int = 256,
                        decoder: str = "vdm", x_hat: Optional[jax.Array] = None) -> jax.Array:
  """L_0 = −log p(x | z_0), summed over dimensions, per example.

  decoder="vdm": p(x_i|z_0) = softmax_v(−½ e^{−γ_0} (z_0/α_0 − x_v)²)[x_i].
  decoder="discretized_gaussian": N(x̂_0, e^{γ_0}) integrated over the bin of x_i (DDPM), where
  x̂_0 = (z_0 − σ_0 ε̂)/α_0 is the denoiser's mean (:func:`decoder_x_hat`).
  """
  check_decoder(decoder, x_hat, reads_x_hat=True)
  if decoder == "vdm":
    logp = decoder_log_probs(z_0, gamma_0, vocab_size)
    logp = jnp.take_along_axis(logp, jnp.asarray(x, jnp.int32)[..., None], axis=-1)[..., 0]
  else:
    logp = _bin_log_prob(x, *_gaussian_decoder(z_0, gamma_0, x_hat), vocab_size)
  return -sum_per_example(logp)


def decoder_centre(z_0: jax.Array, gamma_0: jax.Array, x_hat: Optional[jax.Array] = None
                   ) -> jax.Array:
  """Where the decoder centres x: x̂_0 when given (the discretized Gaussian's mean), else z_0/α_0
  (the VDM decoder's)."""
  if x_hat is not None:
    return x_hat
  return z_0 / jnp.sqrt(schedules.alpha2(_bcast(jnp.asarray(gamma_0, jnp.float32), z_0)))


def _gaussian_decoder(z_0: jax.Array, gamma_0: jax.Array, x_hat: Optional[jax.Array]
                      ) -> tuple[jax.Array, jax.Array]:
  """(mean, log scale) of the discretized Gaussian decoder N(:func:`decoder_centre`, e^{γ_0})."""
  g = jnp.broadcast_to(_bcast(jnp.asarray(gamma_0, jnp.float32), z_0), z_0.shape)
  return decoder_centre(z_0, gamma_0, x_hat), 0.5 * g


def decoder_log_probs(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int, decoder: str = "vdm",
                      x_hat: Optional[jax.Array] = None) -> jax.Array:
  """log p(x_i = v | z_0) for every value v, shape [..., V]: the decoder of
  :func:`reconstruction_loss` (same ``decoder`` and ``x_hat``) as a whole distribution."""
  check_decoder(decoder, x_hat, reads_x_hat=True)
  if decoder == "vdm":
    return jax.nn.log_softmax(vdm_decoder_logits(z_0, gamma_0, vocab_size), axis=-1)
  mean, log_scale = _gaussian_decoder(z_0, gamma_0, x_hat)
  return _bin_log_prob(jnp.arange(vocab_size), mean[..., None], log_scale[..., None], vocab_size)


def predict_x0(z_0: jax.Array, gamma_0: jax.Array, eps_hat_0: jax.Array) -> jax.Array:
  """x̂_0 = (z_0 − σ_0 ε̂)/α_0: the denoiser's mean of x at t = 0, the discretized Gaussian's."""
  alpha_0, sigma_0 = schedules.alpha_sigma(gamma_0)
  return (z_0 - sigma_0 * eps_hat_0) / alpha_0


def decoder_x_hat(eps_fn: EpsFn, z_0: jax.Array, gamma_0: jax.Array, decoder: str
                  ) -> Optional[jax.Array]:
  """The ``x_hat`` the decoder reads for a batch z_0: x̂_0 = (z_0 − σ_0 ε̂(z_0; γ_0))/α_0 (one
  denoiser call, :func:`predict_x0`) for "discretized_gaussian"; None for "vdm", which reads z_0."""
  check_decoder(decoder)
  if decoder != "discretized_gaussian":
    return None
  return predict_x0(z_0, gamma_0, denoise(eps_fn, z_0, jnp.full((z_0.shape[0],), gamma_0)))


def sample_times(rng: jax.Array, batch: int, antithetic: bool = True,
                 mask: Optional[jax.Array] = None) -> jax.Array:
  """u ∈ [0, 1)^B: i.i.d. uniform, or antithetic (stratified) u_i = (u_0 + i/B) mod 1.

  A ``mask`` [B] (0 on padding rows) spreads the antithetic times over the n rows it keeps:
  u_i = (u_0 + k_i/n) mod 1, k_i the row's rank among them, the times of an unpadded batch of n.
  Spread over all B rows, the kept rows of a mostly padded batch would share one narrow band of t.
  With either kind of times the padding gets the largest u below 1, so that it ranks last by
  noise level and never takes the fp32 share of the least noisy rows
  (:func:`vdm.model.split_by_noise`) from the kept ones.
  """
  kept, rank, n = None, jnp.arange(batch), batch
  if mask is not None:
    if jnp.shape(mask) != (batch,):
      raise ValueError(f"mask has shape {jnp.shape(mask)}: pass one value per row of the batch, "
                       f"shape ({batch},), with 0 on the padding.")
    kept = jnp.asarray(mask) > 0
    rank, n = jnp.cumsum(kept) - 1, jnp.maximum(jnp.sum(kept), 1)
  if antithetic:
    u = jnp.mod(jax.random.uniform(rng, ()) + rank / n, 1.0)
  else:
    u = jax.random.uniform(rng, (batch,))
  return u if kept is None else jnp.where(kept, u, jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))


def diffusion_weight(gamma_fn: GammaFn, u: jax.Array, num_timesteps: int = 0
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(t, γ_t, w_t) such that the diffusion loss is ½ w_t ||ε − ε̂(z_t; γ_t)||².

  Continuous time (T = 0): t = u, w_t = dγ/dt (L_∞ = ½ E_t[γ'(t) ||ε − ε̂||²]).
  Discrete time: t = i/T with i = ⌊uT⌋ + 1, s = t − 1/T, w_t = T (e^{γ_t − γ_s} − 1).
  u outside [0, 1] (or, in discrete time, u = 1, which would give t > 1) is refused where known.
  """
  value = concrete_value(u)
  if value is not None and value.size and (value.min() < 0 or value.max() > 1
                                           or (num_timesteps and value.max() == 1)):
    raise ValueError(f"u holds values in [{value.min()}, {value.max()}]: times are drawn from "
                     f"[0, {'1)' if num_timesteps else '1]'}, as sample_times gives them.")
  if num_timesteps == 0:
    gamma_t, dgamma = jax.jvp(gamma_fn, (u,), (jnp.ones_like(u),))
    return u, gamma_t, dgamma
  t = (jnp.floor(u * num_timesteps) + 1.0) / num_timesteps
  gamma_t = gamma_fn(t)
  gamma_s = gamma_fn(t - 1.0 / num_timesteps)
  return t, gamma_t, num_timesteps * jnp.expm1(gamma_t - gamma_s)


def elbo_terms(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, rng: jax.Array, *,
               vocab_size: int = 256, num_timesteps: int = 0, antithetic: bool = True,
               decoder: str = "vdm", time_proposal: Optional[TimeProposal] = None,
               mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """One-sample estimates of the ELBO terms, per example, in nats.

  Returns {"prior": L_T, "diffusion": L_diffusion (the sum of the T terms L_{t−1}, or L_∞ in
  continuous time), "reconstruction": L_0} and, for training and diagnostics, "eps_mse" =
  ||ε − ε̂||² and "t", the time each example was evaluated at; with the discretized Gaussian
  decoder also "eps_mse_0" = ||ε_0 − ε̂(z_0; γ_0)||² from its mean's denoiser call.
  With ``time_proposal`` (continuous time only) t ~ q(t) and the diffusion term is divided by q(t),
  which keeps it unbiased. ``mask`` [B] marks a padded batch's padding with 0; the antithetic
  times are spread over the other rows (:func:`sample_times`).
  """
  check_data(x, vocab_size)
  check_num_timesteps(num_timesteps)
  check_decoder(decoder)
  if time_proposal is not None and num_timesteps:
    raise ValueError("time_proposal is for continuous time: set num_timesteps=0 or drop the proposal.")
  schedules.check_increasing(gamma_fn)

  rng_t = jax.random.split(rng, 3)[0]  # the other two keys are elbo_terms_from's noise keys
  gamma_0, gamma_1 = gamma_fn(jnp.array([0.0, 1.0]))
  u = sample_times(rng_t, x.shape[0], antithetic, mask)
  q_t = None
  if time_proposal is not None:
    u, q_t = time_proposal(u)
  t, gamma_t, w_t = diffusion_weight(gamma_fn, u, num_timesteps)
  return elbo_terms_from(eps_fn, x, rng, t, gamma_t, w_t, gamma_0, gamma_1, q_t=q_t,
                         vocab_size=vocab_size, decoder=decoder)


def diffusion_loss(eps_fn: EpsFn, x_scaled: jax.Array, gamma_t: jax.Array, w_t: jax.Array,
                   eps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(½ w_t ||ε − ε̂(z_t; γ_t)||², ||ε − ε̂||²) per example, z_t = α_t x + σ_t ε: the diffusion
  term's one-sample estimate at given times (w_t = γ'(t) in continuous time, the discrete-time
  weight otherwise: :func:`diffusion_weight`)."""
  eps_mse = sum_per_example((eps - denoise(eps_fn, diffuse(x_scaled, gamma_t, eps), gamma_t)) ** 2)
  return 0.5 * w_t * eps_mse, eps_mse


def elbo_terms_from(eps_fn: EpsFn, x: jax.Array, rng: jax.Array, t: jax.Array, gamma_t: jax.Array,
                    w_t: jax.Array, gamma_0: jax.Array, gamma_1: jax.Array, *,
                    q_t: Optional[jax.Array] = None, vocab_size: int = 256, decoder: str = "vdm"
                    ) -> dict[str, jax.Array]:
  """The terms of :func:`elbo_terms` given the schedule's values instead of the schedule.

  t, γ_t, w_t: [B] times, γ(t) and diffusion weights (w_t = γ'(t) in continuous time, see
  :func:`diffusion_weight`); γ_0, γ_1: scalars γ(0), γ(1); q_t: [B] proposal density or None.
  The noise comes from keys 2 and 3 of ``jax.random.split(rng, 3)`` (key 1 is elbo_terms' time
  key), so with the same rng and the same schedule values this equals elbo_terms exactly. Every
  example's terms depend only on its own t_i, γ_t,i, w_t,i (and on γ_0, γ_1), which makes
  gradients w.r.t. γ_t and w_t per-example quantities (used by :mod:`vdm.variance`).
  """
  check_data(x, vocab_size)
  check_decoder(decoder)
  batch = x.shape[0]
  _, rng_eps, rng_0 = jax.random.split(rng, 3)
  x_scaled = scale_data(x, vocab_size)
  if q_t is None:
    q_t = jnp.ones_like(t)

  diffusion, eps_mse = diffusion_loss(eps_fn, x_scaled, gamma_t, w_t,
                                      jax.random.normal(rng_eps, x_scaled.shape))
  eps_0 = jax.random.normal(rng_0, x_scaled.shape)
  z_0 = diffuse(x_scaled, gamma_0, eps_0)
  x_hat_0, extra = None, {}
  if decoder == "discretized_gaussian":  # the denoiser's mean at t = 0, a call of its own: in one
    # call with z_t, an ε̂ that ranks its batch by γ (model.split_by_noise) gave z_0's rows, all
    # at the lowest γ, the fp32 share meant for the least noisy z_t.
    eps_hat_0 = denoise(eps_fn, z_0, jnp.full((batch,), gamma_0))
    x_hat_0 = predict_x0(z_0, gamma_0, eps_hat_0)
    extra["eps_mse_0"] = sum_per_example((eps_0 - eps_hat_0) ** 2)  # for L_simple: DDPM's x_1

  return {
      "prior": prior_loss(x_scaled, gamma_1),
      "diffusion": diffusion / q_t,
      "reconstruction": reconstruction_loss(x, z_0, gamma_0, vocab_size=vocab_size, decoder=decoder,
                                            x_hat=x_hat_0),
      "eps_mse": eps_mse,
      "t": t,
      **extra,
  }


def total_nats(terms: dict[str, jax.Array]) -> jax.Array:
  """L_T + L_diffusion + L_0 per example, in nats."""
  return terms["prior"] + terms["diffusion"] + terms["reconstruction"]


def nats_to_bpd(nats, dims: int):
  """nats per example → bits/dim: nats / (D ln 2), for arrays or floats."""
  return nats / (dims * math.log(2.0))


def bits_per_dim(terms: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """The batch mean of the bound in bits/dim: nats / (D ln 2)."""
  return nats_to_bpd(jnp.mean(total_nats(terms)), data_dims(x))


def training_loss(terms: dict[str, jax.Array], x: jax.Array, weighting: str = "elbo",
                  num_timesteps: int = 0) -> jax.Array:
  """The scalar to minimise: the ELBO in bits/dim ("elbo"), or DDPM's L_simple, the unweighted
  per-dimension ε-MSE E||ε − ε̂||² / D ("simple"). The reported bound is always the ELBO.

  With T = ``num_timesteps`` > 0 and the discretized Gaussian decoder, whose mean reads
  ε̂(z_0; γ_0), L_simple averages over the T + 1 latents z_0, z_{1/T}, ..., z_1, as DDPM's t = 1..T'
  with x_1 = z_0 (T' = T + 1): (T · E||ε − ε̂(z_t)||² + ||ε_0 − ε̂(z_0)||²) / (T + 1). Without
  z_0, ε̂ would never be trained at the one point that decoder reads.
  """
  if weighting == "elbo":
    return bits_per_dim(terms, x)
  if weighting == "simple":
    mse = jnp.mean(terms["eps_mse"])
    if num_timesteps and "eps_mse_0" in terms:
      mse = (num_timesteps * mse + jnp.mean(terms["eps_mse_0"])) / (num_timesteps + 1)
    return mse / data_dims(x)
  raise ValueError(f"unknown loss weighting {weighting!r}: use one of {WEIGHTINGS}.")
