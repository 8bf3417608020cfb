"""Model glue, train/eval/sample steps, non-finite steps, and checkpoint save / resume."""
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import quickstart  # noqa: E402
from vdm import checkpoint as ckpt_lib
from vdm import input_pipeline as ip
from vdm import model as model_lib
from vdm import train


def tiny_config(**training):
  c = quickstart.get_config()
  c.data.image_size, c.data.channels = 4, 1
  c.data.synthetic_num_train, c.data.synthetic_num_test = 64, 16
  c.model.n_embd, c.model.n_layer = 32, 1
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 0
  c.training.batch_size = 8
  c.eval.batch_size = 8
  c.training.update(training)
  return c


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  model = model_lib.make_model(config)
  mesh = train.make_mesh()
  step = train.make_train_step(config, model, mesh)
  data = ip.TrainData(ip.load_split(config.data, "train"), 8, config.seed)
  return config, model, mesh, step, data


def _batch(data, mesh, k):
  return ip.to_global(data.batch(k), train.batch_sharding(mesh))


def _run(step_fn, state, data, mesh, start, n):
  metrics = []
  for k in range(start, start + n):
    state, m = step_fn(state, _batch(data, mesh, k))
    metrics.append(jax.device_get(m))
  return state, metrics


def test_model_glue():
  config = tiny_config()
  model = model_lib.make_model(config)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  assert set(params) == {"net", "schedule"}
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  eps = model_lib.eps_fn_for(model, params)(z, jnp.zeros((3,)))
  assert eps.shape == z.shape
  gamma = model_lib.gamma_fn_for(model, params)(jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(gamma, [config.model.gamma_min, config.model.gamma_max], rtol=1e-6)
  config.model.schedule = "fixed_linear"
  fixed = model_lib.make_model(config)
  assert model_lib.init_params(fixed, jax.random.PRNGKey(0))["schedule"] == {}
  config.model.gamma_min = 6.0
  with pytest.raises(ValueError, match="gamma_min"):
    model_lib.make_model(config)
  config.model.gamma_min, config.model.schedule = -13.3, "cubic"
  with pytest.raises(ValueError, match="unknown model.schedule"):
    model_lib.make_model(config)


def test_train_steps_reduce_the_bound(setup):
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  eval_step = train.make_eval_step(config, model, mesh)
  x = _batch(data, mesh, 0)
  mask = ip.to_global(np.ones((8,), np.float32), train.batch_sharding(mesh))

  def bound(params):
    return np.mean([train.summarize_eval(jax.device_get(
        eval_step(params, x, mask, jax.random.PRNGKey(i))))["bpd"] for i in range(4)])

  before = bound(state.params)
  state, metrics = _run(step_fn, state, data, mesh, 0, 40)
  after = bound(state.params)
  assert int(state.step) == 40 and int(state.nonfinite) == 0
  assert after < before - 0.3, (before, after)
  for key in ("bpd", "prior_bpd", "diffusion_bpd", "reconstruction_bpd", "sigma2_0", "sigma2_1",
              "lr", "grad_norm"):
    assert np.isfinite(metrics[-1][key]), key
  # The EMA moved, but more slowly than the parameters.
  leaf = lambda tree: jax.tree.leaves(tree["net"])[0]
  assert not np.array_equal(leaf(state.ema_params), leaf(state.params))


def test_non_finite_steps_are_skipped_and_counted(setup):
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  poisoned = jax.tree.map(lambda p: p, state.params)
  poisoned["net"]["params"]["conv_out"]["bias"] = jnp.full_like(
      poisoned["net"]["params"]["conv_out"]["bias"], jnp.nan)
  state = state.replace(params=poisoned)
  before = jax.device_get(state.params)
  before_opt = jax.device_get(state.opt_state)
  for k in range(2):
    state, m = step_fn(state, _batch(data, mesh, k))
    assert int(m["nonfinite"]) == k + 1
  assert int(state.step) == 2 and int(state.nonfinite) == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before_opt,
               jax.device_get(state.opt_state))


def test_checkpoint_resume_continues_identically(setup, tmp_path):
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  state, _ = _run(step_fn, state, data, mesh, 0, 3)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  assert ckpt.save(state)
  straight, _ = _run(step_fn, state, data, mesh, 3, 3)
  straight = jax.device_get(straight)

  target = train.create_train_state(config, model, mesh)
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(target, train.replicated(mesh))
  assert int(restored.step) == 3
  resumed, _ = _run(step_fn, restored, data, mesh, 3, 3)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), straight, jax.device_get(resumed))


def test_corrupt_latest_checkpoint_falls_back_and_nan_is_not_saved(setup, tmp_path):
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  state, _ = _run(step_fn, state, data, mesh, 0, 1)
  ckpt.save(state)
  state, _ = _run(step_fn, state, data, mesh, 1, 1)
  ckpt.save(state)
  assert ckpt.all_steps() == [1, 2]
  for path in glob.glob(os.path.join(ckpt.directory, "2", "**", "*"), recursive=True):
    if os.path.isfile(path) and "_CHECKPOINT_METADATA" not in path:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  target = train.create_train_state(config, model, mesh)
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(target, train.replicated(mesh))
  assert restored is not None and int(restored.step) == 1

  bad = state.replace(step=state.step + 5,
                      params=jax.tree.map(lambda p: p * jnp.nan, state.params))
  assert not ckpt.save(bad)
  assert 7 not in ckpt.all_steps()


@pytest.mark.parametrize("sampler", train.SAMPLERS)
def test_samplers_give_integer_images(setup, sampler):
  config, model, _, _, _ = setup
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  images = train.make_sample_fn(config, model, sampler, 2, 3)(params, jax.random.PRNGKey(0))
  images = np.asarray(images)
  assert images.shape == (3, 4, 4, 1)
  assert images.min() >= 0 and images.max() < config.data.vocab_size
  with pytest.raises(ValueError, match="unknown sampler"):
    train.make_sample_fn(config, model, "leapfrog", 2, 3)
