"""GroupNorm + swish as fused Pallas (Triton) kernels, forward and backward.

out = swish(x̂ · scale + bias), x̂ = (v − μ_g) r_g, r_g = 1/√(max(E_g[v²] − μ_g², 0) + ε),
v = concat(parts) + shift[:, None, None, :], with μ_g and E_g over H, W and the channels of each
of the ``groups`` groups: the function :func:`vdm.nets.group_norm_swish` computes with XLA.

XLA computes a GroupNorm as a reduction that reads v and an elementwise pass that reads it again;
its derivative reads v and the cotangent in a reduction and again to apply it. Here one program
owns one example's H·W × ``block`` channels (whole groups), so the statistics and the output
come from one kernel: the second read of each chunk of rows follows the first closely enough to
come from the GPU's L2 cache, and HBM sees each input once. The backward kernel recomputes x̂
from v and the statistics, reads the cotangent, and writes dv (and its sums for the shift, the
scale and the bias) the same way. The concatenation of two parts is never formed: the programs
of each part's channel blocks read that part.

On the CPU the kernels run in Pallas's interpreter (for tests: same arithmetic, slow); on a GPU
Triton compiles them. They have no forward-mode derivative: the ODE likelihood's
``jax.linearize`` needs ``vdm.nets``'s XLA rule instead (``norm_impl='recompute'``, the same
parameters).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# The most channels one program owns, and the most elements of a chunk of rows it holds in
# registers at once (Triton keeps a loaded block in registers: 4,096 fp32 values are 16 per
# thread of 8 warps).
MAX_BLOCK_CHANNELS = 32
MAX_CHUNK_ELEMENTS = 4096
NUM_WARPS = 8
# The kernels' names start with this (profiles count their time apart: vdm.benchmark.KERNEL_KINDS).
KERNEL_NAME = "vdm_norm_swish"


def _layout(parts: Sequence[jax.Array], groups: int) -> tuple[int, int, int]:
  """(channels per group, channels per program, rows per chunk) for ``parts``, or a one-line
  ValueError naming what the kernels cannot tile."""
  channels = sum(p.shape[-1] for p in parts)
  if channels % groups:
    raise ValueError(f"{channels} channels do not split into {groups} groups: use a multiple of "
                     f"{groups} channels.")
  per_group = channels // groups
  block = MAX_BLOCK_CHANNELS
  while block >= per_group and (block % per_group or any(p.shape[-1] % block for p in parts)):
    block //= 2
  if block < per_group or block % per_group:
    sizes = "+".join(str(p.shape[-1]) for p in parts)
    raise ValueError(f"the Pallas GroupNorm cannot tile {sizes} channels in groups of "
                     f"{per_group}: each part needs a multiple of a power of two that holds whole "
                     "groups; use model.norm_impl='recompute'.")
  rows = parts[0].shape[1] * parts[0].shape[2]
  chunk = 1
  while chunk * 2 * block <= MAX_CHUNK_ELEMENTS and rows % (chunk * 2) == 0:
    chunk *= 2
  return per_group, block, chunk


def _interpret() -> bool:
  backend = jax.default_backend()
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"model.norm_impl='pallas' has Triton kernels for GPUs (and Pallas's "
                     f"interpreter on the CPU), not for {backend}: use model.norm_impl='recompute'.")
  return backend == "cpu"


def _group_sum(s: jax.Array, per_group: int) -> jax.Array:
  """Each channel's group total of the per-channel sums s [block]: Σ over its group's channels."""
  n = s.shape[0]
  same = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) // per_group
          == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1) // per_group)
  return jnp.sum(jnp.where(same, s[None, :], 0.0), axis=1)


def _part_index_maps(parts, block):
  """For each part, the map (b, j) -> its block (clamped into the part) and the range of the
  global channel blocks j it owns."""
  maps, start = [], 0
  for p in parts:
    n = p.shape[-1] // block
    maps.append((functools.partial(
        lambda b, j, start, n: (b, 0, jnp.clip(j - start, 0, n - 1)), start=start, n=n),
        start, start + n))
    start += n
  return maps


def _chunks(rows: int, chunk: int, body, init):
  """fori_loop over the row chunks [i·chunk, (i+1)·chunk) of one program's block."""
  return jax.lax.fori_loop(0, rows // chunk, lambda i, c: body(pl.ds(i * chunk, chunk), c), init)


def _forward_kernel(*refs, num_parts, has_shift, per_group, rows, chunk, epsilon, part_ranges):
  xs = refs[:num_parts]
  shift_ref, scale_ref, bias_ref = (refs[num_parts] if has_shift else None,
                                    *refs[num_parts + has_shift:num_parts + has_shift + 2])
  out_ref, mean_ref, rstd_ref = refs[num_parts + has_shift + 2:]
  j = pl.program_id(1)
  shift = shift_ref[...].astype(jnp.float32) if has_shift else 0.0
  scale, bias = scale_ref[...].astype(jnp.float32), bias_ref[...].astype(jnp.float32)
  count = rows * per_group

  for x_ref, (lo, hi) in zip(xs, part_ranges):
    @pl.when((j >= lo) & (j < hi))
    def _(x_ref=x_ref):
      v_at = lambda r: x_ref[r, :].astype(jnp.float32) + shift

      def stats(r, acc):
        v = v_at(r)
        return acc[0] + v.sum(0), acc[1] + (v * v).sum(0)
      zeros = jnp.zeros(scale.shape, jnp.float32)
      s1, s2 = _chunks(rows, chunk, stats, (zeros, zeros))
      mean = _group_sum(s1, per_group) / count
      rstd = jax.lax.rsqrt(jnp.maximum(_group_sum(s2, per_group) / count - mean * mean, 0.0)
                           + epsilon)
      mean_ref[...], rstd_ref[...] = mean, rstd

      def write(r, carry):
        y = (v_at(r) - mean) * (rstd * scale) + bias
        out_ref[r, :] = (y * jax.nn.sigmoid(y)).astype(out_ref.dtype)
        return carry
      _chunks(rows, chunk, write, 0)


def _backward_kernel(*refs, num_parts, has_shift, per_group, rows, chunk, part_ranges):
  xs = refs[:num_parts]
  k = num_parts + has_shift
  shift_ref = refs[num_parts] if has_shift else None
  scale_ref, bias_ref, mean_ref, rstd_ref, ct_ref = refs[k:k + 5]
  douts = refs[k + 5:]
  dxs, dscale_ref, dbias_ref = douts[:num_parts], douts[num_parts], douts[num_parts + 1]
  dshift_ref = douts[num_parts + 2] if has_shift else None
  j = pl.program_id(1)
  shift = shift_ref[...].astype(jnp.float32) if has_shift else 0.0
  scale, bias = scale_ref[...].astype(jnp.float32), bias_ref[...].astype(jnp.float32)
  mean, rstd = mean_ref[...], rstd_ref[...]
  count = rows * per_group

  for x_ref, dx_ref, (lo, hi) in zip(xs, dxs, part_ranges):
    @pl.when((j >= lo) & (j < hi))
    def _(x_ref=x_ref, dx_ref=dx_ref):
      def grads(r):
        """(x̂, ∂L/∂y) of a chunk: ∂L/∂y = ct · (s + y s (1 − s)), s = sigmoid(y)."""
        xhat = (x_ref[r, :].astype(jnp.float32) + shift - mean) * rstd
        y = xhat * scale + bias
        s = jax.nn.sigmoid(y)
        return xhat, ct_ref[r, :].astype(jnp.float32) * (s + y * s * (1.0 - s))

      def sums(r, acc):
        xhat, gy = grads(r)
        return acc[0] + gy.sum(0), acc[1] + (gy * xhat).sum(0)
      zeros = jnp.zeros(scale.shape, jnp.float32)
      gy_sum, gy_xhat_sum = _chunks(rows, chunk, sums, (zeros, zeros))
      dbias_ref[...], dscale_ref[...] = gy_sum, gy_xhat_sum
      # ∂L/∂x̂ = ∂L/∂y · scale; dv = r_g (∂L/∂x̂ − mean_g(∂L/∂x̂) − x̂ mean_g(∂L/∂x̂ · x̂)).
      m1 = _group_sum(gy_sum * scale, per_group) / count
      m2 = _group_sum(gy_xhat_sum * scale, per_group) / count

      def write(r, dshift):
        xhat, gy = grads(r)
        dv = rstd * (gy * scale - m1 - xhat * m2)
        dx_ref[r, :] = dv.astype(dx_ref.dtype)
        return dshift + dv.sum(0)
      dshift = _chunks(rows, chunk, write, zeros)
      if has_shift:
        dshift_ref[...] = dshift


def _call(kernel, name, parts, block, out_shapes, out_kinds, in_arrays, in_kinds, **kw):
  """pallas_call over the grid (B, channel blocks). Each array is laid out [B, H·W, C] ('image',
  per part, its block clamped into the part), [B, H·W, C] ('full', blocks of all channels),
  [B, C] ('per_example') or [C] ('per_channel')."""
  batch, rows = parts[0].shape[0], parts[0].shape[1] * parts[0].shape[2]
  channels = sum(p.shape[-1] for p in parts)
  part_maps = iter(_part_index_maps(parts, block))
  specs = {
      "full": lambda: pl.BlockSpec((None, rows, block), lambda b, j: (b, 0, j)),
      "per_example": lambda: pl.BlockSpec((None, block), lambda b, j: (b, j)),
      "per_channel": lambda: pl.BlockSpec((block,), lambda b, j: (j,)),
      "image": lambda: pl.BlockSpec((None, rows, block), next(part_maps)[0]),
  }
  in_specs = [specs[kind]() for kind in in_kinds]
  part_maps = iter(_part_index_maps(parts, block))
  out_specs = [specs[kind]() for kind in out_kinds]
  flat = lambda a: a.reshape(a.shape[0], rows, a.shape[-1]) if a.ndim == 4 else a
  return pl.pallas_call(
      functools.partial(kernel, num_parts=len(parts), rows=rows,
                        part_ranges=[r[1:] for r in _part_index_maps(parts, block)], **kw),
      grid=(batch, channels // block),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
      compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=_interpret(), name=f"{KERNEL_NAME}_{name}",
  )(*[flat(a) for a in in_arrays])


def _forward(groups, epsilon, dtype, parts, shift, scale, bias):
  per_group, block, chunk = _layout(parts, groups)
  batch, hgt, wid = parts[0].shape[:3]
  channels = sum(p.shape[-1] for p in parts)
  stats = jax.ShapeDtypeStruct((batch, channels), jnp.float32)
  has_shift = shift is not None
  ins = [*parts, *([shift] if has_shift else []), scale, bias]
  kinds = ["image"] * len(parts) + ["per_example"] * has_shift + ["per_channel"] * 2
  out, mean, rstd = _call(
      _forward_kernel, "forward", parts, block,
      [jax.ShapeDtypeStruct((batch, hgt * wid, channels), dtype), stats, stats],
      ["full", "per_example", "per_example"], ins, kinds,
      has_shift=has_shift, per_group=per_group, chunk=chunk, epsilon=epsilon)
  return out.reshape(batch, hgt, wid, channels), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def group_norm_swish(groups: int, epsilon: float, dtype: jnp.dtype, parts: Sequence[jax.Array],
                     shift: Optional[jax.Array], scale: jax.Array, bias: jax.Array) -> jax.Array:
  """swish(x̂ · scale + bias) in ``dtype`` (the module docstring's equation), from the fused
  forward kernel; its reverse-mode derivative is the fused backward kernel."""
  return _forward(groups, epsilon, dtype, tuple(parts), shift, scale, bias)[0]


def _vjp_forward(groups, epsilon, dtype, parts, shift, scale, bias):
  out, mean, rstd = _forward(groups, epsilon, dtype, tuple(parts), shift, scale, bias)
  return out, (tuple(parts), shift, scale, bias, mean, rstd)


def _vjp_backward(groups, epsilon, dtype, residuals, ct):
  parts, shift, scale, bias, mean, rstd = residuals
  per_group, block, chunk = _layout(parts, groups)
  batch = parts[0].shape[0]
  channels = sum(p.shape[-1] for p in parts)
  has_shift = shift is not None
  per_example = jax.ShapeDtypeStruct((batch, channels), jnp.float32)
  ins = [*parts, *([shift] if has_shift else []), scale, bias, mean, rstd, ct]
  kinds = (["image"] * len(parts) + ["per_example"] * has_shift + ["per_channel"] * 2
           + ["per_example"] * 2 + ["full"])
  outs = _call(
      _backward_kernel, "backward", parts, block,
      [jax.ShapeDtypeStruct((batch, p.shape[1] * p.shape[2], p.shape[-1]), p.dtype) for p in parts]
      + [per_example] * (2 + has_shift),
      ["image"] * len(parts) + ["per_example"] * (2 + has_shift), ins, kinds,
      has_shift=has_shift, per_group=per_group, chunk=chunk)
  dparts = tuple(d.reshape(p.shape) for d, p in zip(outs, parts))
  dscale, dbias = outs[len(parts)].sum(0), outs[len(parts) + 1].sum(0)
  dshift = outs[len(parts) + 2].astype(shift.dtype) if has_shift else None
  return dparts, dshift, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm_swish.defvjp(_vjp_forward, _vjp_backward)
