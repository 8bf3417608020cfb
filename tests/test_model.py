"""vdm.model: the least noisy share of an evaluated batch in fp32 (split_by_noise, eps_fn_for)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from vdm.model import (eps_fn_for, gamma_fn_for, init_params, make_model, split_by_noise,
                       traced_fns, with_dtype)


def test_split_by_noise_routes_the_lowest_gamma():
  """Two denoisers told apart by their output: the ⌈f·B⌉ examples of lowest γ get the first, in
  the batch's own order; f = 0 and 1 give one denoiser alone; a scalar γ is a batch of equal γ."""
  low = lambda z, g: jnp.ones_like(z) + 0.0 * g[:, None]
  rest = lambda z, g: jnp.zeros_like(z) + 0.0 * g[:, None]
  z = jnp.arange(7.0)[:, None] * jnp.ones((7, 2))
  gamma = jnp.array([3.0, -9.0, 0.5, -2.0, 7.0, -12.0, 1.0])
  out = jax.jit(split_by_noise(low, rest, 0.3))(z, gamma)  # ⌈2.1⌉ = 3 lowest: -12, -9, -2
  np.testing.assert_array_equal(out[:, 0], [0, 1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(split_by_noise(low, rest, 0.0)(z, gamma), rest(z, gamma))
  np.testing.assert_array_equal(split_by_noise(low, rest, 1.0)(z, gamma), low(z, gamma))
  assert float(split_by_noise(low, rest, 0.5)(z, jnp.float32(-3.0)).sum()) == 4 * 2
  # The split keeps each example's own input: an identity stays an identity.
  ident = lambda z, g: z
  np.testing.assert_array_equal(split_by_noise(ident, ident, 0.3)(z, gamma), z)


def test_eval_fp32_fraction_evaluates_the_low_noise_share_in_fp32():
  """A bf16 model with eval_fp32_fraction = 0.5: evaluating the bound, its least noisy half
  gives the fp32 network's ε̂, the other half the bf16 network's; training (dropout) and
  sampling are unaffected; bad fractions are refused; with_dtype('float32') is fp32 throughout,
  residual stream included."""
  config = default.get_config()
  config.data.image_size = 8
  config.model.update(n_embd=64, n_layer=1, dtype="bfloat16", residual_dtype="bfloat16",
                      eval_fp32_fraction=0.5)
  model = make_model(config)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(  # non-zero everywhere, so that the output layers matter
      lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
      init_params(model, jax.random.PRNGKey(0)))
  z = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
  gamma = jnp.array([2.0, -11.0, 0.0, -6.0])  # the low-noise half: examples 1 and 3
  fp32 = with_dtype(model, "float32")
  assert fp32.net.residual_dtype == "float32" and fp32.eval_fp32_fraction == 0.0
  plain = with_dtype(model, "bfloat16").net  # the bf16 net without the split
  mixed = jax.jit(eps_fn_for(model, params, bound=True))(z, gamma)
  # References on the same sub-batches, in the order the split runs them (by γ): bf16 results
  # depend on the batch a program sees, at the level of bf16 rounding.
  low, high = np.array([1, 3]), np.array([2, 0])
  ref32 = jax.jit(eps_fn_for(fp32, params))
  ref16 = jax.jit(lambda z, g: plain.apply(params["net"], z, g))
  gap = float(jnp.max(jnp.abs(ref16(z[high], gamma[high]) - ref32(z[high], gamma[high]))))
  assert gap > 1e-3  # the two precisions differ here
  np.testing.assert_allclose(mixed[low], ref32(z[low], gamma[low]), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(mixed[high] - ref16(z[high], gamma[high])))) < 0.1 * gap
  # A sampler's ε̂: the bf16 network for every example, on the same batch as the reference.
  np.testing.assert_array_equal(jax.jit(eps_fn_for(model, params))(z, gamma), ref16(z, gamma))
  train = eps_fn_for(model, params, train=True, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(
      train(z, gamma), plain.apply(params["net"], z, gamma, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(1)}))
  config.model.eval_fp32_fraction = 1.5
  with pytest.raises(ValueError, match="eval_fp32_fraction=1.5 must be in"):
    make_model(config)


def test_eval_step_bound_takes_the_fp32_share():
  """train.make_eval_step evaluates with the fp32 share: a bf16 model with eval_fp32_fraction = 1
  gives the fp32 model's sums; with 0 they differ at bf16's level."""
  from vdm import train  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.data.image_size = 8
  config.model.update(n_embd=64, n_layer=1, dtype="bfloat16", eval_fp32_fraction=1.0)
  mesh = train.make_mesh()
  rng = np.random.default_rng(0)
  batch = jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3)), jnp.int32)
  mask, key = jnp.ones((4,)), jax.random.PRNGKey(2)

  def bpd(**model_overrides):
    config.model.update(**model_overrides)
    model = make_model(config)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.05 * np.random.default_rng(1).standard_normal(p.shape).astype(np.float32),
        init_params(model, jax.random.PRNGKey(0)))
    return float(train.make_eval_step(config, model, mesh)(params, batch, mask, key)["bpd"])

  all_fp32 = bpd()
  np.testing.assert_allclose(all_fp32, bpd(dtype="float32"), rtol=1e-6)
  assert abs(bpd(dtype="bfloat16", eval_fp32_fraction=0.0) - all_fp32) > 1e-5


def test_the_fp32_share_goes_to_the_least_noisy_z_t_with_ddpms_decoder_too():
  """With decoder='discretized_gaussian' the bound also denoises z_0 (all at γ_0, the lowest γ):
  the ⌈f·B⌉ least noisy z_t still get the fp32 network's diffusion term (they got the bf16
  network's when z_t and z_0 shared one call, whose fp32 share went to z_0's rows)."""
  from vdm import elbo  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.data.image_size = 8
  config.model.update(n_embd=64, n_layer=1, dtype="bfloat16", eval_fp32_fraction=0.3,
                      decoder="discretized_gaussian")
  model = make_model(config)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
      init_params(model, jax.random.PRNGKey(0)))
  x = jnp.asarray(rng.integers(0, 256, (10, 8, 8, 3)), jnp.uint8)
  gamma_fn = gamma_fn_for(model, params)
  terms = lambda eps_fn: jax.jit(lambda x: elbo.elbo_terms(
      eps_fn, gamma_fn, x, jax.random.PRNGKey(5), decoder="discretized_gaussian"))(x)
  mixed, fp32 = terms(eps_fn_for(model, params, bound=True)), terms(
      eps_fn_for(with_dtype(model, "float32"), params))
  low = np.argsort(np.asarray(fp32["t"]))[:3]  # ⌈0.3 · 10⌉
  np.testing.assert_allclose(mixed["diffusion"][low], fp32["diffusion"][low], rtol=1e-4)


def test_an_fp32_network_has_no_fp32_share():
  """eval_fp32_share: eval_fp32_fraction for a bf16 network; 0 for one in fp32 (the default
  config's 0.3 would otherwise split each evaluated batch into two calls of one fp32 network, and
  the benchmark would report a share that does not exist)."""
  from vdm.model import eval_fp32_share  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.update(dtype="float32", eval_fp32_fraction=0.3)
  assert eval_fp32_share(make_model(config)) == 0.0
  config.model.dtype = "bfloat16"
  assert eval_fp32_share(make_model(config)) == 0.3
  assert eval_fp32_share(with_dtype(make_model(config), "float32")) == 0.0


def test_eps_fn_refuses_a_batch_of_another_image_shape():
  """eps_fn_for: a batch that is not [B, H, W, C] of the model's images is refused, naming the
  shapes and the fix. Unchecked, the convolutions took 8×8 images on a 4×4 model and bounded
  them silently, and an NCHW batch failed on a kernel's shape deep inside Flax."""
  config = default.get_config()
  config.data.update(image_size=4, channels=1)
  config.model.update(n_embd=64, n_layer=1, channel_mult=(1,))
  model = make_model(config)
  eps_fn = eps_fn_for(model, init_params(model, jax.random.PRNGKey(0)))
  gamma = jnp.zeros((2,))
  assert eps_fn(jnp.zeros((2, 4, 4, 1)), gamma).shape == (2, 4, 4, 1)
  for shape in ((2, 8, 8, 1), (2, 1, 4, 4)):
    with pytest.raises(ValueError, match=rf"a batch of shape \({shape[0]}, {shape[1]}, .*for a model "
                                         r"of images \(4, 4, 1\).*x.transpose\(0, 2, 3, 1\)"):
      eps_fn(jnp.zeros(shape), gamma)


def test_a_model_takes_exactly_one_schedule():
  """A Model with neither schedule gave γ = None, which failed later as "NoneType is not
  callable"; one with both (a fixed γ swapped in by dataclasses.replace while the config named a
  learned schedule) used the learned one and ignored the fixed γ silently. Both are refused."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.schedule = "learned_linear"
  learned = make_model(config)
  fixed = lambda t: -13.3 + 18.3 * t
  for kwargs in ({"schedule": None}, {"fixed_gamma_fn": fixed}):
    with pytest.raises(ValueError, match=r"^a Model takes one schedule: .*schedule=None, "
                                         r"fixed_gamma_fn=f\) swaps in a fixed γ\)\.$"):
      dataclasses.replace(learned, **kwargs)
  swapped = dataclasses.replace(learned, schedule=None, fixed_gamma_fn=fixed)
  assert gamma_fn_for(swapped, {}) is fixed


def test_traced_fns_of_a_model_reuse_its_programs_for_new_parameters():
  """traced_fns made new functions on every call, so each call (new parameters, or the same ones
  again: a notebook evaluating after each stretch of training) compiled the bound again."""
  from conftest import compiled  # pylint: disable=g-import-not-at-top
  from vdm import likelihood  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.update(image_size=4, channels=1)
  config.model.update(n_embd=64, n_layer=1, channel_mult=(1,), schedule="learned_linear")
  model = make_model(config)
  params = [init_params(model, jax.random.PRNGKey(0))]
  params.append(jax.tree.map(lambda a: a + 0.01, params[0]))  # the zero-initialised output layer too
  x = np.zeros((2, 4, 4, 1), np.uint8)
  bound = lambda p: likelihood.evaluate_elbo(*traced_fns(model, p), [x], jax.random.PRNGKey(2))
  first = bound(params[0])
  assert "_elbo_samples" not in compiled(lambda: (bound(params[1]), bound(params[0])))
  assert bound(params[1])["continuous"]["bpd"] != first["continuous"]["bpd"]
  import dataclasses  # pylint: disable=g-import-not-at-top
  unhashable = dataclasses.replace(model, net=model.net.clone(channel_mult=[1]))  # not cached
  again = likelihood.evaluate_elbo(*traced_fns(unhashable, params[0]), [x], jax.random.PRNGKey(2))
  assert again["continuous"]["bpd"] == first["continuous"]["bpd"]
