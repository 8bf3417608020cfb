"""The VDM score network: a U-Net ε̂(z_t; γ_t) with a base measure, ε̂ = z_t + f(z_t, γ_t).

The architecture is the one of the paper's CIFAR-10 model (Kingma et al. 2021, App. B):
Fourier features of z as extra input channels, a sinusoidal embedding of the rescaled
γ_t fed through a 2-layer MLP and added to every ResNet block, `n_layer` ResNet blocks on
the way down (storing their outputs), a middle ResNet–attention–ResNet, `n_layer + 1`
ResNet blocks on the way up that concatenate the stored activations, and a zero-initialised
output convolution. With ``channel_mult=(1,)`` the net works at one resolution (the paper's
CIFAR-10 model, 30.58 M parameters); longer tuples add resolutions, halving H and W between
levels, as in DDPM's U-Net.

Runs of identical blocks (the same input and skip shapes) are one ``nn.scan`` over stacked
parameters, so the compiled program holds ``unroll`` copies of each kind of block (all 67 blocks
of the CIFAR-10 net only with ``unroll=0``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike

from vdm import pallas_conv, pallas_norm
from vdm.schedules import GAMMA_MAX, GAMMA_MIN

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a ResNet block keeps for the backward pass: everything ("none": no rematerialisation), its
# two convolutions' outputs ("convs": norms, activations and dropout are recomputed, convolutions
# are not), or its input alone ("full": the whole block is recomputed, convolutions included).
# (Also keeping the convolutions' inputs and the dropout mask was slower on the H100 than
# "convs": each saved tensor is one more copy into the scan's stacked residuals; RESULTS.md.)
REMAT = {"none": None, "convs": jax.checkpoint_policies.save_only_these_names("conv"),
         "full": jax.checkpoint_policies.nothing_saveable}
# How the GroupNorm + swish pairs are computed and differentiated: "autodiff" (flax's GroupNorm
# and JAX's derivatives, which ask to keep 14 bytes of fp32 and bf16 intermediates per element for
# the backward pass; XLA's fusions may recompute some), "recompute" (:func:`group_norm_swish`:
# only the inputs and the group statistics are kept; for remat="none", since a rematerialised
# block recomputes its norms anyway) or "pallas" (:func:`vdm.pallas_norm.group_norm_swish`: the
# same arithmetic as fused Triton kernels that read each input once, forward and backward; no
# forward-mode derivative), or "pallas_conv" (a ResNet block's two norms applied inside the 3×3
# convolutions that read them, :func:`group_norm_swish_conv`, so that their outputs are never
# written; differentiated by recomputing the XLA rule; the other norms as "pallas"). Which is
# fastest on a GPU is for `speed_sweep.py` to measure.
NORM_IMPL = ("autodiff", "recompute", "pallas", "pallas_conv")


def timestep_embedding(t: jax.Array, dim: int, scale: float = 1000.0) -> jax.Array:
  """Sinusoidal embedding [sin(s t ω_k), cos(s t ω_k)], ω_k = 10000^(−k/(⌊dim/2⌋ − 1)), in fp32.

  t: [B] in [0, 1], scaled by `scale` (1000, as in DDPM's integer timesteps). Returns [B, dim];
  an odd dim gets one zero column.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = scale * jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_features(z: jax.Array, exponents: Sequence[int] = (6, 7)) -> jax.Array:
  """sin and cos of z · 2^n · 2π for each n, in fp32: [..., C] -> [..., 2 C len(exponents)].

  High frequencies let the net resolve the fine (8-bit) structure of z at small noise levels.
  """
  freqs = 2.0 * jnp.pi * 2.0 ** jnp.asarray(exponents, jnp.float32)
  h = (jnp.asarray(z, jnp.float32)[..., None] * freqs).reshape(z.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def _grouped(parts: Sequence[jax.Array], shift: Optional[jax.Array], groups: int) -> jax.Array:
  """v = concat(parts) + shift[:, None, None, :] in fp32, as groups [B, H, W, G, C/G]."""
  v = jnp.concatenate([jnp.asarray(p, jnp.float32) for p in parts], axis=-1)
  if shift is not None:
    v = v + shift[:, None, None, :]
  return v.reshape(v.shape[:-1] + (groups, v.shape[-1] // groups))


def _group_mean(v: jax.Array) -> jax.Array:
  """The mean over H, W and each group's channels of grouped v: [B, 1, 1, G, 1]."""
  return v.mean(axis=(1, 2, 4), keepdims=True)


def _ungrouped(v: jax.Array) -> jax.Array:
  return v.reshape(v.shape[:3] + (-1,))


def _statistics(v: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(μ_g, r_g) [B, 1, 1, G, 1] of grouped v, r_g = 1/√(E[(v − μ_g)²] + ε), in one pass over
  u = v − k_g, k_g the group's first value: E[u²] − E[u]² loses no digits to a mean large next to
  the group's spread, where E[v²] − μ_g² (flax's fast variance) would lose them all at μ/σ ≈ 10³."""
  first = jax.lax.stop_gradient(v[:, :1, :1, :, :1])
  u = v - first
  mean_u = _group_mean(u)
  var = jnp.maximum(_group_mean(u * u) - mean_u * mean_u, 0.0)
  return mean_u + first, jax.lax.rsqrt(var + epsilon)


def centred(x: jax.Array, groups: int) -> jax.Array:
  """x [B, H, W, C] in fp32 less each group's first value (no gradient): the same GroupNorm, whose
  fast variance E[x²] − E[x]² then cancels no digits (:func:`_statistics`)."""
  v = jnp.asarray(x, jnp.float32).reshape(x.shape[:3] + (groups, -1))
  return _ungrouped(v - jax.lax.stop_gradient(v[:, :1, :1, :, :1]))


def group_statistics(parts: Sequence[jax.Array], shift: Optional[jax.Array], groups: int,
                     epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(μ_g, r_g) of :func:`group_norm_swish`, per channel [B, C] (each channel's group's)."""
  v = _grouped(parts, shift, groups)
  per_channel = lambda s: _ungrouped(jnp.broadcast_to(s, v.shape))[:, 0, 0]  # noqa: E731
  return tuple(per_channel(s) for s in _statistics(v, epsilon))


def _norm_swish_forward(groups, epsilon, dtype, parts, shift, scale, bias):
  """(swish(x̂ · scale + bias) in ``dtype``, μ_g, r_g), x̂ = (v − μ_g) r_g (:func:`_statistics`)."""
  v = _grouped(parts, shift, groups)
  mean, rstd = _statistics(v, epsilon)
  return nn.swish(_ungrouped((v - mean) * rstd) * scale + bias).astype(dtype), mean, rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def group_norm_swish(groups: int, epsilon: float, dtype: DTypeLike, parts: Sequence[jax.Array],
                     shift: Optional[jax.Array], scale: jax.Array, bias: jax.Array) -> jax.Array:
  """swish(y), y = x̂ · scale + bias, x̂ = (v − μ_g) / √(σ²_g + ε), v = concat(parts) + shift
  (μ_g, σ²_g over H, W and each of the ``groups`` groups of channels), in fp32, rounded to
  ``dtype`` once.

  Its derivative is written out so that differentiating it keeps only its inputs and the group
  statistics: x̂, y and sigmoid(y) are recomputed from them, where autodiff of the same
  arithmetic keeps v − μ_g, v², y and the swish's intermediates. Forward mode (the ODE
  likelihood's ``jax.linearize``) uses the rule as it is; reverse mode transposes it.
  """
  return _norm_swish_forward(groups, epsilon, dtype, parts, shift, scale, bias)[0]


@group_norm_swish.defjvp
def _group_norm_swish_jvp(groups, epsilon, dtype, primals, tangents):
  """d x̂ = r_g (dv − mean_g(dv) − x̂ mean_g(x̂ dv)), dy = d x̂ · scale + x̂ · dscale + dbias,
  d swish(y) = dy (s + y s (1 − s)), s = sigmoid(y). The tangent map is a ``jax.checkpoint``,
  so reverse mode keeps its inputs (the primal inputs, μ_g and r_g), not x̂ or s."""
  out, mean, rstd = _norm_swish_forward(groups, epsilon, dtype, *primals)

  @jax.checkpoint
  def tangent(parts, shift, scale, bias, mean, rstd, dparts, dshift, dscale, dbias):
    xhat = (_grouped(parts, shift, groups) - mean) * rstd
    dv = _grouped(dparts, dshift, groups)
    dxhat = _ungrouped(rstd * (dv - _group_mean(dv) - xhat * _group_mean(xhat * dv)))
    xhat = _ungrouped(xhat)
    y = xhat * scale + bias
    s = jax.nn.sigmoid(y)
    return ((dxhat * scale + xhat * dscale + dbias) * (s + y * s * (1.0 - s))).astype(dtype)

  return out, tangent(*primals, mean, rstd, *tangents)


def _norm_conv_rule(groups, epsilon, dtype, out_dtype, dropout, seeds, parts, shift, scale, bias,
                    kernel, conv_bias, residual):
  """conv3×3(dropout(group_norm_swish(...)), kernel) + conv_bias (+ residual) with XLA: the
  function of :func:`group_norm_swish_conv`, h (after dropout, rounded once) and the kernel in
  ``dtype``, their product summed in fp32."""
  h = group_norm_swish(groups, epsilon, jnp.float32, parts, shift, scale, bias)
  if dropout:
    h = jnp.where(pallas_norm.dropout_keep_mask(seeds, h.shape, dropout), h / (1.0 - dropout), 0.0)
  out = jax.lax.conv_general_dilated(h.astype(dtype), kernel.astype(dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32) + conv_bias
  return (out if residual is None else out + residual).astype(out_dtype)


def _norm_conv_fused(groups: int, epsilon: float, dtype: DTypeLike, out_dtype: DTypeLike,
                     dropout: float, seeds: Optional[jax.Array], parts: Sequence[jax.Array],
                     shift: Optional[jax.Array], scale: jax.Array, bias: jax.Array,
                     kernel: jax.Array, conv_bias: jax.Array,
                     residual: Optional[jax.Array]) -> jax.Array:
  """conv3×3(dropout(h), kernel) + conv_bias (+ residual) in ``out_dtype``, h = the
  :func:`group_norm_swish` of ``parts`` (in ``dtype``), dropout with the mask of
  :func:`vdm.pallas_norm.dropout_keep_mask` (uint32 ``seeds`` [B, 1]): the statistics by an XLA
  reduction, then :func:`vdm.pallas_conv.norm_swish_conv`, which applies the norm as it loads
  the convolution's input. Its derivative is that of the same function computed by XLA
  (:func:`_norm_conv_rule`), which recomputes h."""
  a, c = pallas_conv.norm_affine(*group_statistics(parts, shift, groups, epsilon), scale, bias,
                                 shift)
  return pallas_conv.norm_swish_conv(parts, a, c, kernel, conv_bias, residual, dropout, seeds,
                                     dtype=dtype, out_dtype=out_dtype)


group_norm_swish_conv = jax.custom_vjp(_norm_conv_fused, nondiff_argnums=(0, 1, 2, 3, 4))


def _norm_conv_forward(groups, epsilon, dtype, out_dtype, dropout, seeds, *args):
  *inputs, residual = args
  out = _norm_conv_fused(groups, epsilon, dtype, out_dtype, dropout, seeds, *args)
  # The residual's cotangent is the output's: only its dtype is kept, as an empty array.
  return out, (seeds, inputs, None if residual is None else jnp.zeros((0,), residual.dtype))


def _norm_conv_backward(groups, epsilon, dtype, out_dtype, dropout, saved, ct):
  seeds, inputs, residual = saved
  _, vjp = jax.vjp(lambda *a: _norm_conv_rule(groups, epsilon, dtype, out_dtype, dropout, seeds,
                                              *a, None), *inputs)
  return (None, *vjp(ct), None if residual is None else ct.astype(residual.dtype))


group_norm_swish_conv.defvjp(_norm_conv_forward, _norm_conv_backward)


class _Parameters(nn.Module):
  """Declares parameters (name, initialiser, shape), in order, and returns them: the parameters of
  a module whose work a fused kernel does, under that module's name."""
  specs: Sequence[tuple]

  @nn.compact
  def __call__(self) -> tuple:
    return tuple(self.param(name, init, shape) for name, init, shape in self.specs)


class GroupNormSwish(nn.Module):
  """:func:`group_norm_swish` with the parameters (names, shapes, initialisation) of
  ``nn.GroupNorm`` on the concatenation, so that checkpoints do not depend on the choice; with
  ``pallas``, :func:`vdm.pallas_norm.group_norm_swish`, which also applies dropout at rate
  ``dropout`` inside its kernels (one seed per example from the 'dropout' rng)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: DTypeLike = jnp.float32
  pallas: bool = False  # vdm.pallas_norm's fused kernels in place of the XLA rule
  dropout: float = 0.0  # only with pallas

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array], shift: Optional[jax.Array] = None) -> jax.Array:
    channels = pallas_norm.group_channels(parts, self.num_groups)
    scale = self.param("scale", nn.initializers.ones_init(), (channels,))
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
    args = (self.num_groups, self.epsilon, self.dtype, tuple(parts), shift, scale, bias)
    if not self.pallas:
      assert not self.dropout, "the XLA rule leaves dropout to nn.Dropout"
      return group_norm_swish(*args)
    return pallas_norm.group_norm_swish(
        *args, dropout=self.dropout,
        seeds=pallas_norm.dropout_seeds(self, parts[0].shape[0], self.dropout))


def norm_swish(parts: Sequence[jax.Array], shift: Optional[jax.Array], dtype: DTypeLike,
               impl: str, name: str, dropout: float = 0.0) -> jax.Array:
  """Dropout(swish(GroupNorm(concat(parts) + shift))) at rate ``dropout``, the norm as the
  submodule ``name`` of the calling module, computed as ``impl`` says (:data:`NORM_IMPL`); the
  parameters are the same. The Pallas kernels draw their own dropout masks (from the 'dropout'
  rng, as ``nn.Dropout``, but not the same masks); the others use ``nn.Dropout``."""
  if impl == "pallas":
    return GroupNormSwish(dtype=dtype, pallas=True, dropout=dropout, name=name)(parts, shift)
  if impl == "recompute":
    h = GroupNormSwish(dtype=dtype, name=name)(parts, shift)
  else:
    x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if shift is not None:
      x = x.astype(jnp.float32) + shift[:, None, None, :]
    h = nn.swish(nn.GroupNorm(dtype=dtype, name=name)(centred(x, GroupNormSwish.num_groups)))
  return nn.Dropout(dropout, deterministic=False)(h) if dropout else h


class ResnetBlock(nn.Module):
  """GroupNorm, swish, conv3x3, + cond projection, GroupNorm, swish, dropout, zero-init conv3x3,
  plus a skip (a 1×1 projection when the channel count changes); then optional self-attention.

  ``skip`` (the U-Net's stored activation) is concatenated to the input when given. Returns
  (h, skip for the way up) so that the block is also the body of an ``nn.scan``. The layers
  compute in ``dtype``; the sum x + h that leaves the block (the residual stream) is kept in
  ``residual_dtype``, its copy for the way up in ``dtype``: a skip only feeds a GroupNorm, whose
  output is rounded to ``dtype``, and a 1×1 projection computed in ``dtype``.
  ``norm_impl`` says how its GroupNorm + swish pairs are computed (:data:`NORM_IMPL`).
  """
  out_ch: int
  dropout: float
  deterministic: bool
  attention: bool = False
  dtype: DTypeLike = jnp.float32
  residual_dtype: DTypeLike = jnp.float32
  norm_impl: str = "autodiff"

  @nn.compact
  def __call__(self, x: jax.Array, skip: Optional[jax.Array], cond: jax.Array):
    # In the compute dtype: both halves only feed layers that round to it. The concatenation
    # feeds the norm, whose XLA fusions read the halves where they lie; the 1×1 shortcut takes
    # them apart, since a matrix product would need the concatenation written out (on the H100,
    # 3 ms of the 90 ms step).
    parts = (x,) if skip is None else (x.astype(self.dtype), skip.astype(self.dtype))
    dropout = 0.0 if self.deterministic else self.dropout
    # The γ conditioning is added in fp32 inside the norm that follows; in the conv's dtype XLA
    # makes it the conv's side input, a materialised [B, H, W, C] broadcast per block.
    cond_proj = nn.Dense(self.out_ch, use_bias=False, name="cond_proj",
                         kernel_init=nn.initializers.zeros)
    if sum(p.shape[-1] for p in parts) != self.out_ch:  # always with a skip
      x = SplitDense(self.out_ch, dtype=self.dtype, name="nin_shortcut")(parts)
    if self.norm_impl == "pallas_conv":
      h = self._norm_conv(parts, None, "norm1", "conv1", nn.initializers.lecun_normal(), 0.0,
                          None, self.dtype)
      h = self._norm_conv((h,), cond_proj(cond), "norm2", "conv2", nn.initializers.zeros,
                          dropout, x, self.residual_dtype)
    else:
      conv = lambda name, **kw: Conv(self.out_ch, dtype=self.dtype, name=name, **kw)
      h = norm_swish(parts, None, self.dtype, self.norm_impl, "norm1")
      h = checkpoint_name(conv("conv1")(h), "conv")
      h = norm_swish((h,), cond_proj(cond), self.dtype, self.norm_impl, "norm2", dropout=dropout)
      h = checkpoint_name(conv("conv2", kernel_init=nn.initializers.zeros)(h), "conv")
      h = (x + h).astype(self.residual_dtype)
    if self.attention:
      h = AttnBlock(dtype=self.dtype, residual_dtype=self.residual_dtype, name="attn")(h)
    return h, h.astype(self.dtype)

  def _norm_conv(self, parts, shift, norm_name, conv_name, kernel_init, dropout, residual,
                 out_dtype):
    """:func:`group_norm_swish_conv` with the parameters of ``GroupNormSwish(name=norm_name)``
    and ``nn.Conv(name=conv_name)`` (names, shapes, initialisation), so that checkpoints do not
    depend on ``norm_impl``."""
    channels = pallas_norm.group_channels(parts, GroupNormSwish.num_groups)
    scale, bias = _Parameters((("scale", nn.initializers.ones_init(), (channels,)),
                               ("bias", nn.initializers.zeros_init(), (channels,))),
                              name=norm_name)()
    kernel, conv_bias = _Parameters((("kernel", kernel_init, (3, 3, channels, self.out_ch)),
                                     ("bias", nn.initializers.zeros_init(), (self.out_ch,))),
                                    name=conv_name)()
    seeds = pallas_norm.dropout_seeds(self, parts[0].shape[0], dropout)
    out = group_norm_swish_conv(GroupNormSwish.num_groups, GroupNormSwish.epsilon, self.dtype,
                                out_dtype, dropout, seeds, parts, shift, scale, bias, kernel,
                                conv_bias, residual)
    return checkpoint_name(out, "conv")


@jax.custom_jvp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over y's last axis, in y's dtype, whose derivative broadcasts bias's tangent before
  rounding it to y's dtype: its transpose, bias's gradient (y's summed over every other axis), is
  then summed in bias's fp32. Autodiff's own sums it in y's dtype: in bf16, 0.01 summed over
  128·32·32 positions gave 16 instead of 1,310.7 on the CPU, where flax's bf16 layers lost 40 to
  70 % of their bias gradients."""
  return y + bias.astype(y.dtype)


@add_bias.defjvp
def _add_bias_jvp(primals, tangents):
  (y, bias), (dy, dbias) = primals, tangents
  return add_bias(y, bias), dy + jnp.broadcast_to(dbias, y.shape).astype(y.dtype)


class Conv(nn.Module):
  """``nn.Conv(features, (3, 3), strides, kernel_init=kernel_init, dtype=dtype)`` on NHWC, with
  its parameters (names, shapes, initialisation) and its function; the bias is added by
  :func:`add_bias`, so that its gradient is summed in fp32."""
  features: int
  strides: int = 1
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                     (self.strides, self.strides), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return add_bias(y, bias)


class SplitDense(nn.Module):
  """nn.Dense of the channel concatenation of ``parts``, without forming it:
  Σ_i parts_i · W[rows of part i] + b, in ``dtype``, with the parameters (names, shapes and
  initialisation) of ``nn.Dense(features, kernel_init=kernel_init)`` on the concatenation; the
  bias is added by :func:`add_bias`."""
  features: int
  dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    sizes = [p.shape[-1] for p in parts]
    kernel = self.param("kernel", self.kernel_init, (sum(sizes), self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    starts = [sum(sizes[:i]) for i in range(len(parts))]
    return add_bias(sum(jnp.dot(p.astype(self.dtype), kernel[a:a + n].astype(self.dtype))
                        for p, a, n in zip(parts, starts, sizes)), bias)


class AttnBlock(nn.Module):
  """Single-head self-attention over all H·W positions, residual, zero-initialised output."""
  dtype: DTypeLike = jnp.float32
  residual_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(dtype=self.dtype, name="norm")(centred(x, GroupNormSwish.num_groups))
    h = h.reshape(b, hgt * wid, 1, c)
    q, k, v = (SplitDense(c, dtype=self.dtype, name=n)([h]) for n in ("q", "k", "v"))
    h = jax.nn.dot_product_attention(q, k, v)  # logits and softmax in fp32
    h = SplitDense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")([h])
    return (x + h.reshape(x.shape)).astype(self.residual_dtype)


def check_channel_mult(channel_mult: Sequence[int], prefix: str = "") -> None:
  """Refuse a ``channel_mult`` that is not a non-empty tuple of integers >= 1, naming the key as
  ``prefix`` + ``channel_mult``."""
  if (not isinstance(channel_mult, (tuple, list)) or not channel_mult
      or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in channel_mult)):
    raise ValueError(f"{prefix}channel_mult={channel_mult!r} must be a non-empty tuple of "
                     "integers >= 1 (channels per level, in units of n_embd).")


def check_resolution(height: int, width: int, channel_mult: Sequence[int], prefix: str = "") -> None:
  """Refuse images whose height or width the U-Net cannot halve once per level after the first."""
  factor = 2 ** (len(channel_mult) - 1)
  if height % factor or width % factor:
    raise ValueError(f"images of {height}×{width} for {prefix}channel_mult={tuple(channel_mult)}: "
                     f"the U-Net halves them {len(channel_mult) - 1} times, so they must be "
                     f"multiples of {factor}; change data.image_size or use fewer levels.")


def check_width(n_embd: int, channel_mult: Sequence[int], prefix: str = "") -> None:
  """Refuse an ``n_embd`` that is not a multiple of GroupNorm's 32 groups, or that leaves a level
  one channel per group: normalising a lone channel removes the γ conditioning, a per-channel
  shift, before the block uses it, and ε̂ no longer depends on γ."""
  if isinstance(n_embd, bool) or not isinstance(n_embd, int) or n_embd < 32 or n_embd % 32:
    raise ValueError(f"{prefix}n_embd={n_embd!r} must be a positive multiple of 32 (GroupNorm's "
                     "32 groups).")
  if n_embd * min(channel_mult) < 64:
    raise ValueError(f"{prefix}n_embd={n_embd} (× channel_mult {min(channel_mult)}) leaves one "
                     "channel in each of GroupNorm's 32 groups, and normalising a lone channel "
                     "removes the γ conditioning (a per-channel shift) before the block uses it: "
                     f"set {prefix}n_embd >= 64.")


class ScoreUNet(nn.Module):
  """ε̂(z_t; γ_t) = z_t + UNet(z_t, γ_t).

  Call: ``apply(params, z, gamma_t, deterministic=True, rngs={'dropout': key})`` with z
  [B, H, W, C] and gamma_t [B] (or a scalar); returns ε̂ [B, H, W, C] in float32. Dropout is
  active only with ``deterministic=False`` (which needs the 'dropout' rng).

  dtype='bfloat16' runs convolutions, dense layers and attention in bf16 with fp32 parameters;
  GroupNorm statistics, the γ embedding, its MLP and its projections into the blocks, the
  output convolution and the base-measure addition stay in fp32; the Fourier features are
  computed in fp32 and rounded, with z, at the input convolution.
  ``residual_dtype`` is the dtype of the residual stream, the activations between blocks: with
  'float32' only the layers' inputs and outputs are rounded to bf16, not the running sums (the
  U-Net's skips, layer inputs only, are kept in the compute dtype). ``remat`` (a key of
  :data:`REMAT`) trades the activations a ResNet block stores for recomputation in the backward
  pass. ``unroll`` is the number of blocks per iteration of the loops over identical blocks
  (same parameters, same results): 1 is a loop of single blocks, 0 unrolls the loops entirely
  (XLA's cost analysis counts a loop body once, so FLOP counts need the unrolled program).
  ``norm_impl`` (one of :data:`NORM_IMPL`) says how the GroupNorm + swish pairs are computed
  and differentiated; it changes neither the parameters nor, beyond rounding, the outputs.
  """
  n_embd: int = 128
  n_layer: int = 32
  dropout: float = 0.1
  channel_mult: Sequence[int] = (1,)
  fourier_features: bool = True
  attention: bool = False
  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX
  dtype: str = "float32"
  residual_dtype: str = "float32"
  remat: str = "none"
  unroll: int = 1
  norm_impl: str = "autodiff"

  @nn.compact
  def __call__(self, z: jax.Array, gamma_t: jax.Array, deterministic: bool = True) -> jax.Array:
    if z.ndim != 4:
      raise ValueError(f"z has shape {z.shape}: ScoreUNet expects images [B, H, W, C].")
    for field in ("dtype", "residual_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"{field}={getattr(self, field)!r}: use one of {tuple(DTYPES)}.")
    if self.remat not in REMAT:
      raise ValueError(f"remat={self.remat!r}: use one of {tuple(REMAT)}.")
    if self.norm_impl not in NORM_IMPL:
      raise ValueError(f"norm_impl={self.norm_impl!r}: use one of {NORM_IMPL}.")
    if self.norm_impl == "recompute" and self.remat != "none":
      raise ValueError(f"norm_impl='recompute' with remat={self.remat!r}: a rematerialised "
                       "block already recomputes its norms; use remat='none' or "
                       "norm_impl='autodiff'.")
    if isinstance(self.n_layer, bool) or not isinstance(self.n_layer, int) or self.n_layer < 1:
      raise ValueError(f"n_layer={self.n_layer!r} must be an integer >= 1 (ResNet blocks per "
                       "level on the way down).")
    check_channel_mult(self.channel_mult)
    check_width(self.n_embd, self.channel_mult)
    if isinstance(self.unroll, bool) or not isinstance(self.unroll, int) or self.unroll < 0:
      raise ValueError(f"unroll={self.unroll!r} must be an integer >= 0 (blocks per loop "
                       "iteration; 0 unrolls the loops entirely).")
    check_resolution(z.shape[1], z.shape[2], self.channel_mult)
    levels = len(self.channel_mult)
    cdt, rdt = DTYPES[self.dtype], DTYPES[self.residual_dtype]
    z = jnp.asarray(z, jnp.float32)
    batch = z.shape[0]
    if jnp.size(gamma_t) not in (1, batch):
      raise ValueError(f"gamma_t has {jnp.size(gamma_t)} values for a batch of {batch} images: pass "
                       "one γ_t per image, or one for all.")

    # Conditioning: γ_t rescaled to [0, 1], sinusoidal embedding, 2-layer MLP (fp32).
    t = (jnp.asarray(gamma_t, jnp.float32) - self.gamma_min) / (self.gamma_max - self.gamma_min)
    t = jnp.broadcast_to(t.reshape(-1), (batch,))
    cond = timestep_embedding(t, self.n_embd)
    cond = nn.swish(nn.Dense(4 * self.n_embd, name="dense0")(cond))
    cond = nn.swish(nn.Dense(4 * self.n_embd, name="dense1")(cond))

    h = jnp.concatenate([z, fourier_features(z)], axis=-1) if self.fourier_features else z
    h = Conv(self.n_embd, dtype=cdt, name="conv_in")(h).astype(rdt)

    # The skips, in the compute dtype, as segments [m, B, H, W, C]: the outputs of one scan
    # stay one array (no copy), the way up reads them in reverse order.
    segments = [h.astype(cdt)[None]]
    for i, mult in enumerate(self.channel_mult):
      h, outs = self._blocks(h, None, cond, deterministic, self.n_embd * mult, self.n_layer,
                             self.attention, f"down_{i}")
      segments += outs
      if i < levels - 1:
        h = Conv(h.shape[-1], strides=2, dtype=cdt, name=f"downsample_{i}")(h).astype(rdt)
        segments.append(h.astype(cdt)[None])

    h, _ = self._blocks(h, None, cond, deterministic, h.shape[-1], 1, True, "mid_1")
    h, _ = self._blocks(h, None, cond, deterministic, h.shape[-1], 1, False, "mid_2")

    for i in reversed(range(levels)):
      h, _ = self._blocks(h, _pop_skips(segments, self.n_layer + 1), cond, deterministic,
                          self.n_embd * self.channel_mult[i], self.n_layer + 1, self.attention,
                          f"up_{i}")
      if i > 0:
        b, hgt, wid, c = h.shape
        h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), "nearest")
        h = Conv(c, dtype=cdt, name=f"upsample_{i}")(h).astype(rdt)
    assert not segments

    h = norm_swish((h,), None, jnp.float32,
                   "pallas" if self.norm_impl == "pallas_conv" else self.norm_impl, "norm_out")
    h = Conv(z.shape[-1], kernel_init=nn.initializers.zeros, name="conv_out")(h)
    return z + h  # the base measure: ε̂ = z_t at initialisation

  def _blocks(self, h, skips, cond, deterministic, out_ch, n, attention, name):
    """n ResNet blocks to out_ch channels; with ``skips`` (segments from :func:`_pop_skips`)
    block k concatenates the k-th skip, taking each segment from its last entry to its first.

    Each segment's blocks share one scanned body over stacked parameters, reading the segment
    in reverse; a level's first block runs on its own when it changes the channel count.
    Returns (h, [segments of the blocks' outputs for the way up]).
    """
    block_kw = dict(out_ch=out_ch, dropout=self.dropout, deterministic=deterministic,
                    attention=attention, dtype=DTYPES[self.dtype],
                    residual_dtype=DTYPES[self.residual_dtype], norm_impl=self.norm_impl)
    runs = [(n, None)] if skips is None else [(len(s), s) for s in skips]  # (length, skips)
    if h.shape[-1] != out_ch and runs[0][0] > 1:
      m, s = runs[0]
      runs[:1] = [(1, None if s is None else s[m - 1:]), (m - 1, None if s is None else s[:m - 1])]
    assert sum(m for m, _ in runs) == n
    outs = []
    for run_id, (m, xs) in enumerate(runs):
      cls = (ResnetBlock if self.remat == "none" else
             nn.remat(ResnetBlock, prevent_cse=m == 1, policy=REMAT[self.remat]))
      if m == 1:
        h, y = cls(**block_kw, name=f"{name}_{run_id}")(h, None if xs is None else xs[0], cond)
        outs.append(y[None])
      else:
        scanned = nn.scan(cls, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(0, nn.broadcast), length=m, reverse=xs is not None,
                          unroll=min(self.unroll or m, m))
        h, ys = scanned(**block_kw, name=f"{name}_{run_id}")(h, xs, cond)
        outs.append(ys)
    return h, outs


def _pop_skips(segments: list, n: int) -> list:
  """The last n skips off a list of segments [m, ...] (popped in place), as the segments (or
  their tails) that hold them, last first: the order in which the way up reads them."""
  taken = []
  while n > 0:
    seg = segments.pop()
    if len(seg) > n:  # leave the head of a longer segment for the next level
      segments.append(seg[:len(seg) - n])
      seg = seg[len(seg) - n:]
    taken.append(seg)
    n -= len(seg)
  return taken


def num_params(params) -> int:
  """The number of scalar parameters in a pytree."""
  return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def param_count(net: ScoreUNet, image_shape: Sequence[int]) -> int:
  """Parameters of `net` for images [H, W, C], from ``jax.eval_shape`` (nothing is allocated)."""
  z = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  g = jax.ShapeDtypeStruct((1,), jnp.float32)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), z, g)
  return num_params(shapes["params"])
