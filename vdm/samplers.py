"""Samplers from z_1 ~ N(0, I) to z_0, for any denoiser ``eps_fn(z_t, gamma_t)`` and schedule γ(t).

Each runs N steps on the uniform grid t_i = i/N, from t = 1 down to t = 0, as one
``lax.fori_loop`` (so a jitted sampler compiles one step, whatever N), and has the signature
:data:`Sampler`; :data:`SAMPLERS` names them for configs and the command line. A new sampler is
a ``step(z_t, t, s, rng) -> z_s`` run by :func:`reverse_loop` (:func:`eps_at` gives ε̂ at a
scalar γ); registered in :data:`SAMPLERS`, it is one that ``vdm.main --mode=sample
--sampler=NAME`` runs. ``decode`` maps z_0 to integer data with the model's decoder.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdm import schedules
from vdm.elbo import (EpsFn, check_decoder, check_vocab_size, decoder_centre, decoder_log_probs,
                      denoise)
from vdm.schedules import GammaFn

# step(z_t, t, s, rng) -> z_s for s = t − 1/N.
Step = Callable[[jax.Array, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def reverse_loop(step: Step, gamma_fn: GammaFn, z_1: jax.Array, num_steps: int,
                 rng: Optional[jax.Array] = None) -> jax.Array:
  """z_0 from z_1 by z_{(i−1)/N} = step(z_{i/N}, i/N, (i−1)/N, rng_i) for i = N..1, rng_i split off
  ``rng`` (None when ``rng`` is None), after checking z_1, N and γ: every sampler here is a
  ``step`` run by this loop, and so is a new one."""
  if not jnp.issubdtype(jnp.result_type(z_1), jnp.floating):
    raise ValueError(f"z_1 has dtype {jnp.result_type(z_1)}: the samplers start from float noise "
                     "z_1 ~ N(0, I), e.g. jax.random.normal(rng, (B, H, W, C)).")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1.")
  schedules.check_increasing(gamma_fn)

  def body(k, carry):
    z, key = carry
    i = num_steps - k
    sub = None
    if key is not None:
      key, sub = jax.random.split(key)
    return step(z, i / num_steps, (i - 1) / num_steps, sub), key

  z, _ = jax.lax.fori_loop(0, num_steps, body, (z_1, rng))
  return z


def eps_at(eps_fn: EpsFn, z: jax.Array, gamma: jax.Array) -> jax.Array:
  """ε̂(z; γ) with one scalar γ for the whole batch z (as :func:`vdm.elbo.denoise` computes it)."""
  return denoise(eps_fn, z, jnp.full((z.shape[0],), gamma, jnp.float32))


def _needs_rng(rng: Optional[jax.Array], what: str) -> None:
  if rng is None:
    raise ValueError(f"{what} draws noise: pass rng (a jax.random key).")


def ddim(eps_fn: EpsFn, gamma_fn: GammaFn, z_1: jax.Array, num_steps: int,
         rng: Optional[jax.Array] = None, eta: float = 0.0) -> jax.Array:
  """DDIM with stochasticity η ∈ [0, 1], from x̂ = (z_t − σ_t ε̂)/α_t:

  z_s = α_s x̂ + σ_s sqrt(1 − η² c) ε̂ + η σ_s sqrt(c) ξ,  c = 1 − e^{γ_s − γ_t},

  where σ²_s c is the variance of the posterior q(z_s|z_t, x). η = 0 is deterministic DDIM; η = 1
  is ancestral sampling of p(z_s|z_t) = q(z_s|z_t, x = x̂) (:func:`ancestral`).
  """
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta={eta!r} must be in [0, 1] (0: deterministic DDIM, 1: ancestral).")
  if eta:
    _needs_rng(rng, f"ddim with eta={eta}")

  def step(z, t, s, key):
    g_t, g_s = gamma_fn(t), gamma_fn(s)
    sigma_t, sigma_s = jnp.sqrt(schedules.sigma2(g_t)), jnp.sqrt(schedules.sigma2(g_s))
    eps_hat = eps_at(eps_fn, z, g_t)
    # 1 − η² c = (1 − η²) + η² e^{γ_s − γ_t}: no cancellation at η = 1 and a large step.
    kept = jnp.sqrt((1.0 - eta**2) + eta**2 * jnp.exp(g_s - g_t))
    z_s = schedules.alpha_ratio(g_s, g_t) * (z - sigma_t * eps_hat) + sigma_s * kept * eps_hat
    if not eta:
      return z_s
    c = -jnp.expm1(g_s - g_t)
    return z_s + eta * sigma_s * jnp.sqrt(c) * jax.random.normal(key, z.shape, z.dtype)

  return reverse_loop(step, gamma_fn, z_1, num_steps, rng if eta else None)


def ancestral(eps_fn: EpsFn, gamma_fn: GammaFn, z_1: jax.Array, num_steps: int,
              rng: Optional[jax.Array] = None) -> jax.Array:
  """Ancestral sampling of p(z_s|z_t) = q(z_s|z_t, x = x̂_θ(z_t)) (DDPM's): :func:`ddim` with
  η = 1, z_s = (α_s/α_t)(z_t − c σ_t ε̂) + σ_s sqrt(c) ξ."""
  _needs_rng(rng, "ancestral")
  return ddim(eps_fn, gamma_fn, z_1, num_steps, rng, eta=1.0)


def vp_drift(eps_fn: EpsFn, gamma_fn: GammaFn, z: jax.Array, t, score_scale: float) -> tuple[jax.Array, jax.Array]:
  """(dz/dt, β_t) of the VP-SDE's reverse dynamics, dz = [−½β z + k β ε̂/σ] dt.

  Forward SDE: dz = −½β_t z dt + sqrt(β_t) dw with β_t = γ'(t) σ²_t; score ∇log p_t = −ε̂/σ_t.
  k = 1 gives the reverse SDE's drift, k = ½ the probability-flow ODE.
  """
  g, dg = jax.jvp(gamma_fn, (jnp.asarray(t, jnp.float32),), (jnp.ones((), jnp.float32),))
  beta = dg * schedules.sigma2(g)
  sigma = jnp.sqrt(schedules.sigma2(g))
  return -0.5 * beta * z + score_scale * beta / sigma * eps_at(eps_fn, z, g), beta


def euler_maruyama(eps_fn: EpsFn, gamma_fn: GammaFn, z_1: jax.Array, num_steps: int,
                   rng: Optional[jax.Array] = None) -> jax.Array:
  """Euler–Maruyama on the reverse VP-SDE dz = [−½β z + β ε̂/σ] dt + sqrt(β) dw̄, t: 1 → 0."""
  _needs_rng(rng, "euler_maruyama")

  def step(z, t, s, key):
    drift, beta = vp_drift(eps_fn, gamma_fn, z, t, 1.0)
    dt = t - s
    return z - drift * dt + jnp.sqrt(beta * dt) * jax.random.normal(key, z.shape, z.dtype)

  return reverse_loop(step, gamma_fn, z_1, num_steps, rng)


def probability_flow(eps_fn: EpsFn, gamma_fn: GammaFn, z_1: jax.Array, num_steps: int,
                     rng: Optional[jax.Array] = None) -> jax.Array:
  """Heun's method on the probability-flow ODE dz/dt = −½β_t (z − ε̂/σ_t), t: 1 → 0 (``rng`` is
  not used: the signature is :data:`Sampler`'s)."""

  def step(z, t, s, key):
    d_t, _ = vp_drift(eps_fn, gamma_fn, z, t, 0.5)
    z_euler = z - (t - s) * d_t
    d_s, _ = vp_drift(eps_fn, gamma_fn, z_euler, s, 0.5)
    return z - 0.5 * (t - s) * (d_t + d_s)

  return reverse_loop(step, gamma_fn, z_1, num_steps)


# sampler(eps_fn, gamma_fn, z_1, num_steps, rng) -> z_0; rng may be None for the deterministic ones.
Sampler = Callable[[EpsFn, GammaFn, jax.Array, int, Optional[jax.Array]], jax.Array]
SAMPLERS: dict[str, Sampler] = {"ancestral": ancestral, "ddim": ddim,
                                "euler_maruyama": euler_maruyama,
                                "probability_flow": probability_flow}


def decode(z_0: jax.Array, gamma_0: jax.Array, *, vocab_size: int = 256,
           rng: Optional[jax.Array] = None, decoder: str = "vdm",
           x_hat: Optional[jax.Array] = None) -> jax.Array:
  """Integers x from the decoder p(x|z_0) (:func:`vdm.elbo.decoder_log_probs`): a sample with rng;
  without, the value whose bin holds the decoder's centre, ⌊(c + 1) V/2⌋ clipped to [0, V) with
  c = z_0/α_0 ("vdm": the decoder's argmax) or c = ``x_hat`` = x̂_0 ("discretized_gaussian",
  from :func:`vdm.elbo.decoder_x_hat`: DDPM's noiseless output; that decoder's argmax would be an
  open-ended edge bin instead of values 1 and V − 2 once e^{γ_0/2} exceeds ≈ 1.2 bins)."""
  check_vocab_size(vocab_size)
  check_decoder(decoder, x_hat, reads_x_hat=True)
  if rng is not None:
    logits = decoder_log_probs(z_0, gamma_0, vocab_size, decoder, x_hat)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  centre = decoder_centre(z_0, gamma_0, x_hat)
  return jnp.clip(jnp.floor((centre + 1.0) * vocab_size / 2), 0, vocab_size - 1).astype(jnp.int32)
