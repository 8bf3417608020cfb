"""The VDM model: the ScoreUNet denoiser ε̂(z_t; γ_t) and the noise schedule γ(t), from a config.

Parameters are one pytree ``{"net": ..., "schedule": ...}`` (``schedule`` is empty for fixed
schedules). ``eps_fn_for`` and ``gamma_fn_for`` close over them and give the callables that
``vdm.elbo`` and ``vdm.samplers`` take.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

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
  net: nn.Module
  schedule: Optional[nn.Module]
  fixed_gamma_fn: Optional[GammaFn]
  image_shape: tuple[int, int, int]


def make_model(config) -> Model:
  """The model described by ``config.model`` for images of ``config.data``'s shape."""
  m, d = config.model, config.data
  if not m.gamma_min < m.gamma_max:
    raise ValueError(f"model.gamma_min={m.gamma_min} must be < model.gamma_max={m.gamma_max}: "
                     "γ(t) rises from data (t=0) to noise (t=1); fix or swap them.")
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
  return Model(net, schedule, fixed, (d.image_size, d.image_size, d.channels))


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
               rng: Optional[jax.Array] = None) -> EpsFn:
  """ε̂(z_t, γ_t) with the model's parameters; dropout is on only with ``train`` (and ``rng``)."""
  deterministic = not train

  def eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return model.net.apply(params["net"], z, gamma, deterministic=deterministic, rngs=rngs)

  return eps_fn


def traced_fns(model: Model, params: Params) -> tuple[EpsFn, GammaFn]:
  """(ε̂, γ) with ``params`` as ``jax.tree_util.Partial``s: callable pytrees whose parameters jit
  traces as arguments rather than folding them into the program as constants (what
  :mod:`vdm.likelihood`, :mod:`vdm.ode_likelihood` and :mod:`vdm.importance` expect). Build them
  once per model: each call makes new functions, so a new compile."""
  eps_fn = jax.tree_util.Partial(lambda p, z, g: eps_fn_for(model, p)(z, g), params)
  gamma_fn = jax.tree_util.Partial(lambda p, t: gamma_fn_for(model, p)(t), params)
  return eps_fn, gamma_fn
