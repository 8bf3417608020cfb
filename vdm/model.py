"""The VDM model: the ScoreUNet denoiser ε̂(z_t; γ_t) and the noise schedule γ(t), from a config.

Parameters are one pytree ``{"net": ..., "schedule": ...}`` (``schedule`` is empty for fixed
schedules). ``eps_fn_for`` and ``gamma_fn_for`` close over them and give the callables that
``vdm.elbo`` and ``vdm.samplers`` take.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm import schedules
from vdm.elbo import EpsFn
from vdm.nets import ScoreUNet
from vdm.schedules import GammaFn

SCHEDULES = ("fixed_linear", "learned_linear", "learned_monotone", "ddpm_linear", "ddpm_cosine")
Params = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """The denoiser network and the schedule: a learned Flax module, or a fixed ``gamma_fn``."""
  net: ScoreUNet
  schedule: Optional[nn.Module]
  fixed_gamma_fn: Optional[GammaFn]
  image_shape: tuple[int, int, int]
  eval_fp32_fraction: float = 0.0  # see eps_fn_for

  def __post_init__(self):
    if (self.schedule is None) == (self.fixed_gamma_fn is None):
      raise ValueError("a Model takes one schedule: a learned `schedule` module or a "
                       "`fixed_gamma_fn`, with the other None (dataclasses.replace(model, "
                       "schedule=None, fixed_gamma_fn=f) swaps in a fixed γ).")


def make_model(config) -> Model:
  """The model described by ``config.model`` for images of ``config.data``'s shape."""
  m, d = config.model, config.data
  schedules.check_endpoints(m.gamma_min, m.gamma_max, "model.")
  if not 0.0 <= m.eval_fp32_fraction <= 1.0:
    raise ValueError(f"model.eval_fp32_fraction={m.eval_fp32_fraction} must be in [0, 1] (the "
                     "share of each evaluated batch, least noisy first, computed in fp32).")
  net = ScoreUNet(
      n_embd=m.n_embd,
      n_layer=m.n_layer,
      dropout=m.dropout,
      fourier_features=m.fourier_features,
      attention=m.attention,
      channel_mult=tuple(m.channel_mult),
      gamma_min=m.gamma_min,
      gamma_max=m.gamma_max,
      dtype=m.dtype,
      residual_dtype=m.residual_dtype,
      remat=m.remat,
      unroll=m.unroll,
      norm_impl=m.norm_impl,
  )
  schedule, fixed = None, None
  if m.schedule == "learned_linear":
    schedule = schedules.LearnedLinear(m.gamma_min, m.gamma_max)
  elif m.schedule == "learned_monotone":
    schedule = schedules.LearnedMonotone(m.gamma_min, m.gamma_max)
  elif m.schedule == "fixed_linear":
    fixed = schedules.fixed_linear(m.gamma_min, m.gamma_max)
  elif m.schedule in ("ddpm_linear", "ddpm_cosine"):
    # DDPM's own β_1..β_1000; its latents x_1..x_1000 sit at t = (i − 1)/999, so
    # model.num_timesteps=999 gives DDPM's L_1..L_999 exactly (vdm.schedules.ddpm).
    fixed = schedules.ddpm(m.schedule.split("_")[1])
  else:
    raise ValueError(f"unknown model.schedule {m.schedule!r}: use one of {', '.join(SCHEDULES)}.")
  return Model(net, schedule, fixed, (d.image_size, d.image_size, d.channels),
               float(m.eval_fp32_fraction))


def with_dtype(model: Model, dtype: str) -> Model:
  """The model with its network computing in ``dtype``; 'float32' is the network entirely in fp32
  (its residual stream too) and evaluates every example in fp32."""
  if dtype == "float32":
    return dataclasses.replace(model, net=model.net.clone(dtype=dtype, residual_dtype=dtype),
                               eval_fp32_fraction=0.0)
  return dataclasses.replace(model, net=model.net.clone(dtype=dtype))


def forward_differentiable(model: Model) -> Model:
  """The model with a network that has forward-mode derivatives (the ODE likelihood's
  ``jax.linearize``): Pallas norms (and convolutions), which have only reverse-mode ones,
  become the XLA rule 'recompute' of the same function (``remat`` is reset to 'none', which
  'recompute' needs and inference does not use)."""
  if model.net.norm_impl not in ("pallas", "pallas_conv"):
    return model
  return dataclasses.replace(model, net=model.net.clone(norm_impl="recompute", remat="none"))


def init_params(model: Model, rng: jax.Array) -> Params:
  """Fresh parameters ``{"net": ..., "schedule": ...}``."""
  @jax.jit
  def init(rng):
    rng_net, rng_schedule = jax.random.split(rng)
    z = jnp.zeros((1,) + model.image_shape, jnp.float32)
    net_params = model.net.init({"params": rng_net, "dropout": rng_net}, z, jnp.zeros((1,)),
                                deterministic=True)
    schedule_params = ({} if model.schedule is None
                       else model.schedule.init(rng_schedule, jnp.zeros((1,))))
    return {"net": net_params, "schedule": schedule_params}

  return init(rng)


def gamma_fn_for(model: Model, params: Params) -> GammaFn:
  """γ(t) with the model's parameters."""
  if model.schedule is None:
    return model.fixed_gamma_fn
  return schedules.bind(model.schedule, params["schedule"])


def eps_fn_for(model: Model, params: Params, *, train: bool = False,
               rng: Optional[jax.Array] = None, bound: bool = False) -> EpsFn:
  """ε̂(z_t, γ_t) with the model's parameters; dropout is on only with ``train`` (and ``rng``).

  With ``bound`` (evaluating the ELBO, not training) a network that computes in bf16 with
  ``model.eval_fp32_fraction`` f > 0 sends the ⌈f·B⌉ examples of lowest γ_t in each batch
  through the network in fp32 (:func:`split_by_noise`): the low-noise end is where bf16 loses
  bits (experiments/RESULTS.md). Samplers leave it off: a sampling step's examples share one t.
  """
  deterministic = not train

  def eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
    check_images(model, z)
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return model.net.apply(params["net"], z, gamma, deterministic=deterministic, rngs=rngs)

  share = eval_fp32_share(model)
  if train or not bound or share == 0.0:
    return eps_fn
  return split_by_noise(eps_fn_for(with_dtype(model, "float32"), params), eps_fn, share)


def check_images(model: Model, z: jax.Array) -> None:
  """Refuse a batch that is not [B, H, W, C] of the model's image shape: the convolutions would
  take other sizes without complaint, and bound or sample another model's data."""
  if tuple(jnp.shape(z)[1:]) != model.image_shape:
    raise ValueError(f"a batch of shape {tuple(jnp.shape(z))} for a model of images "
                     f"{model.image_shape} (H, W, C): pass [B, H, W, C] batches of the config's "
                     "data.image_size and data.channels (NCHW arrays: x.transpose(0, 2, 3, 1)).")


def eval_fp32_share(model: Model) -> float:
  """The share of each batch the bound sends through the fp32 network: ``eval_fp32_fraction``
  for a network computing in bf16, 0 for one already in fp32."""
  return 0.0 if model.net.dtype == "float32" else model.eval_fp32_fraction


def split_by_noise(eps_low: EpsFn, eps_rest: EpsFn, fraction: float) -> EpsFn:
  """ε̂ that sends the ⌈fraction·B⌉ examples of lowest γ_t (least noise) of a batch of B through
  ``eps_low`` and the others through ``eps_rest``, in the batch's order; the two sub-batches have
  static sizes, so each function is compiled once."""
  def eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
    b = z.shape[0]
    k = min(math.ceil(fraction * b), b)
    if k in (0, b):
      return (eps_low if k else eps_rest)(z, gamma)
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32).reshape(-1), (b,))
    order = jnp.argsort(gamma)
    z, gamma = z[order], gamma[order]
    out = jnp.concatenate([eps_low(z[:k], gamma[:k]), eps_rest(z[k:], gamma[k:])])
    return jnp.zeros_like(out).at[order].set(out)

  return eps_fn


def traced_fns(model: Model, params: Params) -> tuple[EpsFn, GammaFn]:
  """(ε̂, γ) with ``params`` as ``jax.tree_util.Partial``s: callable pytrees whose parameters jit
  traces as arguments rather than folding them into the program as constants (what
  :mod:`vdm.likelihood`, :mod:`vdm.ode_likelihood` and :mod:`vdm.importance` expect). The
  functions are the same objects for every ``params`` of a model (and of an equal one), so a
  program compiled for one set of parameters serves the next. ε̂ is the bound's
  (``eps_fn_for(..., bound=True)``); where a batch shares one t, as in an ODE solve, its fp32
  share is the first ⌈f·B⌉ examples."""
  try:
    eps, gamma = _param_fns(model)
  except TypeError:  # a model built by hand with an unhashable field: new functions each call
    eps, gamma = _param_fns.__wrapped__(model)
  return jax.tree_util.Partial(eps, params), jax.tree_util.Partial(gamma, params)


@functools.lru_cache(maxsize=64)
def _param_fns(model: Model) -> tuple[Callable, Callable]:
  """ε̂(params, z, γ) and γ(params, t) of ``model``: one pair per (equal) model."""
  return (lambda p, z, g: eps_fn_for(model, p, bound=True)(z, g),
          lambda p, t: gamma_fn_for(model, p)(t))
