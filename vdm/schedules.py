"""Noise schedules γ(t): the log noise-to-signal ratio, increasing in t ∈ [0, 1].

σ²_t = sigmoid(γ_t), α²_t = sigmoid(−γ_t), so SNR(t) = α²_t / σ²_t = exp(−γ_t).

A schedule is any callable ``gamma_fn(t) -> gamma`` that is vectorised over t and
differentiable (the continuous-time loss needs dγ/dt through ``jax.jvp``). Fixed
schedules are plain closures; learned schedules are Flax modules, and
``lambda t: module.apply(params, t)`` (or :func:`bind`) is their ``gamma_fn``.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GammaFn = Callable[[jax.Array], jax.Array]

GAMMA_MIN = -13.3
GAMMA_MAX = 5.0


# At γ = −30, σ_t = 3e-7 is five of float32's spacings of α_t x (6e-8 near |x| = 1), and below
# γ ≈ −33 under one: z_t rounds σ_t ε coarsely, then away; no denoiser can recover ε exactly, and
# the diffusion loss gains up to ½γ′ per dimension for nothing.
# With the exact denoiser of 8-bit data, γ_min = −30 inflates the bound by 0.0013 bits/dim, −32 by
# 0.01, −36 by 0.47, −80 by 32 (experiments/RESULTS.md, forty-ninth session).
GAMMA_MIN_FLOOR = -30.0


def check_endpoints(gamma_min: float, gamma_max: float, prefix: str = "") -> None:
  """Refuse non-finite endpoints, γ_min ≥ γ_max or γ_min < GAMMA_MIN_FLOOR, naming the keys as
  ``prefix`` + ``gamma_min``."""
  for key, value in (("gamma_min", gamma_min), ("gamma_max", gamma_max)):
    if not math.isfinite(value):
      raise ValueError(f"{prefix}{key}={value} must be finite: γ's endpoints are log noise-to-signal "
                       "ratios (the paper uses -13.3 and 5).")
  if not gamma_min < gamma_max:
    raise ValueError(
        f"{prefix}gamma_min={gamma_min} must be < {prefix}gamma_max={gamma_max}: γ(t) is the log "
        "noise-to-signal ratio and must increase from t=0 to t=1; swap or fix them.")
  if gamma_min < GAMMA_MIN_FLOOR:
    raise ValueError(
        f"{prefix}gamma_min={gamma_min} is below {GAMMA_MIN_FLOOR:g}: float32's "
        "z_t = α_t x + σ_t ε rounds σ_t ε coarsely or away there, which inflates the bound; raise "
        "it (the paper uses -13.3).")


def sigma2(gamma: jax.Array) -> jax.Array:
  """σ²_t = sigmoid(γ_t)."""
  return jax.nn.sigmoid(gamma)


def alpha2(gamma: jax.Array) -> jax.Array:
  """α²_t = sigmoid(−γ_t)."""
  return jax.nn.sigmoid(-gamma)


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(α_t, σ_t) = (sqrt(sigmoid(−γ_t)), sqrt(sigmoid(γ_t)))."""
  return jnp.sqrt(alpha2(gamma)), jnp.sqrt(sigma2(gamma))


def alpha_ratio(gamma_s: jax.Array, gamma_t: jax.Array) -> jax.Array:
  """α_s/α_t = exp(½(log sigmoid(−γ_s) − log sigmoid(−γ_t))), in log space: α_t itself underflows
  float32 to 0 once γ_t exceeds ≈ 88.7, where α_s/α_t stays finite."""
  return jnp.exp(0.5 * (jax.nn.log_sigmoid(-gamma_s) - jax.nn.log_sigmoid(-gamma_t)))


def fixed_linear(gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> GammaFn:
  """γ(t) = γ_min + (γ_max − γ_min) t."""
  check_endpoints(gamma_min, gamma_max)

  def gamma_fn(t: jax.Array) -> jax.Array:
    return gamma_min + (gamma_max - gamma_min) * jnp.asarray(t, jnp.float32)

  return gamma_fn


class LearnedLinear(nn.Module):
  """γ(t) = b + |w| t with b = γ_min, |w| = γ_max − γ_min learned (monotone by construction)."""
  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX

  def __post_init__(self):
    check_endpoints(self.gamma_min, self.gamma_max)
    super().__post_init__()

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    b = self.param("b", nn.initializers.constant(self.gamma_min), ())
    w = self.param("w", nn.initializers.constant(self.gamma_max - self.gamma_min), ())
    return b + jnp.abs(w) * jnp.asarray(t, jnp.float32)


class _DenseMonotone(nn.Module):
  """Dense layer with non-negative weights |W|, hence monotone non-decreasing."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.normal(1.0), (h.shape[-1], self.features))
    y = h @ jnp.abs(kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class LearnedMonotone(nn.Module):
  """The paper's monotone network, with explicit endpoints.

  f(t) = l1(t) + l3(φ(l2(2t − 1))) / n_features, φ(h) = 2 sigmoid(h) − 1, all weights |W| ≥ 0;
  s(t) = (f(t) − f(0)) / (f(1) − f(0)), γ(t) = γ_min (1 − s(t)) + γ_max s(t).

  γ(0) = γ_min and γ(1) = γ_max exactly, as trainable parameters, while the network
  only shapes γ in between (and so only the variance of the continuous-time loss). The shape
  is non-decreasing by construction, and γ increasing whatever the parameters: endpoints that
  cross (γ_max < γ_min) act as γ_max' = 2γ_min − γ_max, as LearnedLinear's |w| does, where they
  would give a decreasing γ and a negative diffusion loss.
  """
  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX
  n_features: int = 1024

  def __post_init__(self):
    check_endpoints(self.gamma_min, self.gamma_max)
    super().__post_init__()

  def setup(self):
    self.endpoint_min = self.param("gamma_min", nn.initializers.constant(self.gamma_min), ())
    self.endpoint_max = self.param("gamma_max", nn.initializers.constant(self.gamma_max), ())
    self.l1 = _DenseMonotone(1)
    self.l2 = _DenseMonotone(self.n_features)
    self.l3 = _DenseMonotone(1, use_bias=False)

  def shape(self, t: jax.Array) -> jax.Array:
    """The monotone network f(t), for t of any shape."""
    h = jnp.asarray(t, jnp.float32)[..., None]
    u = 2.0 * jax.nn.sigmoid(self.l2(2.0 * (h - 0.5))) - 1.0
    return (self.l1(h) + self.l3(u) / self.n_features)[..., 0]

  def __call__(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    f = self.shape(jnp.concatenate([jnp.zeros((1,)), jnp.ones((1,)), t.reshape(-1)]))
    s = (f[2:] - f[0]) / (f[1] - f[0])
    top = jnp.maximum(self.endpoint_max, 2 * self.endpoint_min - self.endpoint_max)
    return (self.endpoint_min * (1 - s) + top * s).reshape(t.shape)


def bind(module: nn.Module, params) -> GammaFn:
  """The ``gamma_fn`` of a learned schedule: t ↦ module.apply(params, t)."""
  return lambda t: module.apply(params, t)


def _interpolated(log_snr_inv: np.ndarray) -> GammaFn:
  """γ(t) by linear interpolation of grid values γ_i at t_i = i / (len − 1)."""
  grid = jnp.asarray(log_snr_inv, jnp.float32)
  ts = jnp.linspace(0.0, 1.0, grid.shape[0])

  def gamma_fn(t: jax.Array) -> jax.Array:
    return jnp.interp(jnp.asarray(t, jnp.float32), ts, grid)

  return gamma_fn


def ddpm_betas(kind: str = "linear", num_steps: int = 1000, *, beta_start: float = 1e-4,
               beta_end: float = 0.02, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """DDPM's β_1..β_T: 'linear' (Ho et al. 2020) or 'cosine' (Nichol & Dhariwal 2021).

  cosine: ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ + s)/(1 + s) · π/2), β_i = min(1 − ᾱ(i/T)/ᾱ((i−1)/T), max_beta).
  """
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps} must be >= 2 for a DDPM schedule.")
  if kind == "linear":
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  if kind == "cosine":
    tau = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)
  raise ValueError(f"unknown DDPM schedule kind {kind!r}: use 'linear' or 'cosine'.")


def ddpm(kind: str = "linear", num_steps: int = 1000, **kwargs) -> GammaFn:
  """A DDPM β schedule as γ(t), exact at its grid: γ(t_i) = log((1 − ᾱ_i)/ᾱ_i), ᾱ_i = Π_{j≤i}(1 − β_j).

  DDPM's latents x_1..x_T sit at t_i = (i − 1)/(T − 1), so z_0 = x_1 (DDPM's decoder
  p(x_0|x_1) is VDM's L_0) and the discrete-time loss with T − 1 steps is DDPM's
  L_1..L_{T−1} exactly; γ is linear in t between grid points.
  """
  betas = ddpm_betas(kind, num_steps, **kwargs)
  neg_log_alpha_bar = -np.cumsum(np.log1p(-betas))
  return _interpolated(np.log(np.expm1(neg_log_alpha_bar)))


def check_increasing(gamma_fn: GammaFn, num_points: int = 257) -> None:
  """Raise ValueError if a concrete γ(t) is not strictly increasing on a grid of [0, 1].

  Schedules whose values are traced (learned schedules inside ``jit``) are not checked here;
  the evaluation entry points call this on the host, before compiling.
  """
  with jax.ensure_compile_time_eval():
    g = gamma_fn(jnp.linspace(0.0, 1.0, num_points))
  try:
    g = np.asarray(g)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if g.shape != (num_points,):
    raise ValueError(f"gamma_fn maps t of shape ({num_points},) to shape {g.shape}: it must be "
                     "vectorised elementwise over t.")
  if not np.all(np.isfinite(g)):
    bad = np.flatnonzero(~np.isfinite(g)) / (num_points - 1)
    raise ValueError(f"gamma_fn gives non-finite γ(t) at t in [{bad.min():.4f}, {bad.max():.4f}]: "
                     "map [0, 1] into times where it is finite, e.g. γ(t_0 + (t_1 − t_0) t), not by "
                     "clipping γ, which leaves it flat.")
  if not np.all(np.diff(g) > 0):
    i = int(np.argmin(np.diff(g)))
    raise ValueError(f"gamma_fn is not increasing: γ({i / (num_points - 1):.4f})={g[i]:.4g} >= "
                     f"γ({(i + 1) / (num_points - 1):.4f})={g[i + 1]:.4g}; γ must rise from "
                     "t=0 (data) to t=1 (noise).")
