"""Data distributions with known densities and their Bayes-optimal denoisers.

Used by the tests, the likelihood checks and the notebooks: with the optimal ε̂ the ELBO and
the samplers can be compared against exact answers.
"""
from __future__ import annotations

import dataclasses

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

