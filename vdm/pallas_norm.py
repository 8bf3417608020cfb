"""GroupNorm + swish as fused Pallas (Triton) kernels, forward and backward.

out = swish(x̂ · scale + bias), x̂ = (v − μ_g) r_g, r_g = 1/√(E_g[(v − μ_g)²] + ε),
v = concat(parts) + shift[:, None, None, :], with μ_g and E_g over H, W and the channels of each
of the ``groups`` groups: the function :func:`vdm.nets.group_norm_swish` computes with XLA.

XLA computes a GroupNorm as a reduction that reads v and an elementwise pass that reads it again;
its derivative reads v and the cotangent in a reduction and again to apply them. Here one program
owns one example's H·W rows of a block of channels (whole groups), and one kernel computes the
statistics and the output. A block that fits in registers (the forward kernel's 32×32 images in
blocks of 16 channels) is loaded once; a larger one is read twice in chunks of rows, the second
time mostly from the GPU's L2 cache. The backward kernel recomputes x̂ from v and the statistics,
reads the cotangent, and writes dv and its sums for the shift, the scale and the bias the same
way (in chunks, since it holds twice as much). Dropout, when asked for, happens inside both
kernels, from a hash of each element's index and its example's seed, so its mask is neither
drawn by a separate kernel nor stored. The concatenation of two parts is never formed: each
part's channel blocks are read from it.

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
from jax.interpreters.mlir import ir
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.typing import DTypeLike

try:  # deprecated (jax 0.11.2 and 0.12 warn), to be removed: vdm must import without it
  from jax.experimental.pallas import triton as plt
except ImportError:
  plt = None

# The most channels one program owns, and the most elements of one input it holds in registers
# at once. A program whose whole block fits reads it once; a larger one reads it in chunks of rows
# twice, the second time mostly from L2. The backward kernel holds two inputs and two fp32 values
# derived from them. Compiled offline for sm_90 (Triton 3.9, ptxas; experiments/RESULTS.md), the
# 8-warp backward kernel of the CIFAR-10 net needed 246 registers per thread holding 16,384
# elements (one program per SM), 173 in chunks of 4,096 with dropout, and 128 (two programs per
# SM) in chunks of 2,048; the forward kernel needs 128 holding 16,384.
MAX_BLOCK_CHANNELS = 32
MIN_BLOCK_CHANNELS = 16  # 32 bytes of bf16 per row: one memory sector
HELD_FORWARD = 16384
HELD_BACKWARD = 2048
NUM_WARPS = 8
# The kernels' names start with this (profiles count their time apart: vdm.benchmark.KERNEL_KINDS).
KERNEL_NAME = "vdm_norm_swish"


def group_channels(parts: Sequence[jax.Array], groups: int) -> int:
  """The channel count of ``parts``, or a one-line ValueError if it does not split into
  ``groups`` groups."""
  channels = sum(p.shape[-1] for p in parts)
  if channels % groups:
    raise ValueError(f"{channels} channels do not split into {groups} groups: use a multiple of "
                     f"{groups} channels.")
  return channels


def check_dropout(dropout: float, seeds: Optional[jax.Array], batch: int) -> None:
  """A one-line ValueError unless 0 <= dropout < 1 and, with dropout, ``seeds`` are uint32
  [batch, 1], one per example, as the kernels' masks (:func:`dropout_keep_mask`) take them."""
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout={dropout} must be in [0, 1).")
  if dropout and (seeds is None or seeds.shape != (batch, 1) or seeds.dtype != jnp.uint32):
    raise ValueError(f"dropout={dropout} needs seeds: uint32 [{batch}, 1], one per example "
                     "(jax.random.bits).")


def dropout_seeds(module, batch: int, dropout: float) -> Optional[jax.Array]:
  """One uint32 seed per example [batch, 1] from ``module``'s 'dropout' rng, or None without
  dropout: what the kernels' masks take."""
  return (jax.random.bits(module.make_rng("dropout"), (batch, 1), jnp.uint32) if dropout
          else None)


def _layout(parts: Sequence[jax.Array], groups: int, held: int) -> tuple[int, int, int]:
  """(channels per group, channels per program, rows per chunk) for ``parts``, or a one-line
  ValueError naming what the kernels cannot tile. The block of channels is a power of two that
  holds whole groups and divides each part, halved (not below MIN_BLOCK_CHANNELS) until one
  example's H·W rows of it fit in ``held`` elements."""
  channels = group_channels(parts, groups)
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
  while (rows * block > held and block // 2 >= max(per_group, MIN_BLOCK_CHANNELS)
         and fits(block // 2)):
    block //= 2
  chunk = 1
  while chunk * 2 * block <= held and rows % (chunk * 2) == 0:
    chunk *= 2
  return per_group, block, chunk


def use_interpreter() -> bool:
  """Whether the kernels run in Pallas's interpreter (the CPU) or compiled by Triton (a GPU);
  refuses other backends, and a jax that has dropped Pallas's Triton backend."""
  impls = "model.norm_impl='pallas' and 'pallas_conv'"
  if plt is None:
    raise ValueError(f"{impls} need Pallas's Triton backend, which jax {jax.__version__} no "
                     "longer has: use model.norm_impl='recompute', or jax <= 0.12.")
  backend = jax.default_backend()
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"{impls} have Triton kernels for GPUs (and Pallas's interpreter on the "
                     f"CPU), not for {backend}: use model.norm_impl='recompute'.")
  return backend == "cpu"


def call_options(num_warps: int, num_stages: int) -> dict:
  """pallas_call's keywords for this module's kernels and vdm.pallas_conv's."""
  return dict(interpret=use_interpreter(),
              compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def _group_sum(s: jax.Array, per_group: int) -> jax.Array:
  """Each channel's group total of the per-channel sums s [block]: Σ over its group's channels."""
  n = s.shape[0]
  same = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) // per_group
          == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1) // per_group)
  return jnp.sum(jnp.where(same, s[None, :], 0.0), axis=1)


def _part_blocks(parts, block) -> list[tuple[Callable, int, int]]:
  """For each part: the map (j, b) -> its block of the global channel block j (clamped into the
  part; only the programs of the part's own blocks read or write it), and the range [lo, hi) of
  the global channel blocks it holds."""
  out, start = [], 0
  for p in parts:
    n = p.shape[-1] // block
    out.append((functools.partial(
        lambda j, b, start, n: (b, 0, jnp.clip(j - start, 0, n - 1)), start=start, n=n),
        start, start + n))
    start += n
  return out


def _two_passes(rows: int, chunk: int, load, accumulate, between, write, init):
  """Two passes over one program's block of rows, in chunks of ``chunk`` rows r: totals =
  Σ_r accumulate(r, load(r)) (summed over each chunk's rows); ctx = between(totals);
  then carry = write(r, load(r), ctx, carry) from ``init`` for each chunk. Returns (ctx, carry).
  When the chunk is the whole block it is loaded once for both passes."""
  if chunk == rows:
    every = pl.ds(0, rows)
    values = load(every)
    ctx = between(tuple(a.sum(0) for a in accumulate(every, values)))
    return ctx, write(every, values, ctx, init)

  def first(i, totals):
    r = pl.ds(i * chunk, chunk)
    return tuple(t + a.sum(0) for t, a in zip(totals, accumulate(r, load(r))))
  zeros = tuple(jnp.zeros(a.shape[1:], a.dtype)
                for a in jax.eval_shape(lambda: accumulate(pl.ds(0, chunk), load(pl.ds(0, chunk)))))
  ctx = between(jax.lax.fori_loop(0, rows // chunk, first, zeros))

  def second(i, carry):
    r = pl.ds(i * chunk, chunk)
    return write(r, load(r), ctx, carry)
  return ctx, jax.lax.fori_loop(0, rows // chunk, second, init)


def _keep(seed: jax.Array, row: jax.Array, channel: jax.Array, channels: int,
          rate: float) -> jax.Array:
  """Dropout's keep mask, P(keep) = 1 − rate: h ≥ rate · 2³², h = fmix32(i · 0x9E3779B1 ⊕ seed)
  (MurmurHash3's finaliser) of the element's index i = row · channels + channel in its example
  and the example's 32-bit seed. The backward kernel recomputes it from the same seed."""
  h = (row * channels + channel).astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ seed
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return (h ^ (h >> 16)) >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def dropout_keep_mask(seeds: jax.Array, shape: Sequence[int], rate: float) -> jax.Array:
  """The keep mask [B, H, W, C] that the kernels draw with ``dropout=rate`` and ``seeds`` [B, 1]."""
  batch, hgt, wid, channels = shape
  row = jnp.arange(hgt * wid).reshape(1, hgt, wid, 1)
  channel = jnp.arange(channels).reshape(1, 1, 1, channels)
  return _keep(seeds.reshape(batch, 1, 1, 1), row, channel, channels, rate)


def _chunk_keep(refs, r, j, block, channels, rate):
  """The keep mask of the rows ``r`` of the program's channel block j."""
  shape = (r.size, block)
  row = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + r.start
  channel = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + j * block
  return _keep(refs["seeds"][...], row, channel, channels, rate)


def _forward_kernel(refs, *, has_shift, dropout, per_group, rows, chunk, block, channels, epsilon,
                    part_ranges):
  """One program: the statistics and the output (with dropout) of its example's channel block."""
  j = pl.program_id(0)
  shift = refs["shift"][...].astype(jnp.float32) if has_shift else 0.0
  scale, bias = refs["scale"][...].astype(jnp.float32), refs["bias"][...].astype(jnp.float32)
  count = rows * per_group

  def statistics(x_ref):
    """(accumulate, between) of the sums of u = v − k, k each channel's first value: u's sums
    lose no digits to a group mean large next to the group's spread (E[v²] − μ² would)."""
    k = (x_ref[pl.ds(0, 1), :].astype(jnp.float32) + shift)[0]

    def accumulate(r, x):
      u = x.astype(jnp.float32) + shift - k
      return u, u * u

    def between(totals):
      # Σ_rows (v − μ)² = Σ_rows u² + 2 d Σ_rows u + rows d², d = k − μ, per channel.
      s1, s2 = totals
      mean = _group_sum(s1 + rows * k, per_group) / count
      d = k - mean
      var = jnp.maximum(_group_sum(s2 + 2.0 * d * s1 + rows * d * d, per_group) / count, 0.0)
      return mean, jax.lax.rsqrt(var + epsilon)
    return accumulate, between

  def write(r, x, stats, carry):
    mean, rstd = stats
    y = (x.astype(jnp.float32) + shift - mean) * (rstd * scale) + bias
    out = y * jax.nn.sigmoid(y)
    if dropout:
      out = jnp.where(_chunk_keep(refs, r, j, block, channels, dropout), out / (1.0 - dropout), 0.0)
    refs["out"][r, :] = out.astype(refs["out"].dtype)
    return carry

  for x_ref, (lo, hi) in zip(refs["parts"], part_ranges):
    @pl.when((j >= lo) & (j < hi))
    def _(x_ref=x_ref):
      (mean, rstd), _ = _two_passes(rows, chunk, lambda r: x_ref[r, :], *statistics(x_ref),
                                    write, 0)
      refs["mean"][...], refs["rstd"][...] = mean, rstd


def _backward_kernel(refs, *, has_shift, dropout, per_group, rows, chunk, block, channels,
                     part_ranges):
  """One program: the gradients of its example's channel block, and its sums for the shift, the
  scale and the bias."""
  j = pl.program_id(0)
  shift = refs["shift"][...].astype(jnp.float32) if has_shift else 0.0
  scale, bias = refs["scale"][...].astype(jnp.float32), refs["bias"][...].astype(jnp.float32)
  mean, rstd = refs["mean"][...], refs["rstd"][...]
  count = rows * per_group

  def grads(r, loaded):
    """(x̂, ∂L/∂y) of a chunk: ∂L/∂y = ct' · (s + y s (1 − s)), y = x̂ · scale + bias,
    s = sigmoid(y), ct' the cotangent through dropout (kept / (1 − rate), else 0)."""
    x, ct = loaded
    xhat = (x.astype(jnp.float32) + shift - mean) * rstd
    y = xhat * scale + bias
    s = jax.nn.sigmoid(y)
    ct = ct.astype(jnp.float32)
    if dropout:
      ct = jnp.where(_chunk_keep(refs, r, j, block, channels, dropout), ct / (1.0 - dropout), 0.0)
    return xhat, ct * (s + y * s * (1.0 - s))

  def between(totals):
    # ∂L/∂x̂ = ∂L/∂y · scale; dv = r_g (∂L/∂x̂ − mean_g(∂L/∂x̂) − x̂ mean_g(∂L/∂x̂ · x̂)).
    gy_sum, gy_xhat_sum = totals
    return (gy_sum, gy_xhat_sum, _group_sum(gy_sum * scale, per_group) / count,
            _group_sum(gy_xhat_sum * scale, per_group) / count)

  for x_ref, dx_ref, (lo, hi) in zip(refs["parts"], refs["dparts"], part_ranges):
    @pl.when((j >= lo) & (j < hi))
    def _(x_ref=x_ref, dx_ref=dx_ref):
      def accumulate(r, loaded):
        xhat, gy = grads(r, loaded)
        return gy, gy * xhat

      def write(r, loaded, ctx, dshift):
        xhat, gy = grads(r, loaded)
        dv = rstd * (gy * scale - ctx[2] - xhat * ctx[3])
        dx_ref[r, :] = dv.astype(dx_ref.dtype)
        return dshift + dv.sum(0)
      ctx, dshift = _two_passes(rows, chunk, lambda r: (x_ref[r, :], refs["ct"][r, :]),
                                accumulate, between, write, jnp.zeros(scale.shape, jnp.float32))
      refs["dbias"][...], refs["dscale"][...] = ctx[0], ctx[1]
      if has_shift:
        refs["dshift"][...] = dshift


def _call(kernel, name, parts, block, inputs, outputs, **kw):
  """pallas_call of ``kernel(refs, **kw)`` over the grid (channel blocks, B), the channel blocks
  fastest, so that programs launched together read neighbouring bytes of each row. ``inputs`` are
  (name, kind, array) and ``outputs`` (name, kind, ShapeDtypeStruct); ``refs`` maps the names to
  their refs. The kind says how an array is blocked: "parts" (a tuple of arrays [B, H·W, C_k],
  one per part, each blocked as :func:`_part_blocks` says), "image" ([B, H·W, C], all channels),
  "per_example" ([B, C]), "seed" ([B, 1]) or "per_channel" ([C])."""
  batch, rows = parts[0].shape[0], parts[0].shape[1] * parts[0].shape[2]
  part_blocks = _part_blocks(parts, block)
  specs = {
      "parts": [pl.BlockSpec((None, rows, block), index) for index, _, _ in part_blocks],
      "image": [pl.BlockSpec((None, rows, block), lambda j, b: (b, 0, j))],
      "per_example": [pl.BlockSpec((None, block), lambda j, b: (b, j))],
      "seed": [pl.BlockSpec((None, 1), lambda j, b: (b, 0))],
      "per_channel": [pl.BlockSpec((block,), lambda j, b: (j,))],
  }
  def body(*refs):
    it, named = iter(refs), {}
    for ref_name, kind, _ in [*inputs, *outputs]:
      named[ref_name] = [next(it) for _ in parts] if kind == "parts" else next(it)
    kernel(named, rows=rows, block=block, part_ranges=[(lo, hi) for _, lo, hi in part_blocks], **kw)

  flat = lambda a: a.reshape(a.shape[0], rows, a.shape[-1]) if len(a.shape) == 4 else a  # noqa: E731
  arrays = [a for _, kind, v in inputs for a in (v if kind == "parts" else (v,))]
  out_shapes = [o for _, kind, v in outputs for o in (v if kind == "parts" else (v,))]
  return pl.pallas_call(
      body, grid=(part_blocks[-1][2], batch),
      in_specs=[spec for _, kind, _ in inputs for spec in specs[kind]],
      out_specs=[spec for _, kind, _ in outputs for spec in specs[kind]], out_shape=out_shapes,
      name=f"{KERNEL_NAME}_{name}", **call_options(NUM_WARPS, num_stages=1),
  )(*[flat(a) for a in arrays])


def _batch_parallel(fn: Callable, num_static: int, whole: Sequence[int] = ()) -> Callable:
  """fn(*static, *arrays) -> tuple of arrays, with a rule for XLA's partitioner: under data
  parallelism each device runs fn on its shard of the leading (batch) axis of every array of rank
  >= 2, taking the arrays of rank 1, those at the positions ``whole`` among ``arrays``, and every
  other axis whole. (Without it the partitioner cannot see into a kernel and would gather the
  whole batch onto every device.)"""
  wrapped = custom_partitioning(fn, static_argnums=tuple(range(num_static)))
  batched = lambda k, ndim: ndim >= 2 and k not in whole  # noqa: E731
  spec = lambda axis, k, ndim: (P(axis, *[None] * (ndim - 1)) if batched(k, ndim)  # noqa: E731
                                else P(*[None] * ndim))

  def batch_axis(arg_shapes):
    first = next(a.sharding.spec for k, a in enumerate(arg_shapes) if batched(k, len(a.shape)))
    return first[0] if len(first) else None

  def shardings(mesh, axis, shapes, positions):
    return tuple(NamedSharding(mesh, spec(axis, k, len(a.shape)))
                 for k, a in zip(positions, shapes))

  def infer(*args):
    *_, mesh, arg_shapes, result_shape = args
    return shardings(mesh, batch_axis(arg_shapes), result_shape, [-1] * len(result_shape))

  def partition(*args):
    *static, mesh, arg_shapes, result_shape = args
    axis = batch_axis(arg_shapes)
    return (mesh, functools.partial(fn, *static),
            shardings(mesh, axis, result_shape, [-1] * len(result_shape)),
            shardings(mesh, axis, arg_shapes, range(len(arg_shapes))))

  def rule(*args):
    *_, value_types, result_types = args
    names = []

    def dims(k, value_type):
      rank = len(ir.ShapedType(value_type).shape)
      lead = batched(k, rank)
      new = [f"w{len(names) + i}" for i in range(rank - lead)]
      names.extend(new)
      return " ".join(["b"] * lead + new)
    operands = ", ".join(dims(k, t) for k, t in enumerate(value_types))
    results = ", ".join(dims(-1, t) for t in result_types)
    return f"{operands} -> {results}", {"need_replication_factors": tuple(names)}

  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=rule)
  return wrapped


def _flat(parts, shift, seeds, *rest) -> tuple:
  """(parts..., [shift], [seeds], rest...): the arrays the partitioned kernels take."""
  return (*parts, *[shift] * (shift is not None), *[seeds] * (seeds is not None), *rest)


def _unflat(arrays, num_parts, has_shift, dropout) -> tuple:
  """(parts, shift or None, seeds or None, [rest...]) of :func:`_flat`'s arrays."""
  parts, rest = arrays[:num_parts], list(arrays[num_parts:])
  shift = rest.pop(0) if has_shift else None
  seeds = rest.pop(0) if dropout else None
  return parts, shift, seeds, rest


def _inputs(parts, shift, seeds, scale, bias):
  """The inputs both kernels read, as :func:`_call` takes them."""
  return ([("parts", "parts", parts)] + [("shift", "per_example", shift)] * (shift is not None)
          + [("seeds", "seed", seeds)] * (seeds is not None)
          + [("scale", "per_channel", scale), ("bias", "per_channel", bias)])


def _forward_arrays(groups, epsilon, dtype, dropout, num_parts, has_shift, *arrays):
  """(output [B, H, W, C] in ``dtype``, μ_g and r_g per channel [B, C] in fp32) of the arrays
  (parts..., [shift], [seeds], scale, bias)."""
  parts, shift, seeds, rest = _unflat(arrays, num_parts, has_shift, dropout)
  per_group, block, chunk = _layout(parts, groups, HELD_FORWARD)
  batch, hgt, wid = parts[0].shape[:3]
  channels = sum(p.shape[-1] for p in parts)
  stats = jax.ShapeDtypeStruct((batch, channels), jnp.float32)
  out, mean, rstd = _call(
      _forward_kernel, "forward", parts, block, _inputs(parts, shift, seeds, *rest),
      [("out", "image", jax.ShapeDtypeStruct((batch, hgt * wid, channels), dtype)),
       ("mean", "per_example", stats), ("rstd", "per_example", stats)],
      has_shift=has_shift, dropout=dropout, per_group=per_group, chunk=chunk, channels=channels,
      epsilon=epsilon)
  return out.reshape(batch, hgt, wid, channels), mean, rstd


def _backward_arrays(groups, dropout, num_parts, has_shift, *arrays):
  """(dparts..., per-example sums [B, C] for dscale and dbias, [dshift]) of the arrays (parts...,
  [shift], [seeds], scale, bias, μ, r, cotangent)."""
  parts, shift, seeds, (scale, bias, mean, rstd, ct) = _unflat(arrays, num_parts, has_shift,
                                                                dropout)
  per_group, block, chunk = _layout(parts, groups, HELD_BACKWARD)
  sums = jax.ShapeDtypeStruct(mean.shape, jnp.float32)
  outs = _call(
      _backward_kernel, "backward", parts, block,
      _inputs(parts, shift, seeds, scale, bias)
      + [("mean", "per_example", mean), ("rstd", "per_example", rstd), ("ct", "image", ct)],
      [("dparts", "parts", [jax.ShapeDtypeStruct((p.shape[0], p.shape[1] * p.shape[2], p.shape[3]),
                                                 p.dtype) for p in parts]),
       ("dscale", "per_example", sums), ("dbias", "per_example", sums)]
      + [("dshift", "per_example", sums)] * has_shift,
      has_shift=has_shift, dropout=dropout, per_group=per_group, chunk=chunk,
      channels=sum(p.shape[-1] for p in parts))
  return (*(d.reshape(p.shape) for d, p in zip(outs, parts)), *outs[num_parts:])


_forward_partitioned = _batch_parallel(_forward_arrays, 6)
_backward_partitioned = _batch_parallel(_backward_arrays, 4)


def _forward(groups, epsilon, dtype, dropout, parts, shift, seeds, scale, bias):
  return _forward_partitioned(groups, epsilon, dtype, dropout, len(parts), shift is not None,
                              *_flat(parts, shift, seeds, scale, bias))


def group_norm_swish(groups: int, epsilon: float, dtype: DTypeLike, parts: Sequence[jax.Array],
                     shift: Optional[jax.Array], scale: jax.Array, bias: jax.Array,
                     dropout: float = 0.0, seeds: Optional[jax.Array] = None) -> jax.Array:
  """swish(x̂ · scale + bias) in ``dtype`` (the module docstring's equation), from the fused
  forward kernel, with dropout at rate ``dropout`` (the mask :func:`dropout_keep_mask` of the
  examples' uint32 ``seeds`` [B, 1]); its reverse-mode derivative is the fused backward kernel."""
  check_dropout(dropout, seeds, parts[0].shape[0])
  return _fused(groups, epsilon, dtype, float(dropout), tuple(parts), shift,
                seeds if dropout else None, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(groups, epsilon, dtype, dropout, parts, shift, seeds, scale, bias):
  return _forward(groups, epsilon, dtype, dropout, parts, shift, seeds, scale, bias)[0]


def _vjp_forward(groups, epsilon, dtype, dropout, parts, shift, seeds, scale, bias):
  out, mean, rstd = _forward(groups, epsilon, dtype, dropout, parts, shift, seeds, scale, bias)
  return out, (parts, shift, seeds, scale, bias, mean, rstd)


def _vjp_backward(groups, epsilon, dtype, dropout, residuals, ct):
  parts, shift, seeds, scale, bias, mean, rstd = residuals
  has_shift = shift is not None
  outs = _backward_partitioned(groups, dropout, len(parts), has_shift,
                               *_flat(parts, shift, seeds, scale, bias, mean, rstd, ct))
  n = len(parts)
  dscale, dbias = outs[n].sum(0).astype(scale.dtype), outs[n + 1].sum(0).astype(bias.dtype)
  dshift = outs[n + 2].astype(shift.dtype) if has_shift else None
  return outs[:n], dshift, None, dscale, dbias


_fused.defvjp(_vjp_forward, _vjp_backward)
