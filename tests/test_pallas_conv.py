"""The Pallas convolution with the GroupNorm + swish in its input load (vdm.pallas_conv) against
XLA: the net's own norm (vdm.nets.group_norm_swish) followed by lax's convolution, in fp32, with
the γ shift, dropout's masks, the residual sum, two parts, and tiles that split image rows; its
statistics of the output; the Triton lowering of the CIFAR-10 net's shapes; one-line errors for
what it cannot tile. How fast Triton's code runs only a GPU can tell
(experiments/speed_sweep.py --convs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import nets, pallas_conv, pallas_norm

GROUPS, EPS = 8, 1e-6


def _inputs(part_channels, with_shift, out_channels=16, size=(2, 8, 16), seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  batch = size[0]
  parts = tuple(2.0 * jax.random.normal(keys[i], (*size, c)) + 0.5
                for i, c in enumerate(part_channels))
  channels = sum(part_channels)
  shift = jax.random.normal(keys[2], (batch, channels)) if with_shift else None
  scale = 1.0 + 0.1 * jax.random.normal(keys[3], (channels,))
  bias = 0.1 * jax.random.normal(keys[4], (channels,))
  kernel = jax.random.normal(keys[5], (3, 3, channels, out_channels)) / (3 * channels ** 0.5)
  conv_bias = 0.1 * jax.random.normal(keys[6], (out_channels,))
  residual = jax.random.normal(keys[7], (*size, out_channels))
  return parts, shift, scale, bias, kernel, conv_bias, residual


def _xla(parts, shift, scale, bias, kernel, conv_bias, residual, dropout=0.0, seeds=None):
  """The net's arithmetic: nets.group_norm_swish, the kernels' dropout mask, lax's convolution."""
  h = nets.group_norm_swish(GROUPS, EPS, jnp.float32, parts, shift, scale, bias)
  if dropout:
    h = jnp.where(pallas_norm.dropout_keep_mask(seeds, h.shape, dropout), h / (1 - dropout), 0.0)
  out = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", precision="highest",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv_bias
  return out if residual is None else out + residual


def _fused(parts, shift, scale, bias, kernel, conv_bias, residual, **kw):
  a, c = pallas_conv.norm_affine(*nets.group_statistics(parts, shift, GROUPS, EPS), scale, bias,
                                 shift)
  return pallas_conv.norm_swish_conv(parts, a, c, kernel, conv_bias, residual, **kw)


@pytest.mark.parametrize("part_channels,with_shift,with_residual,size,rows,block,dropout", [
    ((32,), True, True, (2, 8, 16), 32, 16, 0.0),    # a block's conv2: shift, residual, 2 rows
    ((32,), True, True, (2, 8, 16), 16, 32, 0.3),    # dropout; a tile of one row
    ((32,), True, False, (2, 4, 32), 16, 16, 0.3),   # tiles of half a row
    ((16, 32), False, True, (2, 4, 12), 16, 16, 0.0),  # an up block's input and skip; tiles
                                                       # that start inside a row
    ((16, 32), False, False, (2, 8, 16), 128, 16, 0.0),  # ... in one tile
    ((16, 32), False, True, (2, 4, 12), 16, 16, 0.3),  # dropout's mask over both parts' channels
])
def test_matches_the_nets_norm_and_xlas_convolution(part_channels, with_shift, with_residual,
                                                    size, rows, block, dropout):
  parts, shift, scale, bias, kernel, conv_bias, residual = _inputs(part_channels, with_shift,
                                                                   size=size)
  residual = residual if with_residual else None
  seeds = jax.random.bits(jax.random.PRNGKey(5), (size[0], 1), jnp.uint32) if dropout else None
  got, total, total_sq = _fused(parts, shift, scale, bias, kernel, conv_bias, residual,
                                dropout=dropout, seeds=seeds, sums=True, rows=rows, block=block)
  want = _xla(parts, shift, scale, bias, kernel, conv_bias, residual, dropout, seeds)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))
  np.testing.assert_allclose(total, got.sum((1, 2)), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(total_sq, (got * got).sum((1, 2)), rtol=1e-5)


@pytest.mark.parametrize("parts_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_output_is_the_fp32_result_rounded(parts_dtype):
  """Computing in bf16 (bf16 parts, or an fp32 residual stream read as it is): h and the kernel
  are rounded to bf16, their product accumulates in fp32 and the output is rounded once, so it
  is bf16's rounding of the fp32 convolution of the same rounded h and kernel plus the bias and
  the (bf16) residual; its sums are those of the rounded output."""
  parts, shift, scale, bias, kernel, conv_bias, residual = _inputs((32,), True, size=(2, 8, 8))
  parts = tuple(p.astype(parts_dtype) for p in parts)
  residual = residual.astype(jnp.bfloat16)
  a, c = pallas_conv.norm_affine(*nets.group_statistics(parts, shift, GROUPS, EPS), scale, bias,
                                 shift)
  got, total, total_sq = pallas_conv.norm_swish_conv(parts, a, c, kernel, conv_bias, residual,
                                                     dtype=jnp.bfloat16, rows=64, block=32,
                                                     sums=True)
  assert got.dtype == jnp.bfloat16
  h = nets.group_norm_swish(GROUPS, EPS, jnp.bfloat16, parts, shift, scale, bias)
  want = jax.lax.conv_general_dilated(
      h.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32), (1, 1), "SAME",
      precision="highest", dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv_bias + residual
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
  assert err.max() <= 2.0 ** -8 * float(jnp.abs(want).max()), err.max()
  assert err.mean() > 0  # the rounding happened
  # Exactly: h and the kernel rounded to bf16, summed in fp32 (no rounding of partial sums, nor
  # before the residual), rounded once; only a tie broken by the order of the fp32 sum may round
  # the other way.
  assert float(jnp.mean(got != want.astype(jnp.bfloat16))) < 0.01
  # The statistics are those of the output as rounded.
  rounded = np.asarray(got, np.float32)
  np.testing.assert_allclose(total, rounded.sum((1, 2)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(total_sq, (rounded * rounded).sum((1, 2)), rtol=1e-5, atol=1e-4)


def test_lowers_to_one_triton_call_for_the_cifar10_net(monkeypatch, cuda_triton_calls):
  """A conv2 (shift, dropout, residual, sums; into the bf16 or the fp32 residual stream) and an
  up block's conv1 (128 + 128 channels) at batch 128, 32×32, bf16, lower to one Triton call each
  for CUDA (Pallas's lowering; whether
  Triton compiles them needs the GPU)."""
  monkeypatch.setattr(pallas_norm, "use_interpreter", lambda: False)
  spec = jax.ShapeDtypeStruct
  for part_channels, rate, with_residual, out_dtype in (((128,), 0.1, True, jnp.bfloat16),
                                                        ((128,), 0.1, True, jnp.float32),
                                                        ((128, 128), 0.0, False, jnp.bfloat16)):
    channels = sum(part_channels)
    parts = tuple(spec((128, 32, 32, c), jnp.bfloat16) for c in part_channels)

    def fn(parts, a, c, kernel, bias, residual, seeds, rate=rate, with_residual=with_residual,
           out_dtype=out_dtype):
      return pallas_conv.norm_swish_conv(parts, a, c, kernel, bias,
                                         residual.astype(out_dtype) if with_residual else None,
                                         dropout=rate, seeds=seeds if rate else None, sums=True,
                                         out_dtype=out_dtype)
    assert cuda_triton_calls(fn, parts, spec((128, channels), jnp.float32),
                             spec((128, channels), jnp.float32),
                             spec((3, 3, channels, 128), jnp.float32),
                             spec((128,), jnp.float32), spec((128, 32, 32, 128), jnp.bfloat16),
                             spec((128, 1), jnp.uint32)) == 1


def test_what_it_cannot_tile_is_refused_in_one_line():
  parts, shift, scale, bias, kernel, conv_bias, _ = _inputs((32,), False)
  a, c = jnp.ones((2, 32)), jnp.zeros((2, 32))
  cases = [(dict(rows=24), "rows=24 must be a power of two"),
           (dict(rows=256), "rows=256 must be a power of two >= 16 dividing H·W = 128"),
           (dict(block=64), "block=64 must be a power of two >= 16 dividing each input"),
           (dict(block=32, dropout=0.1), "dropout=0.1 needs seeds"),
           (dict(block=32, dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
           (dict(rows=8), "rows=8 must be a power of two >= 16"),  # Triton's dot: 16 at least
           (dict(block=8), "block=8 must be a power of two >= 16")]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message):
      pallas_conv.norm_swish_conv(parts, a, c, kernel, conv_bias, **kw)
  with pytest.raises(ValueError, match="is not \\[3, 3, 32, C_out\\]"):
    pallas_conv.norm_swish_conv(parts, a, c, kernel[:, :, :16], conv_bias, block=32)
  with pytest.raises(ValueError, match="12 output channels.*use model.norm_impl='pallas'"):
    pallas_conv.norm_swish_conv(parts, a, c, kernel[..., :12], conv_bias[:12], block=32)
  with pytest.raises(ValueError, match="8 output channels: .* a power of two >= 16"):
    pallas_conv.norm_swish_conv(parts, a, c, kernel[..., :8], conv_bias[:8], block=32)
  with pytest.raises(ValueError, match=r"kernel \(5, 5, 32, 16\) is not \[3, 3, 32, C_out\]"):
    pallas_conv.norm_swish_conv(parts, a, c, jnp.zeros((5, 5, 32, 16)), conv_bias, block=32)
  two = (parts[0], parts[0][..., :16])  # block 32 divides the first part, not the second
  with pytest.raises(ValueError, match=r"block=32 must .* each input's channels \(32\+16\)"):
    pallas_conv.norm_swish_conv(two, jnp.ones((2, 48)), jnp.zeros((2, 48)),
                                jnp.zeros((3, 3, 48, 16)), conv_bias, block=32)


TWO_DEVICES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, ".")
from vdm import nets

k = jax.random.split(jax.random.PRNGKey(0), 6)
parts = (jax.random.normal(k[0], (4, 8, 8, 32)), jax.random.normal(k[1], (4, 8, 8, 32)))
scale, bias = 1 + 0.1 * jax.random.normal(k[2], (64,)), jnp.zeros(64)
kernel, conv_bias = jax.random.normal(k[3], (3, 3, 64, 16)) / 24, jnp.zeros(16)
ct = jax.random.normal(k[4], (4, 8, 8, 16))
fwd = jax.jit(lambda parts, scale, bias, kernel: nets.group_norm_swish_conv(
    32, 1e-6, jnp.float32, jnp.float32, 0.0, None, parts, None, scale, bias, kernel, conv_bias,
    None))
grad = jax.jit(jax.grad(lambda *a: jnp.sum(ct * fwd(*a)), argnums=(0, 3)))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
sharded = jax.device_put(parts, NamedSharding(mesh, P("data")))
one, two = fwd(parts, scale, bias, kernel), fwd(sharded, scale, bias, kernel)
g1, g2 = grad(parts, scale, bias, kernel), grad(sharded, scale, bias, kernel)
hlo = fwd.lower(sharded, scale, bias, kernel).compile().as_text()
print(json.dumps({
    "max_diff": float(jnp.max(jnp.abs(one - two))),
    "max_grad_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))),
    "forward_collectives": [c for c in ("all-gather", "all-reduce", "all-to-all") if c in hlo],
    "out_sharded": tuple(two.sharding.spec)[:1] == ("data",)}))
"""


def test_data_parallel_convolves_each_shard_on_its_device(on_two_cpu_devices):
  """Two CPU devices, the batch sharded: the same output and gradients as on one device, and a
  forward pass without collectives (the kernel's partitioning rule; per-example statistics)."""
  out = on_two_cpu_devices(TWO_DEVICES)
  assert out["max_diff"] < 1e-5 and out["max_grad_diff"] < 1e-4, out
  assert out["forward_collectives"] == [] and out["out_sharded"], out


def test_the_backwards_xla_rule_is_the_kernels_function_in_bf16_with_dropout():
  """nets.group_norm_swish_conv differentiates XLA's rule of the function its kernel computes:
  in bf16 with dropout both round h once, after dropout, so they agree far inside the bf16
  rounding of h (rounding h twice put them 4e-3 apart)."""
  parts, shift, scale, bias, kernel, conv_bias, residual = _inputs((32,), True, size=(2, 8, 8))
  parts = tuple(p.astype(jnp.bfloat16) for p in parts)
  seeds = jax.random.bits(jax.random.PRNGKey(5), (2, 1), jnp.uint32)
  args = (GROUPS, EPS, jnp.bfloat16, jnp.float32, 0.2, seeds, parts, shift, scale, bias, kernel,
          conv_bias, residual)
  fused, rule = nets.group_norm_swish_conv(*args), nets._norm_conv_rule(*args)
  assert float(jnp.abs(fused - rule).max()) < 1e-3 * float(jnp.abs(rule).max())
