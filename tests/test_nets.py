"""The ScoreUNet: shapes and dtypes, the paper's parameter count, the base measure at
initialisation, dropout, bf16 against fp32, remat, and finite gradients. Behaviour tests use
a tiny net (n_embd 64, n_layer 2, attention) on 8×8×3 images, compiled without LLVM
optimisation (compile time dominates on CPU); shape tests only trace (jax.eval_shape)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.benchmark import saved_for_backward_bytes, vjp_residual_bytes
from vdm.nets import (NORM_IMPL, REMAT, AttnBlock, Conv, GroupNormSwish, ResnetBlock, ScoreUNet,
                      SplitDense, fourier_features, group_norm_swish, norm_swish,
                      num_params, param_count, timestep_embedding)

SMALL = dict(n_embd=64, n_layer=2, dropout=0.1, attention=True)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SHAPE = (2, 8, 8, 3)


def _inputs():
  z = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  return z, jnp.array([-10.0, 3.0])


def _jit(f):
  return jax.jit(f, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _apply(net: ScoreUNet, deterministic: bool):
  return _jit(lambda p, z, g, key: net.apply(p, z, g, deterministic=deterministic,
                                            rngs={"dropout": key}))


@pytest.fixture(scope="module")
def init_params():
  z, g = _inputs()
  return _jit(ScoreUNet(**SMALL).init)(jax.random.PRNGKey(1), z, g)


@pytest.fixture(scope="module")
def perturbed(init_params):
  """The initial parameters plus noise, so that the zero-initialised layers are non-zero."""
  rng = np.random.default_rng(2)
  return jax.tree_util.tree_map(
      lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), init_params)


def test_gamma_conditioning_needs_two_channels_per_group():
  """The γ embedding enters each block as a per-channel shift before a 32-group GroupNorm: with
  one channel per group the norm would remove it, and ε̂ would not depend on γ (a change of 1e-6
  measured at n_embd=32), so the net refuses such a width; at 64, ε̂ depends on γ."""
  z, g = _inputs()
  for n_embd, channel_mult in ((32, (1,)), (32, (2, 1, 2)), (48, (2,))):
    with pytest.raises(ValueError, match="n_embd"):
      ScoreUNet(n_embd=n_embd, n_layer=1, channel_mult=channel_mult).init(
          jax.random.PRNGKey(0), z, g)
  net = ScoreUNet(n_embd=64, n_layer=1)
  params = net.init(jax.random.PRNGKey(0), z, g)
  leaves, tree = jax.tree_util.tree_flatten(params)  # away from the zero-initialised layers
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  apply, key = _apply(net, True), jax.random.PRNGKey(2)
  change = jnp.abs(apply(params, z, g + 3.0, key) - apply(params, z, g, key)).max()
  assert change > 1e-2, change


@pytest.mark.parametrize("kwargs", [
    dict(n_layer=1),
    dict(n_layer=2, channel_mult=(1, 2, 2), attention=True),
    dict(n_layer=2, channel_mult=(2, 1), fourier_features=False),
    dict(n_layer=2, dtype="bfloat16", attention=True),
    dict(n_layer=3, channel_mult=(1, 2), remat="full"),
])
def test_output_shape_and_dtype(kwargs):
  net = ScoreUNet(n_embd=64, **kwargs)
  z = jax.ShapeDtypeStruct((3, 16, 16, 3), jnp.float32)
  g = jax.ShapeDtypeStruct((3,), jnp.float32)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), z, g)
  out = jax.eval_shape(lambda p, z, g: net.apply(p, z, g, deterministic=False,
                                                 rngs={"dropout": jax.random.PRNGKey(0)}),
                       params, z, g)
  assert out.shape == z.shape and out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_cifar10_parameter_count():
  """The paper's CIFAR-10 net (n_embd 128, 32 layers, Fourier features, attention only in the
  middle): the published code's 30,578,179 less the 512 weights its dense0 keeps for a class
  input, zero in the unconditional model. Exact: ±0.5 % let the middle attention (66,304) go."""
  net = ScoreUNet(n_embd=128, n_layer=32, dropout=0.1, fourier_features=True, attention=False)
  assert param_count(net, (32, 32, 3)) == 30_578_179 - 512


def test_rejects_bad_inputs():
  net = ScoreUNet(n_embd=64, n_layer=1, channel_mult=(1, 2, 2))
  with pytest.raises(ValueError, match="images of 6×6 for channel_mult=.*multiples of 4"):
    jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="gamma_t has 3 values for a batch of 2 images"):
    jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((2, 4, 4, 3)), jnp.zeros((3,)))
  with pytest.raises(ValueError, match="images"):
    jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 6)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="dtype"):
    jax.eval_shape(ScoreUNet(n_layer=1, dtype="float16").init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)))
  for kwargs, match in [(dict(n_layer=0), "n_layer=0"), (dict(n_layer=-1), "n_layer=-1"),
                        (dict(n_layer=1, channel_mult=()), "channel_mult=()"),
                        (dict(n_layer=1, channel_mult=(1, 0)), r"channel_mult=\(1, 0\)")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(ScoreUNet(n_embd=64, **kwargs).init, jax.random.PRNGKey(0),
                     jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)))


def test_embeddings():
  emb = timestep_embedding(jnp.array([0.0, 0.5]), 7)
  assert emb.shape == (2, 7) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb[0], [0, 0, 0, 1, 1, 1, 0])  # sin 0, cos 0, zero pad
  z = jnp.array([[0.25, -1.0 / 256]])
  f = fourier_features(z, (6, 7))
  np.testing.assert_allclose(f[0, :4], np.sin(2 * np.pi * np.array([16, 32, -0.25, -0.5])), atol=1e-4)


def test_zero_init_output_is_the_base_measure(init_params):
  """All output paths are zero-initialised, so ε̂(z) = z exactly at initialisation."""
  z, g = _inputs()
  net = ScoreUNet(**SMALL)
  for deterministic in (True, False):
    out = _apply(net, deterministic)(init_params, z, g, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(out, z)


def test_dropout_only_in_training(perturbed):
  z, g = _inputs()
  net = ScoreUNet(**SMALL)
  k1, k2 = jax.random.PRNGKey(4), jax.random.PRNGKey(5)
  det = _apply(net, True)
  np.testing.assert_array_equal(det(perturbed, z, g, k1), det(perturbed, z, g, k2))
  train = _apply(net, False)
  np.testing.assert_array_equal(train(perturbed, z, g, k1), train(perturbed, z, g, k1))
  assert not np.allclose(train(perturbed, z, g, k1), train(perturbed, z, g, k2))
  assert not np.allclose(train(perturbed, z, g, k1), det(perturbed, z, g, k1))


def test_conditioning_on_gamma(perturbed):
  """ε̂ depends on γ_t, and a scalar γ is the same as a batch of equal γ."""
  z, _ = _inputs()
  det = _apply(ScoreUNet(**SMALL), True)
  key = jax.random.PRNGKey(0)
  a, b = det(perturbed, z, jnp.full((2,), -5.0), key), det(perturbed, z, jnp.full((2,), 2.0), key)
  assert float(jnp.abs(a - b).max()) > 1e-2  # a γ-blind net (one channel per group) gave 1e-6
  np.testing.assert_allclose(det(perturbed, z, jnp.float32(-5.0), key), a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("residual_dtype", ["bfloat16", "float32"])
def test_bfloat16_close_to_float32(perturbed, residual_dtype):
  z, g = _inputs()
  key = jax.random.PRNGKey(0)
  out32 = _apply(ScoreUNet(**SMALL), True)(perturbed, z, g, key)
  out16 = _apply(ScoreUNet(**SMALL, dtype="bfloat16", residual_dtype=residual_dtype), True)(
      perturbed, z, g, key)
  assert out16.dtype == jnp.float32
  h32, h16 = out32 - z, out16 - z  # the network's part, without the base measure
  assert float(jnp.linalg.norm(h32)) > 0.1 * float(jnp.linalg.norm(z))
  rel = float(jnp.linalg.norm(h16 - h32) / jnp.linalg.norm(h32))
  assert rel < 0.05, rel


@pytest.mark.parametrize("residual_dtype", [jnp.bfloat16, jnp.float32])
def test_residual_stream_dtype(residual_dtype):
  """Layers compute in bf16; the sum leaving a block (the scan carry) has residual_dtype, its
  copy for the way up (the U-Net skip) the compute dtype, and they hold the same values."""
  block = ResnetBlock(out_ch=32, dropout=0.0, deterministic=True, attention=True,
                      dtype=jnp.bfloat16, residual_dtype=residual_dtype)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 32))
  cond = jnp.ones((2, 128), jnp.float32)
  (carry, skip), _ = block.init_with_output(jax.random.PRNGKey(0), x, None, cond)
  assert carry.dtype == residual_dtype and skip.dtype == jnp.bfloat16
  np.testing.assert_array_equal(carry.astype(jnp.bfloat16), skip)
  with pytest.raises(ValueError, match="residual_dtype='float16'"):
    ScoreUNet(**SMALL, residual_dtype="float16").init(jax.random.PRNGKey(0), *_inputs())


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_split_dense_is_dense_of_the_concatenation(dtype, tol):
  """The up blocks' 1×1 shortcut: the parameters nn.Dense would initialise, and its output on the
  concatenated channels (fp32 exactly up to summation order; bf16 within its rounding)."""
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  parts = (jax.random.normal(keys[0], (2, 4, 4, 24)), jax.random.normal(keys[1], (2, 4, 4, 40)))
  split, dense = SplitDense(16, dtype=dtype), nn.Dense(16, dtype=dtype)
  params = split.init(keys[2], parts)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         dense.init(keys[2], jnp.concatenate(parts, -1)))
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
  out, ref = split.apply(params, parts), dense.apply(params, jnp.concatenate(parts, -1))
  assert out.dtype == ref.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


@pytest.mark.parametrize("strides", [1, 2])
def test_conv_is_flax_conv_with_its_bias_gradient_summed_in_fp32(strides):
  """nets.Conv: nn.Conv's parameters and bf16 output, its forward-mode derivative, and a bias
  gradient summed in fp32: 0.01 over 32·16·16 positions (nn.Conv's, summed in bf16 on the CPU,
  stalls far below once 0.01 is under half bf16's spacing)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 16, 16, 8), jnp.bfloat16)
  conv, ref = Conv(8, strides=strides, dtype=jnp.bfloat16), nn.Conv(8, (3, 3), strides=strides,
                                                                    dtype=jnp.bfloat16)
  params = conv.init(jax.random.PRNGKey(1), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref.init(jax.random.PRNGKey(1), x))
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
  np.testing.assert_array_equal(conv.apply(params, x), ref.apply(params, x))
  np.testing.assert_array_equal(jax.jvp(lambda x: conv.apply(params, x), (x,), (x,))[1],
                                jax.jvp(lambda x: ref.apply(params, x), (x,), (x,))[1])
  bias_grad = lambda module: jax.grad(lambda p: jnp.sum(
      module.apply(p, x).astype(jnp.float32) * 0.01))(params)["params"]["bias"]
  exact = float(jnp.bfloat16(0.01)) * 32 * (16 // strides) ** 2  # the cotangent rounds to bf16
  np.testing.assert_allclose(bias_grad(conv), exact, rtol=1e-6)


def test_split_dense_sums_its_bias_gradient_in_fp32():
  parts = (jnp.ones((32, 16, 16, 8), jnp.bfloat16),)
  dense = SplitDense(8, dtype=jnp.bfloat16)
  params = dense.init(jax.random.PRNGKey(1), parts)
  grad = jax.grad(lambda p: jnp.sum(dense.apply(p, parts).astype(jnp.float32) * 0.01))(params)
  np.testing.assert_allclose(grad["params"]["bias"], float(jnp.bfloat16(0.01)) * 32 * 16 * 16,
                             rtol=1e-6)


def _norm_inputs(dtype=jnp.float32):
  """(parts, shift, scale, bias) of a GroupNorm + swish over 2 concatenated parts of 64
  channels, with a non-zero mean, a per-example shift and a non-trivial affine."""
  keys = jax.random.split(jax.random.PRNGKey(11), 5)
  parts = ((2.0 * jax.random.normal(keys[0], (2, 4, 4, 64)) + 1.0).astype(dtype),
           jax.random.normal(keys[1], (2, 4, 4, 64)).astype(dtype))
  return (parts, jax.random.normal(keys[2], (2, 128)),
          1.0 + 0.3 * jax.random.normal(keys[3], (128,)), 0.3 * jax.random.normal(keys[4], (128,)))


def _flax_norm_swish(parts, shift, scale, bias):
  x = jnp.concatenate(parts, -1).astype(jnp.float32) + shift[:, None, None, :]
  return nn.swish(nn.GroupNorm().apply({"params": {"scale": scale, "bias": bias}}, x))


def test_group_norm_swish_and_its_derivatives_are_flax_autodiffs():
  """group_norm_swish against flax's GroupNorm + swish (fp32): the output, the gradients w.r.t.
  the parts, the shift, scale and bias (its written-out rule, transposed), and the JVP (the
  rule itself, as the ODE likelihood's forward mode uses it)."""
  args = _norm_inputs()
  ours = functools.partial(group_norm_swish, 32, 1e-6, jnp.float32)
  ref = _flax_norm_swish(*args)
  np.testing.assert_allclose(ours(*args), ref, rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.PRNGKey(12), ref.shape)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3))(*args)
           for f in (ours, _flax_norm_swish)]
  tangents = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(13), x.shape),
                                    args)
  jvps = [jax.jvp(f, args, tangents)[1] for f in (ours, _flax_norm_swish)]
  pairs = list(zip(*map(jax.tree_util.tree_leaves, grads))) + [tuple(jvps)]
  assert len(pairs) == 6
  for a, b in pairs:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


class _NormSwish(nn.Module):
  impl: str

  @nn.compact
  def __call__(self, parts, shift):
    return norm_swish(parts, shift, jnp.float32, self.impl, "norm")


@pytest.mark.parametrize("with_shift", [False, True])
def test_norms_lose_no_digits_to_a_large_group_mean(with_shift):
  """GroupNorm + swish where each group's mean is 10³ times its spread (in the parts, or from the
  γ shift), every way it is computed, against float64: E[v²] − μ² in fp32 (flax's fast variance)
  is off by ~1 there, as the attention block's bare flax norm would be."""
  rng = np.random.default_rng(21)
  parts = [rng.normal(0.0 if with_shift else 10.0, 0.01, (2, 8, 8, 32)).astype(np.float32)
           for _ in range(2)]
  shift = np.full((2, 64), 10.0, np.float32) if with_shift else None
  scale = rng.uniform(0.5, 1.5, 64).astype(np.float32)
  bias = rng.normal(0.0, 0.1, 64).astype(np.float32)
  v = np.concatenate(parts, -1).astype(np.float64) + (0.0 if shift is None else shift[:, None, None])
  g = v.reshape(2, 8, 8, 32, 2)
  mean, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + 1e-6)).reshape(v.shape) * scale + bias
  want = y / (1.0 + np.exp(-y))
  params = {"params": {"norm": {"scale": scale, "bias": bias}}}
  for impl in ("autodiff", "recompute", "pallas"):
    got = _NormSwish(impl).apply(params, parts, shift)
    np.testing.assert_allclose(got, want, atol=2e-4, err_msg=impl)
  x = jnp.asarray(v, jnp.float32)
  flax_fast = nn.swish(nn.GroupNorm().apply({"params": params["params"]["norm"]}, x))
  assert np.abs(np.asarray(flax_fast) - want).max() > 0.1  # the test's inputs do cancel
  attn = AttnBlock()
  _, seen = attn.apply(attn.init(jax.random.PRNGKey(0), x), x, capture_intermediates=True)
  np.testing.assert_allclose(seen["intermediates"]["norm"]["__call__"][0],
                             ((g - mean) / np.sqrt(var + 1e-6)).reshape(v.shape), atol=2e-4)


def test_group_norm_swish_keeps_only_its_inputs_and_statistics():
  """Reverse mode keeps the bf16 parts, the shift, scale, bias and two [B, G] statistics
  (2 bytes per element), where flax's GroupNorm + swish keeps 14 (fp32 v − μ, v², bf16 y and
  the swish's two intermediates); the whole CIFAR-10 net at batch 128 (bf16, no remat, traced)
  keeps under a third of the bytes it keeps with autodiff."""
  parts, shift, scale, bias = _norm_inputs(jnp.bfloat16)
  elements = sum(p.size for p in parts)

  kept = lambda f: vjp_residual_bytes(lambda a: f(*a), (parts, shift, scale, bias))  # noqa: E731
  small = shift.nbytes + scale.nbytes + bias.nbytes + 2 * 2 * 32 * 4
  assert kept(functools.partial(group_norm_swish, 32, 1e-6, jnp.bfloat16)) == 2 * elements + small
  flax_bf16 = lambda p, *a: nn.swish(  # noqa: E731  (GroupNorm in bf16, as the nets' layers)
      nn.GroupNorm(dtype=jnp.bfloat16).apply({"params": {"scale": a[1], "bias": a[2]}},
                                             jnp.concatenate(p, -1) + a[0][:, None, None, :]))
  assert kept(flax_bf16) >= 14 * elements
  net = lambda nb: ScoreUNet(dtype="bfloat16", residual_dtype="bfloat16", unroll=0,  # noqa: E731
                             norm_impl=nb)
  saved = {nb: saved_for_backward_bytes(net(nb), (32, 32, 3), 128) for nb in NORM_IMPL}
  print({nb: f"{b / 2**30:.2f} GiB" for nb, b in saved.items()})
  assert saved["recompute"] < saved["autodiff"] / 3


def test_norm_impl_changes_nothing_but_the_program():
  """The same parameters under every way of computing the norms; the same loss and gradients
  (fp32, dropout on); the same forward-mode derivative w.r.t. z where there is one (the Pallas
  kernels have none, and say so); one-line errors for an unknown choice and for
  'recompute' inside a rematerialised block."""
  z, g = _inputs()
  kw = dict(n_embd=64, n_layer=2, dropout=0.1, attention=True)
  init = {nb: _jit(ScoreUNet(**kw, norm_impl=nb).init)(jax.random.PRNGKey(0), z, g)
          for nb in NORM_IMPL}
  jax.tree_util.tree_map(np.testing.assert_array_equal, *init.values())
  rng = np.random.default_rng(14)
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
                                  init["autodiff"])
  key, dz = jax.random.PRNGKey(15), jax.random.normal(jax.random.PRNGKey(16), z.shape)
  jvp = lambda net: _jit(lambda z, dz: jax.jvp(lambda z: net.apply(params, z, g), (z,), (dz,)))
  # The Pallas kernels draw their own dropout masks: they are compared without dropout.
  grads = lambda nb, **o: _jit(jax.value_and_grad(  # noqa: E731
      _loss(ScoreUNet(**{**kw, **o}, norm_impl=nb), z, g, key)))(params)
  results = {nb: [grads(nb), jvp(ScoreUNet(**kw, norm_impl=nb))(z, dz)]
             for nb in ("autodiff", "recompute")}
  for nb in ("pallas", "pallas_conv"):
    with pytest.raises(TypeError, match="custom_vjp"):
      jvp(ScoreUNet(**kw, norm_impl=nb))(z, dz)
  without_dropout = grads("autodiff", dropout=0.0)
  fused = {nb: grads(nb, dropout=0.0) for nb in ("pallas", "pallas_conv")}
  for got, want in ((results["recompute"], results["autodiff"]),
                    (fused["pallas"], without_dropout), (fused["pallas_conv"], without_dropout)):
    want = jax.tree_util.tree_leaves(want)
    scale = max(float(jnp.max(jnp.abs(b))) for b in want)  # some gradients are rounding noise
    for a, b in zip(jax.tree_util.tree_leaves(got), want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
  x, cond = jax.random.normal(key, (2, 4, 4, 32)), jnp.ones((2, 8))
  for nb in fused:  # their dropout is on in training: a block's output changes with it
    block = lambda det: ResnetBlock(out_ch=32, dropout=0.5, deterministic=det, norm_impl=nb)  # noqa: E731
    p = jax.tree_util.tree_map(lambda v: v + 0.1, _jit(block(True).init)(key, x, None, cond))
    out = {det: _jit(lambda p: block(det).apply(p, x, None, cond, rngs={"dropout": key}))(p)[0]
           for det in (True, False)}
    assert not np.allclose(out[True], out[False]), nb
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    GroupNormSwish().init(jax.random.PRNGKey(0), (jnp.zeros((1, 2, 2, 48)),))
  with pytest.raises(ValueError, match="norm_impl='fused'"):
    ScoreUNet(**kw, norm_impl="fused").init(jax.random.PRNGKey(0), z, g)
  with pytest.raises(ValueError, match="remat='none'"):
    ScoreUNet(**kw, norm_impl="recompute", remat="convs").init(jax.random.PRNGKey(0), z, g)


def _loss(net, z, g, key):
  return lambda p: jnp.mean((net.apply(p, z, g, deterministic=False, rngs={"dropout": key}) - 1.0) ** 2)


def test_gradients_finite(perturbed):
  z, g = _inputs()
  loss, grad = _jit(jax.value_and_grad(_loss(ScoreUNet(**SMALL), z, g, jax.random.PRNGKey(6))))(perturbed)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grad)
  assert len(leaves) == len(jax.tree_util.tree_leaves(perturbed))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert all(float(jnp.sum(x**2)) > 0 for x in leaves)


def test_remat_changes_nothing_but_memory():
  """Same loss and gradients under every remat policy, through scanned and single blocks (random
  params, dropout on); the compiled step's temporary buffers shrink none > convs > full. 16×16
  images, so that activations outweigh the weights' buffers: at 8×8 with 64 channels, convs and
  full came within 192 bytes (jax 0.12.1) or in the other order (0.10.2)."""
  _, g = _inputs()
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  kw = dict(n_embd=64, n_layer=2, dropout=0.1)
  shapes = jax.eval_shape(ScoreUNet(**kw).init, jax.random.PRNGKey(0), z, g)
  rng = np.random.default_rng(7)
  params = jax.tree_util.tree_map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes)
  key = jax.random.PRNGKey(8)
  results, temp = {}, {}
  for remat in REMAT:
    step = _jit(jax.value_and_grad(_loss(ScoreUNet(**kw, remat=remat), z, g, key)))
    temp[remat] = step.lower(params).compile().memory_analysis().temp_size_in_bytes
    results[remat] = step(params)
  loss, grad = results["none"]
  for remat in ("convs", "full"):
    np.testing.assert_allclose(results[remat][0], loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(results[remat][1]), jax.tree_util.tree_leaves(grad)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  print("temporary bytes:", temp)
  assert temp["none"] > temp["convs"] > temp["full"]
  with pytest.raises(ValueError, match="remat='yes'"):
    ScoreUNet(**kw, remat="yes").init(jax.random.PRNGKey(0), z, g)


def test_scanned_blocks_stack_parameters(init_params):
  """Runs of identical blocks share one scanned body with stacked parameters: the way up scans
  the way down's outputs in reverse, then takes conv_in's output in a block of its own."""
  p = init_params["params"]
  assert p["down_0_0"]["conv1"]["kernel"].shape == (2, 3, 3, 64, 64)  # 2 blocks down
  assert p["down_0_0"]["attn"]["q"]["kernel"].shape == (2, 64, 64)
  assert p["up_0_0"]["conv1"]["kernel"].shape == (2, 3, 3, 128, 64)  # 2 up, skip concatenated
  assert p["up_0_1"]["conv1"]["kernel"].shape == (3, 3, 128, 64)  # the skip from conv_in
  assert set(p) == {"dense0", "dense1", "conv_in", "down_0_0", "mid_1_0", "mid_2_0", "up_0_0",
                    "up_0_1", "norm_out", "conv_out"}
  assert num_params(init_params) == param_count(ScoreUNet(**SMALL), SHAPE[1:])


def test_unroll_changes_nothing_but_the_program():
  """Two levels of 3 blocks (the way up splits a scanned segment where its first block changes
  the channel count), the loops unrolled by 1, 2 (a remainder) and entirely: the loss and
  gradients (dropout on) are the same; a bad unroll gets a one-line error."""
  z, g = _inputs()
  kw = dict(n_embd=64, n_layer=3, dropout=0.1, channel_mult=(1, 2))
  shapes = jax.eval_shape(ScoreUNet(**kw).init, jax.random.PRNGKey(0), z, g)
  rng = np.random.default_rng(9)
  params = jax.tree_util.tree_map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes)
  key = jax.random.PRNGKey(10)
  results = {u: _jit(jax.value_and_grad(_loss(ScoreUNet(**kw, unroll=u), z, g, key)))(params)
             for u in (1, 2, 0)}
  for u in (2, 0):
    np.testing.assert_allclose(results[u][0], results[1][0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(results[u][1]), jax.tree_util.tree_leaves(results[1][1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for bad in (-1, True):
    with pytest.raises(ValueError, match="unroll="):
      ScoreUNet(**kw, unroll=bad).init(jax.random.PRNGKey(0), z, g)


def test_embeddings_are_their_formulas():
  """timestep_embedding at t ≠ 0 is [sin(1000 t ω_k), cos(1000 t ω_k)], ω_k = 10000^(−k/(d/2 − 1))
  (test_embeddings sees only t = 0, where any frequencies give 0 and 1); fourier_features'
  default exponents are 6 and 7, each channel's frequencies side by side, sin then cos."""
  t = np.array([0.0, 1e-3, 0.37, 1.0])
  omega = 10000.0 ** (-np.arange(8) / 7)
  angle = 1000.0 * t[:, None] * omega
  np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 16),
                             np.concatenate([np.sin(angle), np.cos(angle)], -1), atol=2e-4)
  z = np.array([[[[0.1, -0.3, 0.0077]]]], np.float32)
  h = (z[..., None] * 2 * np.pi * 2.0 ** np.array([6, 7])).reshape(1, 1, 1, 6)
  np.testing.assert_allclose(fourier_features(jnp.asarray(z)),
                             np.concatenate([np.sin(h), np.cos(h)], -1), atol=2e-4)


def _random_params(net, z, g, seed=0):
  """Parameters of ``net`` drawn from N(0, 0.1²), none zero (traced init: nothing compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32),
                                jax.eval_shape(net.init, jax.random.PRNGKey(0), z, g))


def _conv_inputs(net, params, z, g):
  """Every Conv's and ResnetBlock's first input and output in ``net.apply``, by module path."""
  def run(params):
    seen = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, (Conv, ResnetBlock)) and context.method_name == "__call__":
        seen["/".join(context.module.path)] = (args[0], out)
      return out

    with nn.intercept_methods(record):
      net.apply(params, z, g)
    return seen
  return _jit(run)(params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_input_and_output_layers(dtype):
  """conv_in reads [z, Fourier features of z] in fp32, the features computed from fp32 z (from
  bf16 z, z · 2^7 · 2π would keep no digit of z's 8-bit detail); conv_out computes in fp32 and
  returns fp32, also in a bf16 net."""
  z, g = _inputs()
  net = ScoreUNet(n_embd=64, n_layer=1, dtype=dtype)
  params = _random_params(net, z, g)
  seen = _conv_inputs(net, params, z, g)
  x_in, _ = seen["conv_in"]
  np.testing.assert_array_equal(x_in, jnp.concatenate([z, fourier_features(z)], -1))
  assert x_in.dtype == jnp.float32
  x_out, y_out = seen["conv_out"]
  assert x_out.dtype == y_out.dtype == jnp.float32
  np.testing.assert_allclose(  # a bf16 conv_out would be ~1e-2 off
      y_out, Conv(3).apply({"params": params["params"]["conv_out"]}, x_out), rtol=1e-5, atol=1e-5)


def test_levels_double_channels_and_upsample_by_nearest_neighbour():
  """channel_mult=(1, 2): level i's blocks have 64·mult_i channels, a strided conv halves H and W
  between levels, and the way up repeats each pixel of level 1's last block's output 2×2
  (nearest) before its conv."""
  z, g = _inputs()
  net = ScoreUNet(n_embd=64, n_layer=1, channel_mult=(1, 2))
  params = _random_params(net, z, g)
  p = params["params"]
  assert p["down_0_0"]["conv1"]["kernel"].shape == (3, 3, 64, 64)
  assert p["down_1_0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
  assert p["mid_1_0"]["conv1"]["kernel"].shape == (3, 3, 128, 128)
  assert p["up_1_0"]["conv1"]["kernel"].shape[-1] == 128
  assert p["up_0_0"]["conv1"]["kernel"].shape[-1] == 64
  seen = _conv_inputs(net, params, z, g)
  assert seen["downsample_0"][1].shape == (2, 4, 4, 64)
  x_up, _ = seen["upsample_1"]
  assert x_up.shape == (2, 8, 8, 128)
  last = seen["up_1_1"][1][0]  # up_1: 2 blocks, unscanned (the skips differ in width)
  assert last.shape == (2, 4, 4, 128)
  np.testing.assert_array_equal(x_up, jnp.repeat(jnp.repeat(last, 2, 1), 2, 2))
