"""The fused Pallas GroupNorm + swish (vdm.pallas_norm) against the XLA rule of the same function
(vdm.nets.group_norm_swish, itself checked against autodiff in test_nets.py): outputs and every
input's gradient, run in Pallas's interpreter on the CPU; the Triton lowering of the CIFAR-10
net's shapes; one-line errors for what the kernels cannot tile. Whether Triton compiles and how
fast it runs only a GPU can tell (experiments/speed_sweep.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import model as model_lib
from vdm import nets, pallas_norm
from vdm.nets import ScoreUNet

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(part_shapes, with_shift, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  parts = tuple(2.0 * jax.random.normal(keys[i], s) + 0.5 for i, s in enumerate(part_shapes))
  channels = sum(s[-1] for s in part_shapes)
  shift = jax.random.normal(keys[3], (part_shapes[0][0], channels)) if with_shift else None
  scale = 1.0 + 0.1 * jax.random.normal(keys[4], (channels,))
  bias = 0.1 * jax.random.normal(keys[5], (channels,))
  return parts, shift, scale, bias


@pytest.mark.parametrize("part_shapes,with_shift", [
    ([(2, 8, 8, 64)], False),                   # 2 channels per group, whole blocks held
    ([(3, 16, 8, 64)], True),                   # the γ shift
    ([(1, 64, 64, 32)], True),                  # 4,096 rows: read in chunks, twice
    ([(2, 4, 4, 64), (2, 4, 4, 64)], False),    # an up block's input and skip, never concatenated
    ([(2, 4, 8, 128), (2, 4, 8, 128)], True),   # 8 channels per group, 4 programs per part
])
def test_matches_the_xla_rule_and_its_gradients(part_shapes, with_shift):
  parts, shift, scale, bias = _inputs(part_shapes, with_shift)
  xla = lambda *a: nets.group_norm_swish(32, 1e-6, jnp.float32, *a)  # noqa: E731
  fused = lambda *a: pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, *a)  # noqa: E731
  out, vjp = jax.vjp(xla, parts, shift, scale, bias)
  got, got_vjp = jax.vjp(fused, parts, shift, scale, bias)
  np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.PRNGKey(9), out.shape)
  got_grads, grads = jax.tree_util.tree_leaves(got_vjp(ct)), jax.tree_util.tree_leaves(vjp(ct))
  # With one channel per group the shift's gradient is 0 up to rounding: tolerances in units of
  # the largest gradient.
  unit = max(float(jnp.max(jnp.abs(b))) for b in grads)
  for a, b in zip(got_grads, grads):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * unit)


def test_dropout_drops_the_hash_masks_elements_forward_and_backward():
  """With dropout the output and every gradient are the XLA rule's through the mask
  ``dropout_keep_mask`` of the seeds (kept / (1 − rate), else 0); the mask keeps 1 − rate of the
  elements, differs between examples, and missing seeds are refused."""
  rate = 0.25
  parts, shift, scale, bias = _inputs([(2, 32, 32, 64)], True)  # backward in chunks of rows
  seeds = jax.random.bits(jax.random.PRNGKey(4), (2, 1), jnp.uint32)
  keep = pallas_norm.dropout_keep_mask(seeds, (2, 32, 32, 64), rate)
  xla = lambda *a: jnp.where(  # noqa: E731
      keep, nets.group_norm_swish(32, 1e-6, jnp.float32, *a) / (1 - rate), 0.0)
  fused = lambda *a: pallas_norm.group_norm_swish(  # noqa: E731
      32, 1e-6, jnp.float32, *a, dropout=rate, seeds=seeds)
  out, vjp = jax.vjp(xla, parts, shift, scale, bias)
  got, got_vjp = jax.vjp(fused, parts, shift, scale, bias)
  np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.PRNGKey(9), out.shape)
  for a, b in zip(jax.tree_util.tree_leaves(got_vjp(ct)), jax.tree_util.tree_leaves(vjp(ct))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
  kept = float(jnp.mean(keep))  # 131,072 draws: standard error 0.0012
  assert abs(kept - (1 - rate)) < 0.01, kept
  assert 0.3 < float(jnp.mean(keep[0] == keep[1])) < 0.9  # independent: 0.625
  with pytest.raises(ValueError, match="needs seeds: uint32"):
    pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, parts, shift, scale, bias, dropout=rate)


def test_bf16_inputs_and_output_round_once():
  """bf16 parts (the convolutions' outputs) in, fp32 statistics, one rounding to bf16 out, and
  bf16 gradients for the parts, fp32 for the shift and the parameters."""
  parts, shift, scale, bias = _inputs([(2, 8, 8, 64)], True)
  parts = tuple(p.astype(jnp.bfloat16) for p in parts)
  out, vjp = jax.vjp(lambda *a: nets.group_norm_swish(32, 1e-6, jnp.bfloat16, *a),
                     parts, shift, scale, bias)
  got, got_vjp = jax.vjp(lambda *a: pallas_norm.group_norm_swish(32, 1e-6, jnp.bfloat16, *a),
                         parts, shift, scale, bias)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), out.astype(jnp.float32), atol=2e-2)
  ct = jax.random.normal(jax.random.PRNGKey(9), out.shape).astype(jnp.bfloat16)
  grads, want = got_vjp(ct), vjp(ct)
  assert [g.dtype for g in jax.tree_util.tree_leaves(grads)] == [jnp.bfloat16, jnp.float32,
                                                                 jnp.float32, jnp.float32]
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()


def test_lowers_to_triton_for_the_cifar10_net(monkeypatch, cuda_triton_calls):
  """The forward and backward kernels at the CIFAR-10 net's shapes (batch 128, 32×32, 128 and
  128 + 128 channels in bf16, with dropout, the fp32 output norm), and at 64×64 (read in chunks),
  lower to Triton calls for CUDA; this checks Pallas's lowering, not Triton's compilation, which
  needs the GPU."""
  monkeypatch.setattr(pallas_norm, "use_interpreter", lambda: False)
  spec = jax.ShapeDtypeStruct
  seeds = spec((128, 1), jnp.uint32)
  for dtype, part_channels, with_shift, size, rate in ((jnp.bfloat16, (128,), True, 32, 0.1),
                                                       (jnp.bfloat16, (128, 128), False, 32, 0.0),
                                                       (jnp.float32, (128,), False, 32, 0.0),
                                                       (jnp.bfloat16, (128,), True, 64, 0.1)):
    channels = sum(part_channels)
    parts = tuple(spec((128, size, size, c), dtype) for c in part_channels)
    shift = spec((128, channels), jnp.float32) if with_shift else None

    def step(parts, shift, seeds, scale, bias, ct, dtype=dtype, rate=rate):
      out, vjp = jax.vjp(lambda *a: pallas_norm.group_norm_swish(
          32, 1e-6, dtype, *a, dropout=rate, seeds=seeds), parts, shift, scale, bias)
      return out, vjp(ct)
    assert cuda_triton_calls(step, parts, shift, seeds, spec((channels,), jnp.float32),
                             spec((channels,), jnp.float32),
                             spec((128, size, size, channels), dtype)) == 2  # forward, backward


TWO_DEVICES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, ".")
from vdm import pallas_norm

keys = jax.random.split(jax.random.PRNGKey(0), 4)
parts = (jax.random.normal(keys[0], (4, 8, 8, 32)), jax.random.normal(keys[1], (4, 8, 8, 32)))
scale, bias = 1 + 0.1 * jax.random.normal(keys[2], (64,)), jnp.zeros(64)
ct = jax.random.normal(keys[3], (4, 8, 8, 64))
loss = lambda parts, scale, bias: jnp.sum(
    ct * pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, parts, None, scale, bias))
grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
sharded = jax.device_put(parts, NamedSharding(mesh, P("data")))
one, two = grad(parts, scale, bias), grad(sharded, scale, bias)
hlo = grad.lower(sharded, scale, bias).compile().as_text()
print(json.dumps({
    "max_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two))),
    "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo,
    "dparts_sharded": [tuple(g.sharding.spec)[:1] == ("data",) for g in two[1][0]]}))
"""


def test_data_parallel_runs_each_shard_on_its_device(on_two_cpu_devices):
  """Two CPU devices, the batch sharded: the same loss and gradients as on one, no all-gather of
  the batch (the kernels' partitioning rule), one all-reduce (the scale and bias gradients)."""
  out = on_two_cpu_devices(TWO_DEVICES)
  assert out["max_diff"] < 1e-4 and not out["all_gather"] and out["all_reduce"], out
  assert out["dparts_sharded"] == [True, True], out


def test_what_the_kernels_cannot_tile_is_refused_in_one_line():
  parts, _, scale, bias = _inputs([(1, 4, 4, 96)], False)  # 3 channels per group
  with pytest.raises(ValueError, match="cannot tile 96 channels in groups of 3.*norm_impl='recompute'"):
    pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, parts, None, scale, bias)
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, (jnp.zeros((1, 2, 2, 48)),), None,
                                 jnp.ones(48), jnp.zeros(48))


def test_validate_warns_that_the_cpu_interprets_the_kernels(caplog):
  """A config asking for the kernels on the CPU is valid (the tests run them), but 20x slower
  than the XLA rule: validate says so, once, and not for the XLA rule."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from vdm import config_checks  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  config = quickstart.get_config()
  for impl in ("autodiff", "pallas"):
    config.model.norm_impl = impl
    config_checks.validate(config)
  said = [r.getMessage() for r in caplog.records if "Pallas's interpreter" in r.getMessage()]
  assert len(said) == 1 and said[0].startswith("model.norm_impl='pallas' on the CPU"), said


WITHOUT_TRITON = r"""
import json, sys
sys.modules["jax.experimental.pallas.triton"] = None  # as in a jax that has dropped it
sys.path.insert(0, ".")
import jax, jax.numpy as jnp
from configs import quickstart
from vdm import config_checks, nets
z, g = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))
nets.ScoreUNet(n_embd=64, n_layer=1).init(jax.random.PRNGKey(0), z, g)  # the XLA norms still run
errors = []
for impl in ("pallas", "pallas_conv"):
  config = quickstart.get_config()
  config.model.norm_impl = impl
  for check in (lambda: config_checks.validate(config),
                lambda: nets.ScoreUNet(n_embd=64, n_layer=1, norm_impl=impl).init(
                    jax.random.PRNGKey(0), z, g)):
    try:
      check()
      errors.append(None)
    except ValueError as e:
      errors.append(str(e))
print(json.dumps(errors))
"""


def test_without_pallas_triton_backend_vdm_imports_and_refuses_only_the_pallas_norms(
    on_two_cpu_devices):
  """jax deprecates Pallas's Triton backend (0.11.2 and 0.12 warn): once a jax drops it, vdm
  still imports and trains with the XLA norms, and the Pallas ones are refused in one line, by
  the config checks and by the net itself. (The script needs one device; the fixture gives two.)"""
  errors = on_two_cpu_devices(WITHOUT_TRITON)
  assert len(errors) == 4
  for e in errors:
    assert e and "need Pallas's Triton backend" in e and "norm_impl='recompute'" in e, e
    assert "\n" not in e


@pytest.mark.parametrize("impl", ["pallas", "pallas_conv"])
def test_the_ode_likelihood_gets_a_forward_differentiable_net_with_the_same_function(impl):
  """model.forward_differentiable swaps the Pallas norms (and convolutions) for the XLA rule: the
  same outputs, and a jvp where the Pallas net has none."""
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  g = jnp.array([-10.0, 3.0])
  net = ScoreUNet(n_embd=64, n_layer=1, norm_impl=impl, remat="convs")
  model = model_lib.Model(net, None, lambda t: t, (8, 8, 3))
  params = jax.jit(net.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(1), z, g)
  swapped = model_lib.forward_differentiable(model)
  assert (swapped.net.norm_impl, swapped.net.remat) == ("recompute", "none")
  apply = lambda net: jax.jit(lambda z: net.apply(params, z, g), compiler_options=FAST_COMPILE)
  np.testing.assert_allclose(apply(swapped.net)(z), apply(net)(z), rtol=1e-5, atol=1e-5)
  jax.jvp(apply(swapped.net), (z,), (z,))
  assert model_lib.forward_differentiable(swapped) is swapped


def _float64_group_norm_swish(groups, epsilon, parts, shift, scale, bias, ct):
  """The module docstring's equation and its reverse-mode derivative (the closed form of
  nets._group_norm_swish_jvp's transpose) in float64 numpy: (out, (dparts, dshift, dscale, dbias))
  for the cotangent ct."""
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  v = np.concatenate([f64(p) for p in parts], -1)
  if shift is not None:
    v = v + f64(shift)[:, None, None, :]
  grouped = v.reshape(v.shape[:3] + (groups, -1))
  axes = (1, 2, 4)
  mean = grouped.mean(axes, keepdims=True)
  rstd = 1.0 / np.sqrt(((grouped - mean) ** 2).mean(axes, keepdims=True) + epsilon)
  xhat = ((grouped - mean) * rstd).reshape(v.shape)
  y = xhat * f64(scale) + f64(bias)
  s = 1.0 / (1.0 + np.exp(-y))
  gy = f64(ct) * (s + y * s * (1.0 - s))
  dxhat, gxhat = (gy * f64(scale)).reshape(grouped.shape), xhat.reshape(grouped.shape)
  dv = (rstd * (dxhat - dxhat.mean(axes, keepdims=True)
                - gxhat * (dxhat * gxhat).mean(axes, keepdims=True))).reshape(v.shape)
  dparts = np.split(dv, np.cumsum([p.shape[-1] for p in parts])[:-1], axis=-1)
  dshift = None if shift is None else dv.sum((1, 2))
  return y * s, (dparts, dshift, (gy * xhat).sum((0, 1, 2)), gy.sum((0, 1, 2)))


@pytest.mark.parametrize("part_shapes,groups,epsilon,offset,spread,tol", [
    # a mean 10³ times the spread: fp32 holds the mean to ~4e-5 of the spread, and E[v²] − μ²
    # (no pivot) would be 10% off
    ([(2, 8, 8, 64)], 32, 1e-6, 100.0, 0.05, 1e-3),
    ([(2, 8, 8, 64)], 32, 0.5, 0.0, 0.3, 1e-5),       # ε as large as the variance, inside the root
    ([(2, 12, 12, 64)], 32, 1e-6, 0.0, 1.0, 1e-5),    # H·W = 144: chunks of 16 rows, none dropped
    ([(2, 4, 4, 32), (2, 4, 4, 16)], 24, 1e-6, 0.0, 1.0, 1e-5),  # unequal parts: blocks of 16
])
def test_matches_a_float64_group_norm_and_its_gradients(part_shapes, groups, epsilon, offset,
                                                         spread, tol):
  """Outputs and every gradient against the float64 closed form (errors in units of the largest
  value), at what the other tests leave out: a mean large next to the spread, an ε that is not
  negligible, H·W not a power of two, and parts of unequal widths."""
  parts, shift, scale, bias = _inputs(part_shapes, True)
  parts, shift = tuple(offset + spread * p for p in parts), spread * shift
  ct = jax.random.normal(jax.random.PRNGKey(9), part_shapes[0][:3] + (scale.shape[0],))
  got, vjp = jax.vjp(lambda *a: pallas_norm.group_norm_swish(groups, epsilon, jnp.float32, *a),
                     parts, shift, scale, bias)
  out, grads = _float64_group_norm_swish(groups, epsilon, parts, shift, scale, bias, ct)
  np.testing.assert_allclose(got, out, rtol=0, atol=tol * np.abs(out).max())
  for a, b in zip(jax.tree_util.tree_leaves(vjp(ct)), jax.tree_util.tree_leaves(grads)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


def test_dropout_refuses_seeds_it_would_hash_differently():
  """The kernels hash uint32 seeds [B, 1]; int32 seeds (sign-extending shifts) or one seed per
  batch would draw another mask than dropout_keep_mask's, and a rate outside [0, 1) none."""
  parts, shift, scale, bias = _inputs([(2, 4, 4, 32)], False)
  seeds = jax.random.bits(jax.random.PRNGKey(4), (2, 1), jnp.uint32)
  for wrong in (seeds.astype(jnp.int32), seeds[:, 0], seeds[:1]):
    with pytest.raises(ValueError, match=r"needs seeds: uint32 \[2, 1\]"):
      pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, parts, shift, scale, bias, dropout=0.1,
                                   seeds=wrong)
  for rate in (-0.1, 1.0):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
      pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, parts, shift, scale, bias,
                                   dropout=rate, seeds=seeds)


def test_each_parts_blocks_are_read_from_inside_it():
  """The index map of each part's blocks stays inside the part for every program of the grid
  (those of the other parts' blocks included, which Triton would otherwise point past the part's
  end; Pallas's interpreter clamps, so the outputs cannot show it)."""
  parts = (jnp.zeros((1, 4, 4, 64)), jnp.zeros((1, 4, 4, 32)), jnp.zeros((1, 4, 4, 16)))
  blocks = pallas_norm._part_blocks(parts, 16)
  assert [(lo, hi) for _, lo, hi in blocks] == [(0, 4), (4, 6), (6, 7)]
  for (index, lo, hi), part in zip(blocks, parts):
    for j in range(blocks[-1][2]):
      b, row, k = index(j, 0)
      assert (b, row) == (0, 0) and 0 <= int(k) < part.shape[-1] // 16, (j, k)
      if lo <= j < hi:
        assert int(k) == j - lo


def test_gradients_take_the_dtypes_of_the_shift_and_parameters():
  """bf16 shift, scale and bias get bf16 gradients (jax.custom_vjp would pass fp32 ones on
  silently), the fp32 sums rounded once."""
  parts, shift, scale, bias = _inputs([(2, 4, 4, 64)], True)  # 2 channels per group
  fn = lambda *a: pallas_norm.group_norm_swish(32, 1e-6, jnp.float32, parts, *a)  # noqa: E731
  ct = jax.random.normal(jax.random.PRNGKey(9), parts[0].shape)
  want = jax.vjp(fn, shift, scale, bias)[1](ct)
  got = jax.vjp(fn, *(a.astype(jnp.bfloat16) for a in (shift, scale, bias)))[1](ct)
  assert [g.dtype for g in got] == [jnp.bfloat16] * 3
  for a, b in zip(got, want):  # the inputs' rounding to bf16, not the gradients', dominates
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0,
                               atol=2e-2 * float(jnp.abs(b).max()))
