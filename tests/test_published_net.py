"""ScoreUNet computes the published VDM denoiser (google-research/vdm, model_vdm.py, unconditional).

The reference below is written from the paper's architecture as plain Flax modules, one per
block, with no scans, splits, fused norms or mixed precision: ε̂ = z + conv_out(swish(GN(h))),
h from conv_in([z, Fourier features of z]) through n_layer ResNet (+ attention) blocks down, a
middle of block, attention, block, and n_layer + 1 blocks up, each reading the concatenation of
h and the newest unread skip. The conditioning is the sinusoidal embedding of
1000 (γ − γ_min)/(γ_max − γ_min) through two swish Dense layers (the published dense0 also reads
a conditioning scalar, zero for unconditional models, which ScoreUNet leaves out), added after
each block's first convolution. ScoreUNet's parameters are carried over name by name (its
scanned blocks unstacked), so any difference in wiring, skips, embedding or Fourier features
shows as a different output.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.nets import ScoreUNet

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def _embedding(t: jax.Array, dim: int) -> jax.Array:
  """[sin(1000 t ω_k), cos(1000 t ω_k)], ω_k = 10000^(−k/(dim/2 − 1))."""
  half = dim // 2
  omega = jnp.exp(-np.log(10000.0) * jnp.arange(half) / (half - 1))
  angle = 1000.0 * t[:, None] * omega
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=1)


def _fourier(z: jax.Array) -> jax.Array:
  """sin and cos of 2π 2^n z for n = 6, 7; channel c's two frequencies side by side."""
  w = jnp.tile(2.0 * np.pi * 2.0 ** jnp.arange(6, 8), z.shape[-1])
  h = jnp.repeat(z, 2, axis=-1) * w
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  b, hh, ww, c = q.shape
  q, k, v = (a.reshape(b, hh * ww, c) for a in (q, k, v))
  weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q / np.sqrt(c), k, precision="highest"))
  return jnp.einsum("bqk,bkc->bqc", weights, v, precision="highest").reshape(b, hh, ww, c)


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, cond):
    h = nn.Conv(self.features, (3, 3), name="conv1")(nn.swish(nn.GroupNorm(name="norm1")(x)))
    h = h + nn.Dense(self.features, use_bias=False, name="cond_proj")(cond)[:, None, None]
    h = nn.Conv(self.features, (3, 3), name="conv2")(nn.swish(nn.GroupNorm(name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, name="nin_shortcut")(x)
    return x + h


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.GroupNorm(name="norm")(x)
    q, k, v = (nn.Dense(x.shape[-1], name=n)(h) for n in "qkv")
    return x + nn.Dense(x.shape[-1], name="proj_out")(_attention(q, k, v))


class Published(nn.Module):
  n_embd: int
  n_layer: int
  attention: bool

  @nn.compact
  def __call__(self, z, gamma):
    cond = _embedding((gamma - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN), self.n_embd)
    cond = nn.swish(nn.Dense(4 * self.n_embd, name="dense0")(cond))
    cond = nn.swish(nn.Dense(4 * self.n_embd, name="dense1")(cond))
    skips = [nn.Conv(self.n_embd, (3, 3), name="conv_in")(jnp.concatenate([z, _fourier(z)], -1))]
    for i in range(self.n_layer):
      h = Block(self.n_embd, name=f"down_{i}")(skips[-1], cond)
      skips.append(Attention(name=f"down_attn_{i}")(h) if self.attention else h)
    h = Block(self.n_embd, name="mid_1")(skips[-1], cond)
    h = Block(self.n_embd, name="mid_2")(Attention(name="mid_attn")(h), cond)
    for i in range(self.n_layer + 1):
      h = Block(self.n_embd, name=f"up_{i}")(jnp.concatenate([h, skips.pop()], -1), cond)
      h = Attention(name=f"up_attn_{i}")(h) if self.attention else h
    assert not skips
    h = nn.swish(nn.GroupNorm(name="norm_out")(h))
    return z + nn.Conv(z.shape[-1], (3, 3), name="conv_out")(h)


def _carried_over(p: dict, n_layer: int, attention: bool) -> dict:
  """ScoreUNet's parameters under the reference's names. Its blocks of equal shape are stacked
  for a scan (down_0_0: the n_layer blocks down; up_0_0: the first n_layer up, stored in reverse
  order of execution; up_0_1: the last up), each block's attention under "attn"."""
  out = {k: p[k] for k in ("dense0", "dense1", "conv_in", "norm_out", "conv_out")}

  def put(name, block, attn_name):
    out[name] = {k: v for k, v in block.items() if k != "attn"}
    if attn_name:
      out[attn_name] = block["attn"]

  layer = lambda stack, i: jax.tree.map(lambda a: a[i], stack)
  for i in range(n_layer):
    put(f"down_{i}", layer(p["down_0_0"], i), attention and f"down_attn_{i}")
    put(f"up_{i}", layer(p["up_0_0"], n_layer - 1 - i), attention and f"up_attn_{i}")
  put(f"up_{n_layer}", p["up_0_1"], attention and f"up_attn_{n_layer}")
  put("mid_1", p["mid_1_0"], "mid_attn")
  put("mid_2", p["mid_2_0"], None)
  return out


@pytest.mark.parametrize("attention", [False, True])
def test_score_unet_is_the_published_denoiser(attention):
  n_embd, n_layer = 64, 2
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  gamma = jnp.array([-12.0, 4.0])
  net = ScoreUNet(n_embd=n_embd, n_layer=n_layer, attention=attention, unroll=1)
  params = net.init(jax.random.PRNGKey(1), z, gamma)
  # Away from the zero initialisation of conv_out, cond_proj, conv2 and proj_out, which would
  # hide most of the network.
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.05 * noise.standard_normal(a.shape, np.float32), params)
  reference = Published(n_embd, n_layer, attention)
  carried = _carried_over(params["params"], n_layer, attention)
  expected_shapes = jax.eval_shape(reference.init, jax.random.PRNGKey(0), z, gamma)["params"]
  assert jax.tree.map(jnp.shape, carried) == jax.tree.map(jnp.shape, expected_shapes)

  ours = net.apply(params, z, gamma) - z
  theirs = reference.apply({"params": carried}, z, gamma) - z
  assert float(jnp.linalg.norm(theirs)) > 1.0  # the network's part is not negligible
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * float(jnp.abs(theirs).max()))
