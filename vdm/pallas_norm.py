"""GroupNorm + swish as fused Pallas (Triton) kernels, forward and backward.

out = swish(x̂ · scale + bias), x̂ = (v − μ_g) r_g, r_g = 1/√(max(E_g[v²] − μ_g², 0) + ε),
v = concat(parts) + shift[:, None, None, :], with μ_g and E_g over H, W and the channels of each
of the ``groups`` groups: the function :func:`vdm.nets.group_norm_swish` computes with XLA.

XLA computes a GroupNorm as a reduction that reads v and an elementwise pass that reads it again;
its derivative reads v and the cotangent in a reduction and again to apply them. Here one program
owns one example's H·W rows of a block of channels (whole groups), and one kernel computes the
statistics and the output. A block that fits in registers (the CIFAR-10 net's 32×32 images in
blocks of 16 channels) is loaded once; a larger one is read twice in chunks of rows, the second
time mostly from the GPU's L2 cache. The backward kernel recomputes x̂ from v and the statistics,
reads the cotangent, and writes dv and its sums for the shift, the scale and the bias the same
way. The concatenation of two parts is never formed: each part's channel blocks are read from it.

On the CPU the kernels run in Pallas's interpreter (for tests: same arithmetic, slow); on a GPU
Triton compiles them. They have no forward-mode derivative: the ODE likelihood's
``jax.linearize`` needs ``vdm.nets``'s XLA rule instead (``norm_impl='recompute'``, the same
parameters).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plt
from jax.interpreters.mlir import ir
from jax.sharding import NamedSharding, PartitionSpec as P

# The most channels one program owns, and the most elements of one input it holds in registers
# at once (Triton keeps a loaded block in registers: 16,384 values are 64 per thread of 8 warps).
# A program whose whole block fits reads it once; a larger one reads it in chunks of rows twice,
# the second time mostly from L2.
MAX_BLOCK_CHANNELS = 32
MIN_BLOCK_CHANNELS = 16  # 32 bytes of bf16 per row: one memory sector
MAX_HELD_ELEMENTS = 16384
NUM_WARPS = 8
# The kernels' names start with this (profiles count their time apart: vdm.benchmark.KERNEL_KINDS).
KERNEL_NAME = "vdm_norm_swish"


def _layout(parts: Sequence[jax.Array], groups: int) -> tuple[int, int, int]:
  """(channels per group, channels per program, rows per chunk) for ``parts``, or a one-line
  ValueError naming what the kernels cannot tile. The block of channels is a power of two that
  holds whole groups and divides each part, halved (not below MIN_BLOCK_CHANNELS) until one
  example's H·W rows of it fit in MAX_HELD_ELEMENTS."""
  channels = sum(p.shape[-1] for p in parts)
  if channels % groups:
    raise ValueError(f"{channels} channels do not split into {groups} groups: use a multiple of "
                     f"{groups} channels.")
  per_group = channels // groups
  fits = lambda block: block % per_group == 0 and all(p.shape[-1] % block == 0 for p in parts)
  block = MAX_BLOCK_CHANNELS
  while block >= per_group and not fits(block):
    block //= 2
  if block < per_group or not fits(block):
    sizes = "+".join(str(p.shape[-1]) for p in parts)
    raise ValueError(f"the Pallas GroupNorm cannot tile {sizes} channels in groups of "
                     f"{per_group}: each part needs a multiple of a power of two that holds whole "
                     "groups; use model.norm_impl='recompute'.")
  rows = parts[0].shape[1] * parts[0].shape[2]
  while (rows * block > MAX_HELD_ELEMENTS and block // 2 >= max(per_group, MIN_BLOCK_CHANNELS)
         and fits(block // 2)):
    block //= 2
  chunk = 1
  while chunk * 2 * block <= MAX_HELD_ELEMENTS and rows % (chunk * 2) == 0:
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


def _part_blocks(parts, block) -> list[tuple[Callable, int, int]]:
  """For each part: the map (b, j) -> its block of the global channel block j (clamped into the
  part; only the programs of the part's own blocks read or write it), and the range [lo, hi) of
  the global channel blocks it holds."""
  out, start = [], 0
  for p in parts:
    n = p.shape[-1] // block
    out.append((functools.partial(
        lambda b, j, start, n: (b, 0, jnp.clip(j - start, 0, n - 1)), start=start, n=n),
        start, start + n))
    start += n
  return out


def _two_passes(rows: int, chunk: int, load, accumulate, between, write, init):
  """Two passes over one program's block of rows, in chunks of ``chunk`` rows: totals =
  Σ_chunks accumulate(load(rows)) (per element, summed over rows at the end); ctx =
  between(totals); then carry = write(rows, load(rows), ctx, carry) from ``init`` for each chunk.
  Returns (ctx, carry). When the chunk is the whole block it is loaded once for both passes."""
  if chunk == rows:
    every = pl.ds(0, rows)
    values = load(every)
    ctx = between(tuple(a.sum(0) for a in accumulate(values)))
    return ctx, write(every, values, ctx, init)

  def first(i, totals):
    return tuple(t + a for t, a in zip(totals, accumulate(load(pl.ds(i * chunk, chunk)))))
  zeros = tuple(jnp.zeros_like(a) for a in accumulate(load(pl.ds(0, chunk))))
  totals = jax.lax.fori_loop(0, rows // chunk, first, zeros)
  ctx = between(tuple(t.sum(0) for t in totals))

  def second(i, carry):
    r = pl.ds(i * chunk, chunk)
    return write(r, load(r), ctx, carry)
  return ctx, jax.lax.fori_loop(0, rows // chunk, second, init)


def _forward_kernel(*refs, num_parts, has_shift, per_group, rows, chunk, epsilon, part_ranges):
  xs = refs[:num_parts]
  shift_ref, scale_ref, bias_ref = (refs[num_parts] if has_shift else None,
                                    *refs[num_parts + has_shift:num_parts + has_shift + 2])
  out_ref, mean_ref, rstd_ref = refs[num_parts + has_shift + 2:]
  j = pl.program_id(1)
  shift = shift_ref[...].astype(jnp.float32) if has_shift else 0.0
  scale, bias = scale_ref[...].astype(jnp.float32), bias_ref[...].astype(jnp.float32)
  count = rows * per_group

  def accumulate(x):
    v = x.astype(jnp.float32) + shift
    return v, v * v

  def between(totals):
    mean = _group_sum(totals[0], per_group) / count
    var = jnp.maximum(_group_sum(totals[1], per_group) / count - mean * mean, 0.0)
    return mean, jax.lax.rsqrt(var + epsilon)

  def write(r, x, stats, carry):
    mean, rstd = stats
    y = (x.astype(jnp.float32) + shift - mean) * (rstd * scale) + bias
    out_ref[r, :] = (y * jax.nn.sigmoid(y)).astype(out_ref.dtype)
    return carry

  for x_ref, (lo, hi) in zip(xs, part_ranges):
    @pl.when((j >= lo) & (j < hi))
    def _(x_ref=x_ref):
      (mean, rstd), _ = _two_passes(rows, chunk, lambda r: x_ref[r, :], accumulate, between,
                                    write, 0)
      mean_ref[...], rstd_ref[...] = mean, rstd


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

  def grads(loaded):
    """(x̂, ∂L/∂y) of a chunk: ∂L/∂y = ct · (s + y s (1 − s)), y = x̂ · scale + bias,
    s = sigmoid(y)."""
    x, ct = loaded
    xhat = (x.astype(jnp.float32) + shift - mean) * rstd
    y = xhat * scale + bias
    s = jax.nn.sigmoid(y)
    return xhat, ct.astype(jnp.float32) * (s + y * s * (1.0 - s))

  def accumulate(loaded):
    xhat, gy = grads(loaded)
    return gy, gy * xhat

  def between(totals):
    # ∂L/∂x̂ = ∂L/∂y · scale; dv = r_g (∂L/∂x̂ − mean_g(∂L/∂x̂) − x̂ mean_g(∂L/∂x̂ · x̂)).
    gy_sum, gy_xhat_sum = totals
    return (gy_sum, gy_xhat_sum, _group_sum(gy_sum * scale, per_group) / count,
            _group_sum(gy_xhat_sum * scale, per_group) / count)

  for x_ref, dx_ref, (lo, hi) in zip(xs, dxs, part_ranges):
    @pl.when((j >= lo) & (j < hi))
    def _(x_ref=x_ref, dx_ref=dx_ref):
      def write(r, loaded, ctx, dshift):
        xhat, gy = grads(loaded)
        dv = rstd * (gy * scale - ctx[2] - xhat * ctx[3])
        dx_ref[r, :] = dv.astype(dx_ref.dtype)
        return dshift + dv.sum(0)
      ctx, dshift = _two_passes(rows, chunk, lambda r: (x_ref[r, :], ct_ref[r, :]), accumulate,
                                between, write, jnp.zeros(scale.shape, jnp.float32))
      dbias_ref[...], dscale_ref[...] = ctx[0], ctx[1]
      if has_shift:
        dshift_ref[...] = dshift


def _call(kernel, name, parts, block, arrays, in_kinds, out_shapes, out_kinds, **kw):
  """pallas_call of ``kernel`` over the grid (B, channel blocks) on ``arrays``. The kinds say how
  each input and output is blocked: "parts" (one array [B, H·W, C_k] per part, each blocked as
  :func:`_part_blocks` says), "image" ([B, H·W, C], all channels), "per_example" ([B, C]) or
  "per_channel" ([C])."""
  batch, rows = parts[0].shape[0], parts[0].shape[1] * parts[0].shape[2]
  part_blocks = _part_blocks(parts, block)
  specs = {
      "parts": [pl.BlockSpec((None, rows, block), index) for index, _, _ in part_blocks],
      "image": [pl.BlockSpec((None, rows, block), lambda b, j: (b, 0, j))],
      "per_example": [pl.BlockSpec((None, block), lambda b, j: (b, j))],
      "per_channel": [pl.BlockSpec((block,), lambda b, j: (j,))],
  }
  flat = lambda a: a.reshape(a.shape[0], rows, a.shape[-1]) if a.ndim == 4 else a  # noqa: E731
  return pl.pallas_call(
      functools.partial(kernel, num_parts=len(parts), rows=rows,
                        part_ranges=[(lo, hi) for _, lo, hi in part_blocks], **kw),
      grid=(batch, part_blocks[-1][2]),
      in_specs=[spec for kind in in_kinds for spec in specs[kind]],
      out_specs=[spec for kind in out_kinds for spec in specs[kind]], out_shape=out_shapes,
      compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=_interpret(), name=f"{KERNEL_NAME}_{name}",
  )(*[flat(a) for a in arrays])


def _batch_parallel(fn: Callable, num_static: int) -> Callable:
  """fn(*static, *arrays) -> tuple of arrays, with a rule for XLA's partitioner: under data
  parallelism each device runs fn on its shard of the leading (batch) axis of every array of rank
  >= 2, taking the arrays of rank 1 and every other axis whole. (Without it the partitioner
  cannot see into a kernel and would gather the whole batch onto every device.)"""
  wrapped = custom_partitioning(fn, static_argnums=tuple(range(num_static)))
  spec = lambda axis, ndim: P(axis, *[None] * (ndim - 1)) if ndim >= 2 else P()  # noqa: E731

  def batch_axis(arg_shapes):
    first = arg_shapes[0].sharding.spec
    return first[0] if len(first) else None

  def infer(*args):
    *_, mesh, arg_shapes, result_shape = args
    axis = batch_axis(arg_shapes)
    return tuple(NamedSharding(mesh, spec(axis, len(r.shape))) for r in result_shape)

  def partition(*args):
    *static, mesh, arg_shapes, result_shape = args
    axis = batch_axis(arg_shapes)
    return (mesh, functools.partial(fn, *static),
            tuple(NamedSharding(mesh, spec(axis, len(r.shape))) for r in result_shape),
            tuple(NamedSharding(mesh, spec(axis, len(a.shape))) for a in arg_shapes))

  def rule(*args):
    *_, value_types, result_types = args
    whole = []

    def dims(value_type):
      rank = len(ir.ShapedType(value_type).shape)
      names = [f"w{len(whole) + i}" for i in range(rank - (rank >= 2))]
      whole.extend(names)
      return " ".join(["b"] * (rank >= 2) + names)
    operands = ", ".join(dims(t) for t in value_types)
    results = ", ".join(dims(t) for t in result_types)
    return f"{operands} -> {results}", {"need_replication_factors": tuple(whole)}

  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=rule)
  return wrapped


def _forward_arrays(groups, epsilon, dtype, num_parts, has_shift, *arrays):
  """(output [B, H, W, C] in ``dtype``, μ_g and r_g per channel [B, C] in fp32) of the arrays
  (parts..., [shift], scale, bias)."""
  parts = arrays[:num_parts]
  per_group, block, chunk = _layout(parts, groups)
  batch, hgt, wid = parts[0].shape[:3]
  channels = sum(p.shape[-1] for p in parts)
  stats = jax.ShapeDtypeStruct((batch, channels), jnp.float32)
  out, mean, rstd = _call(
      _forward_kernel, "forward", parts, block, arrays,
      ["parts", *["per_example"] * has_shift, "per_channel", "per_channel"],
      [jax.ShapeDtypeStruct((batch, hgt * wid, channels), dtype), stats, stats],
      ["image", "per_example", "per_example"],
      has_shift=has_shift, per_group=per_group, chunk=chunk, epsilon=epsilon)
  return out.reshape(batch, hgt, wid, channels), mean, rstd


def _backward_arrays(groups, num_parts, has_shift, *arrays):
  """(dparts..., per-example sums [B, C] for dscale and dbias, [dshift]) of the arrays (parts...,
  [shift], scale, bias, μ, r, cotangent)."""
  parts = arrays[:num_parts]
  per_group, block, chunk = _layout(parts, groups)
  per_example = jax.ShapeDtypeStruct(arrays[-2].shape, jnp.float32)
  outs = _call(
      _backward_kernel, "backward", parts, block, arrays,
      ["parts", *["per_example"] * has_shift, "per_channel", "per_channel", "per_example",
       "per_example", "image"],
      [jax.ShapeDtypeStruct((p.shape[0], p.shape[1] * p.shape[2], p.shape[3]), p.dtype)
       for p in parts] + [per_example] * (2 + has_shift),
      ["parts", *["per_example"] * (2 + has_shift)],
      has_shift=has_shift, per_group=per_group, chunk=chunk)
  return (*(d.reshape(p.shape) for d, p in zip(outs, parts)), *outs[num_parts:])


_forward_partitioned = _batch_parallel(_forward_arrays, 5)
_backward_partitioned = _batch_parallel(_backward_arrays, 3)


def _forward(groups, epsilon, dtype, parts, shift, scale, bias):
  arrays = (*parts, *[shift] * (shift is not None), scale, bias)
  return _forward_partitioned(groups, epsilon, dtype, len(parts), shift is not None, *arrays)


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
  has_shift = shift is not None
  outs = _backward_partitioned(groups, len(parts), has_shift,
                               *parts, *[shift] * has_shift, scale, bias, mean, rstd, ct)
  n = len(parts)
  dscale, dbias = outs[n].sum(0).astype(scale.dtype), outs[n + 1].sum(0).astype(bias.dtype)
  return outs[:n], outs[n + 2].astype(shift.dtype) if has_shift else None, dscale, dbias


group_norm_swish.defvjp(_vjp_forward, _vjp_backward)
