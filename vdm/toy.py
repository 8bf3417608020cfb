"""Data distributions with known densities and their Bayes-optimal denoisers.

Used by the tests, the likelihood checks and the notebooks: with the optimal ε̂ the ELBO and
the samplers can be compared against exact answers.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdm import schedules
from vdm.elbo import EpsFn, scale_data


@dataclasses.dataclass(frozen=True)
class FactorizedDiscrete:
  """x_i ~ Categorical(probs[i]) independently per dimension, x_i ∈ {0..V−1}; probs: [D, V]."""
  probs: np.ndarray

  @classmethod
  def random(cls, seed: int, dims: int, vocab_size: int, concentration: float = 0.5) -> "FactorizedDiscrete":
    """A Dirichlet(concentration) draw per dimension."""
    probs = np.random.default_rng(seed).dirichlet(np.full(vocab_size, concentration), size=dims)
    return cls(np.maximum(probs, 1e-12) / np.maximum(probs, 1e-12).sum(-1, keepdims=True))

  @property
  def vocab_size(self) -> int:
    return self.probs.shape[1]

  @property
  def dims(self) -> int:
    return self.probs.shape[0]

  def entropy_bits_per_dim(self) -> float:
    """H(x)/D in bits: −(1/D) Σ_i Σ_v p_iv log2 p_iv."""
    p = self.probs
    return float(-(p * np.log2(p)).sum() / self.dims)

  def sample(self, rng: jax.Array, n: int) -> jax.Array:
    """n samples, shape [n, D], int32."""
    return jax.random.categorical(rng, jnp.log(jnp.asarray(self.probs, jnp.float32)), shape=(n, self.dims))

  def eps_fn(self) -> EpsFn:
    """The Bayes-optimal ε̂(z_t; γ_t) = (z_t − α_t E[x|z_t]) / σ_t, exact per dimension:
    E[x_i|z_t] = Σ_v x_v p_iv N(z_i; α_t x_v, σ²_t) / Σ_v p_iv N(z_i; α_t x_v, σ²_t)."""
    log_p = jnp.log(jnp.asarray(self.probs, jnp.float32))
    x_v = scale_data(jnp.arange(self.vocab_size), self.vocab_size)

    def eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
      g = gamma.reshape((-1,) + (1,) * (z.ndim - 1))
      alpha, sigma = schedules.alpha_sigma(g)
      logits = log_p - 0.5 * ((z[..., None] - alpha[..., None] * x_v) / sigma[..., None]) ** 2
      x_hat = jnp.sum(jax.nn.softmax(logits, axis=-1) * x_v, axis=-1)
      return (z - alpha * x_hat) / sigma

    return eps_fn


@dataclasses.dataclass(frozen=True)
class Gaussian:
  """Continuous data y ~ N(mean, R diag(scales²) Rᵀ) in R^D; rotation R: [D, D] orthogonal (None = I).

  Everything about its diffusion is Gaussian and exact. With z_t = α_t y + σ_t ε:
    q(z_t) = N(α_t μ, C_t),  C_t = α²_t Σ + σ²_t I = R diag(α²_t s² + σ²_t) Rᵀ,
    E[ε | z_t] = Cov(ε, z_t) C_t⁻¹ (z_t − α_t μ) = σ_t C_t⁻¹ (z_t − α_t μ),
  so the optimal ε̂ is linear in z_t, equals −σ_t ∇ log q(z_t), and its Jacobian σ_t C_t⁻¹ is
  diagonal only when R = I (a rotation makes Hutchinson's trace estimator non-trivial).
  """
  mean: np.ndarray
  scales: np.ndarray
  rotation: Optional[np.ndarray] = None

  @classmethod
  def random(cls, seed: int, dims: int, rotate: bool = True) -> "Gaussian":
    """μ ~ U(−0.5, 0.5), s ~ U(0.1, 0.5), and a uniformly random rotation when ``rotate``."""
    r = np.random.default_rng(seed)
    rotation = None
    if rotate:
      q, upper = np.linalg.qr(r.normal(size=(dims, dims)))
      rotation = q * np.sign(np.diag(upper))
    return cls(r.uniform(-0.5, 0.5, dims), r.uniform(0.1, 0.5, dims), rotation)

  @property
  def dims(self) -> int:
    return self.mean.shape[0]

  def _rotation(self) -> jax.Array:
    return jnp.eye(self.dims) if self.rotation is None else jnp.asarray(self.rotation, jnp.float32)

  def _variances(self, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(α_t [B, 1], eigenvalues α²_t s² + σ²_t of C_t [B, D]) for γ of shape [B]."""
    g = jnp.asarray(gamma, jnp.float32).reshape(-1, 1)
    s2 = jnp.asarray(self.scales, jnp.float32) ** 2
    return jnp.sqrt(schedules.alpha2(g)), schedules.alpha2(g) * s2 + schedules.sigma2(g)

  def sample(self, rng: jax.Array, n: int) -> jax.Array:
    """n clean samples y, shape [n, D], float32."""
    w = jax.random.normal(rng, (n, self.dims)) * jnp.asarray(self.scales, jnp.float32)
    return jnp.asarray(self.mean, jnp.float32) + w @ self._rotation().T

  def log_prob(self, z: jax.Array, gamma: jax.Array) -> jax.Array:
    """log q(z_t) = log N(z_t; α_t μ, C_t) per example, for z [B, D] and γ_t of shape [B] or ()."""
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), z.shape[:1])
    alpha, var = self._variances(gamma)
    w = (z - alpha * jnp.asarray(self.mean, jnp.float32)) @ self._rotation()  # Rᵀ(z − α μ)
    return -0.5 * jnp.sum(w**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)

  def flow(self, z: jax.Array, gamma_from: float, gamma_to: float) -> jax.Array:
    """The probability-flow ODE's exact map of z [B, D] from γ_from to γ_to, linear for Gaussian
    data: z ↦ α_to μ + R diag(sqrt(v_to / v_from)) Rᵀ (z − α_from μ), v = α² s² + σ² (C_t's
    eigenvalues)."""
    (alpha_from, alpha_to), (v_from, v_to) = self._variances(jnp.array([gamma_from, gamma_to]))
    rot, mu = self._rotation(), jnp.asarray(self.mean, jnp.float32)
    return alpha_to * mu + ((z - alpha_from * mu) @ rot * jnp.sqrt(v_to / v_from)) @ rot.T

  def eps_fn(self) -> EpsFn:
    """The optimal ε̂(z_t; γ_t) = σ_t C_t⁻¹ (z_t − α_t μ), for z [B, D] and γ_t [B]."""
    rot = self._rotation()
    mu = jnp.asarray(self.mean, jnp.float32)

    def eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
      alpha, var = self._variances(gamma)
      sigma = jnp.sqrt(schedules.sigma2(jnp.asarray(gamma, jnp.float32).reshape(-1, 1)))
      return sigma * (((z - alpha * mu) @ rot) / var) @ rot.T

    return eps_fn
