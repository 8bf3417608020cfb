"""A 2-D toy problem for the notebooks: a quantised swirl and a small MLP denoiser.

The swirl's coordinates are integers in [0, vocab_size) (a grid of vocab_size levels per axis),
so the ELBO of :mod:`vdm.elbo` is a bound on a discrete distribution, in bits per coordinate,
and log2(vocab_size) is the uniform bound.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vdm import elbo, schedules, variance
from vdm.nets import timestep_embedding


def swirl(rng: jax.Array, n: int, vocab_size: int = 64, noise: float = 0.04) -> jax.Array:
  """n points [n, 2] of a two-turn spiral in [−1, 1]², quantised to integers in [0, vocab_size)."""
  k_r, k_n = jax.random.split(rng)
  r = jnp.sqrt(jax.random.uniform(k_r, (n,), minval=0.02, maxval=1.0))
  angle = 4.0 * math.pi * r
  xy = 0.85 * r[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
  xy = xy + noise * jax.random.normal(k_n, (n, 2))
  return jnp.clip(jnp.floor((xy + 1.0) / 2.0 * vocab_size), 0, vocab_size - 1).astype(jnp.int32)


def swirl_entropy_bits(vocab_size: int = 64, noise: float = 0.04, n: int = 10**7,
                       rng: Optional[jax.Array] = None) -> float:
  """H(x)/2, the swirl's entropy in bits per coordinate: the floor under any model's expected
  bits/dim on it. Estimated from the grid histogram of n draws (its bias, about −(cells − 1)/(4 n
  ln 2), is 1e-4 bits at n = 10⁷)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  counts = jnp.zeros((vocab_size * vocab_size,), jnp.int32)
  chunk = 10**6
  for i in range(-(-n // chunk)):
    x = swirl(jax.random.fold_in(rng, i), min(chunk, n - i * chunk), vocab_size, noise)
    counts = counts + jnp.bincount(x[:, 0] * vocab_size + x[:, 1], length=vocab_size**2)
  p = counts[counts > 0] / n
  return float(-(p * jnp.log2(p)).sum() / 2)


class MLPDenoiser(nn.Module):
  """ε̂(z_t, γ_t): an MLP on z and the U-Net's sinusoidal embedding of γ rescaled to [0, 1]."""
  hidden: int = 128
  layers: int = 3
  embed_dim: int = 32
  gamma_min: float = schedules.GAMMA_MIN
  gamma_max: float = schedules.GAMMA_MAX

  @nn.compact
  def __call__(self, z: jax.Array, gamma: jax.Array) -> jax.Array:
    t = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    emb = nn.Dense(self.hidden)(nn.swish(nn.Dense(self.hidden)(timestep_embedding(t, self.embed_dim))))
    h = nn.Dense(self.hidden)(z)
    for _ in range(self.layers):
      h = h + nn.Dense(self.hidden)(nn.swish(nn.LayerNorm()(h) + emb))
    return nn.Dense(z.shape[-1], kernel_init=nn.initializers.zeros)(nn.swish(h))


def train(rng: jax.Array, data_rng: jax.Array, *, steps: int, batch: int = 256, vocab_size: int = 64,
          learning_rate: float = 3e-3, hidden: int = 128, n_features: int = 64,
          gamma_min: float = -10.0, gamma_max: float = 6.0, variance_minimizing: bool = True) -> dict[str, Any]:
  """Train MLPDenoiser and a LearnedMonotone γ on the continuous-time ELBO of swirl data.

  γ(0) starts at gamma_min = −10, where σ_0 = e^{−5} is about a fifth (0.22) of a grid cell of 64
  levels, so the decoder, not the denoiser, resolves the grid. variance_minimizing=True: the
  schedule's shape follows the estimator's second moment (:mod:`vdm.variance`), its endpoints and
  the denoiser the ELBO. Returns the modules, the parameters and the bits/dim of each training
  batch.
  """
  if steps < 1 or batch < 1:
    raise ValueError(f"steps={steps} and batch={batch} must be >= 1.")
  denoiser = MLPDenoiser(hidden=hidden, gamma_min=gamma_min, gamma_max=gamma_max)
  schedule = schedules.LearnedMonotone(gamma_min=gamma_min, gamma_max=gamma_max, n_features=n_features)
  k_s, k_g, k_loop = jax.random.split(rng, 3)
  params = {"score": denoiser.init(k_s, jnp.zeros((1, 2)), jnp.zeros((1,))),
            "gamma": schedule.init(k_g, jnp.zeros((1,)))}
  warmup = min(100, steps // 10 + 1)  # the cosine decay needs at least one step after it
  opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1)))
  eps_fn_of = lambda p: (lambda z, g: denoiser.apply(p, z, g))
  gamma_fn_of = lambda p: schedules.bind(schedule, p)

  def step(carry, i):
    params, state = carry
    k_t, k_x = jax.random.split(jax.random.fold_in(k_loop, i))
    x = swirl(jax.random.fold_in(data_rng, i), batch, vocab_size)
    if variance_minimizing:
      res = variance.elbo_and_grads(eps_fn_of, params["score"], gamma_fn_of, params["gamma"], x, k_t,
                                    vocab_size=vocab_size)
      loss, grads = res.loss, {"score": res.score_grads, "gamma": res.gamma_grads}
    else:
      loss, grads = jax.value_and_grad(lambda p: elbo.training_loss(elbo.elbo_terms(
          eps_fn_of(p["score"]), gamma_fn_of(p["gamma"]), x, k_t, vocab_size=vocab_size), x))(params)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def run(params):
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
    return params, losses

  params, losses = run(params)
  return {"denoiser": denoiser, "schedule": schedule, "params": params, "losses": losses,
          "eps_fn": eps_fn_of(params["score"]), "gamma_fn": gamma_fn_of(params["gamma"])}
