"""A 3×3 convolution whose input load applies the GroupNorm + swish before it, as one Pallas
(Triton) kernel: the forward pass of a ResNet block's norm and convolution without the norm's
output ever written.

out = conv3×3(h, K) + b (+ residual), h = dropout(swish(v · a + c)), v = concat(parts),

with SAME zero padding of h, per example and channel a = r_g · scale and c = (shift − μ_g) r_g ·
scale + bias (:func:`norm_affine`: the GroupNorm of ``vdm.nets.group_norm_swish`` folded into
one multiply-add), and dropout the mask of :func:`vdm.pallas_norm.dropout_keep_mask`. With
``sums`` the kernel also returns Σ out and Σ out² over each example's H·W positions, per
channel: the statistics of the next GroupNorm, from the output it has just rounded.

Why: a sampling step of the CIFAR-10 net spent 10.9 of its 25.3 ms in cuDNN's convolutions on
the H100 and most of the rest in the norms around them, memory-bound passes that read each
norm's input and write its output (experiments/RESULTS.md). Here the norm costs no pass of its
own. Whether that pays depends on whether Triton's convolution is as fast as cuDNN's, which only
a GPU can tell: ``experiments/speed_sweep.py --convs`` times it against both, and its variant
``norm_pallas_conv`` the net with ``model.norm_impl='pallas_conv'``, where
:func:`vdm.nets.group_norm_swish_conv` gives it XLA's derivative. Under data parallelism each
device convolves its own examples.

Each program computes ``rows`` consecutive output positions (whole rows of the image when
``rows`` is a multiple of W) of one example, for all output channels, as an implicit matrix
product: for each of the 9 taps and each block of input channels it loads the shifted input
rows, applies the norm, and accumulates h_tap · K_tap in fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.typing import DTypeLike

from vdm import pallas_norm

KERNEL_NAME = "vdm_norm_conv3x3"


def norm_affine(mean: jax.Array, rstd: jax.Array, scale: jax.Array, bias: jax.Array,
                shift: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """(a, c) [B, C] with (v − μ_g) r_g · scale + bias = x · a + c for v = x + shift (shift 0 if
  None), from the per-channel μ_g and r_g [B, C] of v's group for each channel."""
  a = rstd * scale
  centre = -mean if shift is None else shift - mean
  return a, centre * a + bias


def _kernel(refs, *, part_channels, width, height, rows, block, dropout, has_residual, sums):
  """One program: ``rows`` output positions of one example, all output channels."""
  i = pl.program_id(0)
  r = i * rows + jnp.arange(rows)
  y = jax.lax.div(r, width)
  x = r - y * width
  channels = sum(part_channels)
  acc = jnp.zeros((rows, refs["out"].shape[-1]), jnp.float32)
  offset = 0
  for x_ref, n in zip(refs["parts"], part_channels):
    blocks = n // block

    def step(t, acc, x_ref=x_ref, offset=offset, blocks=blocks):
      # (lax's division: jnp's // and % lower to Triton with a boolean they cannot take)
      tap = jax.lax.div(t, blocks)
      first = offset + (t - tap * blocks) * block
      dy = jax.lax.div(tap, 3) - 1
      dx = tap - 3 * (dy + 1) - 1
      inside = (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)
      src = jnp.clip(r + dy * width + dx, 0, height * width - 1)
      v = x_ref[src, pl.ds(first - offset, block)].astype(jnp.float32)
      h = v * refs["a"][pl.ds(first, block)] + refs["c"][pl.ds(first, block)]
      h = h * jax.nn.sigmoid(h)
      if dropout:
        channel = first + jax.lax.broadcasted_iota(jnp.int32, (rows, block), 1)
        keep = pallas_norm._keep(refs["seeds"][...], src[:, None], channel, channels, dropout)
        h = jnp.where(keep, h / (1.0 - dropout), 0.0)
      h = jnp.where(inside[:, None], h, 0.0).astype(refs["kernel"].dtype)
      return acc + jnp.dot(h, refs["kernel"][tap, pl.ds(first, block), :],
                           preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, 9 * blocks, step, acc)
    offset += n
  out = acc + refs["bias"][...].astype(jnp.float32)
  if has_residual:
    out = out + refs["residual"][...].astype(jnp.float32)
  out = out.astype(refs["out"].dtype)
  refs["out"][...] = out
  if sums:
    out = out.astype(jnp.float32)
    refs["sum"][...], refs["sum_sq"][...] = out.sum(0), (out * out).sum(0)


def _check(parts, kernel, rows, block):
  """A one-line ValueError for what the kernel cannot tile, naming the way out in a net."""
  instead = "; or use model.norm_impl='pallas'"
  height, width = parts[0].shape[1:3]
  channels = [p.shape[-1] for p in parts]
  pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
  if kernel.shape[:3] != (3, 3, sum(channels)):
    raise ValueError(f"kernel {kernel.shape} is not [3, 3, {sum(channels)}, C_out] for inputs of "
                     f"{'+'.join(map(str, channels))} channels.")
  if not pow2(kernel.shape[3]) or kernel.shape[3] < 16:
    raise ValueError(f"{kernel.shape[3]} output channels: the Pallas convolution needs a power "
                     f"of two >= 16{instead}.")
  if not pow2(rows) or (height * width) % rows or rows < 16:
    raise ValueError(f"rows={rows} must be a power of two >= 16 dividing H·W = {height * width}"
                     f"{instead}.")
  if not pow2(block) or block < 16 or any(c % block for c in channels):
    raise ValueError(f"block={block} must be a power of two >= 16 dividing each input's channels "
                     f"({'+'.join(map(str, channels))}){instead}.")


def _tiling(parts, rows, block) -> tuple[int, int]:
  """(rows, block), the defaults filled in: the largest of 128, 64, 32 and 16 positions that
  divides H·W, and the largest of 64, 32 and 16 input channels that divides each part."""
  channels = [p.shape[-1] for p in parts]
  positions = parts[0].shape[1] * parts[0].shape[2]
  rows = rows or next((r for r in (128, 64, 32) if positions % r == 0), 16)
  block = block or next((b for b in (64, 32) if not any(c % b for c in channels)), 16)
  return rows, block


def norm_swish_conv(parts: Sequence[jax.Array], a: jax.Array, c: jax.Array, kernel: jax.Array,
                    bias: jax.Array, residual: Optional[jax.Array] = None, dropout: float = 0.0,
                    seeds: Optional[jax.Array] = None, sums: bool = False,
                    dtype: Optional[DTypeLike] = None, out_dtype: Optional[DTypeLike] = None,
                    rows: Optional[int] = None, block: Optional[int] = None, num_warps: int = 8,
                    num_stages: int = 2):
  """conv3×3(dropout(swish(concat(parts) · a + c)), kernel) + bias (+ residual), the module
  docstring's equation, with h and the kernel rounded to ``dtype`` (the parts' by default) and
  their product summed in fp32, in ``out_dtype`` (``dtype`` by default), for parts [B, H, W, C_k]
  of any float dtype, a and c [B, ΣC_k] (fp32; :func:`norm_affine`), kernel
  [3, 3, ΣC_k, C_out], bias [C_out]; with ``sums`` also
  (Σ out, Σ out²) [B, C_out] in fp32 over H and W. ``rows`` (output positions per program),
  ``block`` (input channels per step), ``num_warps`` and ``num_stages`` tile the kernel; they
  change the speed, not the function. Under data parallelism each device convolves its shard
  of the batch. With ``dtype`` fp32 a GPU multiplies in TF32, as XLA's convolutions do, unless
  ``jax.default_matmul_precision("highest")`` asks for full fp32."""
  parts = tuple(parts)
  rows, block = _tiling(parts, rows, block)
  _check(parts, kernel, rows, block)
  pallas_norm.check_dropout(dropout, seeds, parts[0].shape[0])
  dtype = jnp.dtype(dtype or parts[0].dtype)
  arrays = (kernel.astype(dtype), *parts, a.astype(jnp.float32), c.astype(jnp.float32), bias,
            *([residual] if residual is not None else []), *([seeds] if dropout else []))
  results = _partitioned(len(parts), residual is not None, float(dropout), sums,
                         jnp.dtype(out_dtype or dtype), rows, block, num_warps,
                         num_stages, *arrays)
  return results if sums else results[0]


def _call(num_parts, has_residual, dropout, sums, out_dtype, rows, block, num_warps, num_stages,
          kernel, *arrays):
  """The pallas_call of :func:`norm_swish_conv` on the arrays (kernel, parts..., a, c, bias,
  [residual], [seeds]): (out, [Σ out, Σ out²])."""
  parts, (a, c, bias, *rest) = arrays[:num_parts], arrays[num_parts:]
  residual = rest.pop(0) if has_residual else None
  seeds = rest.pop(0) if dropout else None
  batch, height, width = parts[0].shape[:3]
  positions, channels, features = height * width, kernel.shape[2], kernel.shape[3]
  flat = lambda v: v.reshape(batch, positions, v.shape[-1])  # noqa: E731
  whole = lambda n: pl.BlockSpec((None, positions, n), lambda i, b: (b, 0, 0))  # noqa: E731
  tile = pl.BlockSpec((None, rows, features), lambda i, b: (b, i, 0))
  per_example = pl.BlockSpec((None, channels), lambda i, b: (b, 0))
  inputs = ([(f"part{k}", whole(p.shape[-1]), flat(p)) for k, p in enumerate(parts)]
            + [("a", per_example, a), ("c", per_example, c),
               ("kernel", pl.BlockSpec((9, channels, features), lambda i, b: (0, 0, 0)),
                kernel.reshape(9, channels, features)),
               ("bias", pl.BlockSpec((features,), lambda i, b: (0,)), bias)]
            + ([("residual", tile, flat(residual))] if has_residual else [])
            + [("seeds", pl.BlockSpec((None, 1), lambda i, b: (b, 0)), seeds)] * bool(dropout))
  stat = pl.BlockSpec((None, None, features), lambda i, b: (b, i, 0))
  stat_shape = jax.ShapeDtypeStruct((batch, positions // rows, features), jnp.float32)
  outputs = ([("out", tile, jax.ShapeDtypeStruct((batch, positions, features), out_dtype))]
             + [("sum", stat, stat_shape), ("sum_sq", stat, stat_shape)] * sums)

  def body(*refs):
    named = dict(zip([n for n, _, _ in inputs] + [n for n, _, _ in outputs], refs))
    named["parts"] = [named[f"part{k}"] for k in range(len(parts))]
    _kernel(named, part_channels=[p.shape[-1] for p in parts], width=width, height=height,
            rows=rows, block=block, dropout=dropout, has_residual=has_residual, sums=sums)

  results = pl.pallas_call(
      body, grid=(positions // rows, batch), in_specs=[s for _, s, _ in inputs],
      out_specs=[s for _, s, _ in outputs], out_shape=[o for _, _, o in outputs],
      name=KERNEL_NAME, **pallas_norm.call_options(num_warps, num_stages),
  )(*[v for _, _, v in inputs])
  out = results[0].reshape(batch, height, width, features)
  return (out, results[1].sum(1), results[2].sum(1)) if sums else (out,)


_partitioned = pallas_norm._batch_parallel(_call, 9, whole=(0,))
