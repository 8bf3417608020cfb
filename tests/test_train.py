"""Model glue, train/eval/sample steps, non-finite steps, and checkpoint save / resume."""
import asyncio
import logging as std_logging
import math
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import quickstart  # noqa: E402
from vdm import checkpoint as ckpt_lib
from vdm import importance, logging_utils, samplers, schedules
from vdm import input_pipeline as ip
from vdm import model as model_lib
from vdm import train
from test_reliability import _corrupt  # noqa: E402  pylint: disable=g-bad-import-order


def tiny_config(**training):
  c = quickstart.get_config()
  c.data.image_size, c.data.channels = 4, 1
  c.data.synthetic_num_train, c.data.synthetic_num_test = 64, 16
  c.model.n_embd, c.model.n_layer = 64, 1
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
  with pytest.raises(ValueError, match="model.gamma_min=6.0 must be < model.gamma_max=5.0"):
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


def _on_devices(params, mesh):
  return jax.device_put(params, train.replicated(mesh))


def _poisoned(params, bias=np.nan):
  """Host copies of ``params`` with the output bias ``bias``: nan makes every step's loss nan."""
  poisoned = jax.tree.map(np.copy, jax.device_get(params))
  poisoned["net"]["params"]["conv_out"]["bias"][:] = bias
  return poisoned


# nan; or a spike whose loss (~1e20 nats) is finite but whose square, the importance sampler's
# per-t second moment, overflows float32 (once in the state, that inf made every later t nan).
@pytest.mark.parametrize("bias", [np.nan, 3e9])
def test_non_finite_steps_are_skipped_and_counted(setup, bias):
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  state = state.replace(params=_on_devices(_poisoned(state.params, bias), mesh))
  before = jax.device_get((state.params, state.ema_params, state.opt_state,
                           state.time_second_moment))
  for k in range(2):
    state, m = step_fn(state, _batch(data, mesh, k))
    assert int(m["nonfinite"]) == k + 1
  assert int(state.step) == 2 and int(state.nonfinite) == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before,
               jax.device_get((state.params, state.ema_params, state.opt_state,
                               state.time_second_moment)))


def test_logged_learning_rate_is_the_one_applied_after_skipped_steps(setup):
  """Warm-up counts applied updates; two skipped steps leave the optimizer at its first, whose
  learning rate is 0. The log read lr_fn(state.step) and showed 1/10 and 2/10 of the rate."""
  config, model, mesh, _, data = setup
  config = config.copy_and_resolve_references()
  config.optimizer.warmup_steps = 10
  step_fn = train.make_train_step(config, model, mesh)
  state = train.create_train_state(config, model, mesh)
  good = jax.device_get(state.params)  # host copies: the step donates its input state
  poisoned = _on_devices(_poisoned(good), mesh)
  state, metrics = _run(step_fn, state.replace(params=poisoned), data, mesh, 0, 2)
  state, more = _run(step_fn, state.replace(params=_on_devices(good, mesh)), data, mesh, 2, 2)
  assert [int(m["nonfinite"]) for m in metrics + more] == [1, 2, 0, 0]
  rate = config.optimizer.learning_rate
  np.testing.assert_allclose([m["lr"] for m in metrics + more], [0, 0, 0, rate / 10], rtol=1e-6)
  assert int(train.applied_updates(state.opt_state)) == 2 and int(state.step) == 4


def test_checkpoint_resume_continues_identically(setup, tmp_path):
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  state, _ = _run(step_fn, state, data, mesh, 0, 3)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  assert ckpt.save(state)
  # A workdir named by a number (runs/1) is a workdir, not a step directory, for inference too.
  numbered = str(tmp_path / "runs" / "1")
  ckpt_lib.Checkpointer(numbered).save(state)
  target = train.abstract_train_state(config, model)
  assert int(ckpt_lib.restore_path(numbered, target).step) == 3
  # Inference reads the EMA parameters unless told otherwise.
  saved = jax.device_get(state)
  for use_ema, want in ((True, saved.ema_params), (False, saved.params)):
    _, params, info = ckpt_lib.load_params(config, numbered, use_ema=use_ema)
    assert info == {"checkpoint": numbered, "step": 3, "ema": use_ema}
    jax.tree.map(np.testing.assert_array_equal, params, want)
  leaves = [jax.tree.leaves(p) for p in (saved.params, saved.ema_params)]
  assert not all(map(np.array_equal, *leaves))
  corrupt = tmp_path / "corrupt_run" / "checkpoints" / "5"  # a workdir whose one step is unreadable
  corrupt.mkdir(parents=True)
  (corrupt / "_CHECKPOINT_METADATA").write_text("{truncated")
  with pytest.raises(ValueError, match="restores into this config .none there, or each truncated"):
    ckpt_lib.restore_path(str(corrupt.parent.parent), target)
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
  state, _ = _run(step_fn, state, data, mesh, 1, 2)
  ckpt.save(state)
  assert ckpt.all_steps() == [1, 3]
  _corrupt(str(tmp_path), 3)
  target = train.create_train_state(config, model, mesh)
  resumed = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  restored = resumed.restore_latest(target, train.replicated(mesh))
  assert restored is not None and int(restored.step) == 1
  # The corrupt step is moved aside (orbax would refuse to write any step up to it) and kept.
  assert os.listdir(ckpt.directory + "_unrestorable") == ["3"]
  state, _ = _run(step_fn, restored, data, mesh, 1, 1)
  assert resumed.save(state) and resumed.all_steps() == [1, 2] and resumed.last_good_step == 2

  bad = state.replace(step=state.step + 5,
                      params=jax.tree.map(lambda p: p * jnp.nan, state.params))
  assert not resumed.save(bad)
  assert 7 not in resumed.all_steps()


def test_processes_resume_from_a_step_every_one_of_them_restored(setup, tmp_path, monkeypatch):
  """Resuming is collective: a step that restores here but not on another process is passed over
  here too, and processes that see different steps are refused in one line. Before, each process
  resumed from its own newest readable step, and the job hung at its first collective. The other
  process is played by what it would contribute to each exchange."""
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  for k in range(2):
    state, _ = _run(step_fn, state, data, mesh, k, 1)
    assert ckpt.save(state)
  assert ckpt.all_steps() == [1, 2]
  target = train.create_train_state(config, model, mesh)
  other = iter([[2, 3], [0], [1]])  # the same steps (count, sum); step 2 fails there, step 1 not
  monkeypatch.setattr(logging_utils, "from_every_process",
                      lambda values: np.asarray([values, next(other)], np.int32))
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(target, train.replicated(mesh))
  assert int(restored.step) == 1 and next(other, None) is None
  assert os.listdir(ckpt.directory + "_unrestorable") == ["2"]
  other = iter([[2, 4]])
  with pytest.raises(ValueError, match=r"processes see different checkpoints under .*: put the "):
    ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(target, train.replicated(mesh))


def test_only_reads_reporting_to_a_closed_loop_are_silenced(monkeypatch):
  """After a failed restore, orbax's reads still in flight report to its closed event loop: those
  unraisable 'Event loop is closed' errors, and asyncio's records of the reads' failures, are
  dropped; any other unraisable exception or record is passed on."""
  def unraisable(fn):
    try:
      fn()
    except RuntimeError as e:
      return types.SimpleNamespace(exc_type=RuntimeError, exc_value=e,
                                   exc_traceback=e.__traceback__, err_msg=None, object=None)
  loop = asyncio.new_event_loop()
  loop.close()
  late = unraisable(lambda: loop.call_soon_threadsafe(print))
  def other():
    raise RuntimeError("Event loop is closed")  # the same words, from elsewhere
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  ckpt_lib._quiet_failed_io()
  ckpt_lib._quiet_failed_io()  # idempotent: one hook, over the previous one
  sys.unraisablehook(late)
  sys.unraisablehook(unraisable(other))
  assert [str(u.exc_value) for u in seen] == ["Event loop is closed"] and seen[0] is not late

  record = lambda message: std_logging.LogRecord("asyncio", std_logging.ERROR, "", 0, message, (),
                                                 None)
  read = ("Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
          "'OUT_OF_RANGE: ... [tensorstore_spec=...]')>")
  assert not ckpt_lib._keep_record(record(read))
  deleted = ("Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize()> "
             "exception=Exception(\"Encountered error while reading array index: (slice(0, 3, 1),). "
             "See full TensorStore details: <bound method spec of TensorStore({'driver': 'zarr'})>.\")>")
  assert not ckpt_lib._keep_record(record(deleted))  # a step deleted while read: 163 lines
  assert ckpt_lib._keep_record(record("Future exception was never retrieved\nfuture: ValueError()"))
  assert ckpt_lib._keep_record(record("Executing <Task> took 0.2 seconds; tensorstore_spec"))


def test_a_restore_silences_late_reads_before_its_first_read(monkeypatch):
  """A restore's first read, the parameters' metadata, fails as the restore does on a checkpoint
  whose data chunks are truncated, and leaves reads in flight: the filters are in place before
  it. They came after it, and a resume printed the one late report that arrived in between."""
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  quiet = []  # whether the filters were in place at each read

  class Manager:
    def item_metadata(self, step):
      quiet.append(getattr(sys.unraisablehook, "vdm_quiet_io", False))
      raise ValueError("OUT_OF_RANGE: Error reading .zarray in OCDBT database")

    def restore(self, step, args):
      quiet.append(getattr(sys.unraisablehook, "vdm_quiet_io", False))
      return step

  assert ckpt_lib._restore(Manager(), 4, {"params": np.zeros(3, np.float32)}) == 4
  assert quiet == [True, True]
  assert ckpt_lib._keep_record in std_logging.getLogger("asyncio").filters


def test_inference_refuses_a_config_that_shapes_the_checkpoint_differently(tmp_path):
  """Evaluating a run restores its whole state: a different importance_num_bins (the sampler's
  per-t moments) is named before the restore, not reported as no restorable checkpoint."""
  config = tiny_config()
  os.makedirs(tmp_path / "checkpoints" / "2")
  ckpt_lib.record_run_config(config, str(tmp_path))
  config.loss.importance_num_bins = 32
  with pytest.raises(ValueError, match=r"loss.importance_num_bins=64 \(now 32\)"):
    ckpt_lib.check_run_config(config, str(tmp_path), mode="eval")


def test_a_failed_write_of_the_run_record_leaves_the_old_one_in_place(tmp_path, monkeypatch):
  """A resume with a new learning rate on a full disk: the old config.json stays where it is (it was
  moved aside before the new one was written, which then failed, leaving no record and so no
  guard), and no copy of it is made; with space, the old one is kept as config.<time>.json."""
  config = tiny_config()
  ckpt_lib.record_run_config(config, str(tmp_path))
  config.optimizer.learning_rate = 1e-3

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  with monkeypatch.context() as m:
    m.setattr(logging_utils.json, "dump", full)
    with pytest.raises(OSError, match="No space left"):
      ckpt_lib.record_run_config(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json"]  # the failed write's file removed
  assert ckpt_lib.read_config_json(str(tmp_path / "config.json"), "")["optimizer.learning_rate"] != 1e-3
  ckpt_lib.record_run_config(config, str(tmp_path))
  assert ckpt_lib.read_config_json(str(tmp_path / "config.json"), "")["optimizer.learning_rate"] == 1e-3
  assert len(os.listdir(tmp_path)) == 2  # config.json and config.<time>.json


def test_training_refuses_checkpoints_without_their_record(tmp_path):
  """A workdir whose config.json is gone (deleted with the workdir mid-run, say) would resume
  unchecked with any seed or model; training refuses it, eval and sampling take the given config."""
  config = tiny_config()
  os.makedirs(tmp_path / "checkpoints" / "2")
  with pytest.raises(ValueError, match=r"has checkpoints but no config.json, the record of the "
                     r"settings they were trained with: restore it .* or use a fresh --workdir\.$"):
    ckpt_lib.check_run_config(config, str(tmp_path), mode="train")
  ckpt_lib.check_run_config(config, str(tmp_path), mode="eval")


def test_a_second_training_run_on_a_workdir_is_refused(tmp_path, monkeypatch):
  """Two runs on one workdir wrote over each other's checkpoints and records, both exiting 0. The
  first holds run.lock (flock: a second open file, even in the same process, cannot take it); the
  second is refused in one line naming the holder, and the lock is free once its holder ends."""
  workdir = str(tmp_path)
  with ckpt_lib.workdir_lock(workdir):
    with pytest.raises(ValueError, match=rf"^{workdir} is in use by another training run \(process "
                       rf"{os.getpid()} on \S+\): wait for it to end, or train in another --workdir\.$"):
      with ckpt_lib.workdir_lock(workdir):
        pass
  with ckpt_lib.workdir_lock(workdir):
    pass
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top

  def no_locks(*args):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)  # a filesystem without locks: warned, not refused
  with ckpt_lib.workdir_lock(workdir):
    pass


def test_resuming_on_other_training_images_is_refused(tmp_path):
  """The config names data.path, not the images: a file replaced there (or a relative path that
  finds another file) resumed silently on other data. data.json holds the images' fingerprint."""
  images = np.random.default_rng(0).integers(0, 256, (300, 4, 4, 1), dtype=np.uint8)
  split = lambda x: ip.Split("npz/train", len(x), lambda idx: x[idx])
  workdir = str(tmp_path)
  ckpt_lib.check_train_data(workdir, split(images).fingerprint())  # a new run records it
  os.makedirs(tmp_path / "checkpoints" / "2")
  ckpt_lib.check_train_data(workdir, split(images.copy()).fingerprint())  # the same images
  other = images.copy()
  other[-1, 0, 0, 0] ^= 1  # one value of the last image (always among those hashed)
  with pytest.raises(ValueError, match=r"holds a run trained on other images \(300 images of \[4, 4, "
                     r"1\], sha256 [0-9a-f]{16}; the data now has 300 images of \[4, 4, 1\], sha256 "
                     r"[0-9a-f]{16}\): point data.path at the run's data, or use a fresh --workdir\.$"):
    ckpt_lib.check_train_data(workdir, split(other).fingerprint())
  with pytest.raises(ValueError, match=r"299 images"):
    ckpt_lib.check_train_data(workdir, split(images[:-1]).fingerprint())
  os.rmdir(tmp_path / "checkpoints" / "2")  # no checkpoints: a new run, which records its own
  ckpt_lib.check_train_data(workdir, split(other).fingerprint())
  assert logging_utils.read_json(str(tmp_path / "data.json"), "")["train"] == split(other).fingerprint()


def test_a_checkpoint_of_another_model_is_named_as_such(setup, tmp_path):
  """Without the run's config.json (a copied run), restoring into another model names the first
  parameter that differs, from the checkpoint's metadata, instead of 'corrupt or another config'."""
  config, model, mesh, _, _ = setup
  ckpt_lib.Checkpointer(str(tmp_path)).save(train.create_train_state(config, model, mesh))
  other = tiny_config()
  other.model.n_embd = 128
  target = train.abstract_train_state(other, model_lib.make_model(other))
  with pytest.raises(ValueError, match=r"checkpoints/0 holds another model: params\.net\.params\."
                     r"\S+ has shape \(\d+,( \d+,)*\) in the checkpoint, shape \(\d+,( \d+,)*\) in "
                     r"this config \(and \d+ more\): pass the config it was trained with\.$"):
    ckpt_lib.restore_path(str(tmp_path / "checkpoints" / "0"), target)
  with pytest.raises(ValueError, match="no checkpoint under"):
    ckpt_lib.restore_path(str(tmp_path), target)


def test_an_evaluator_lists_the_steps_again_when_training_deletes_the_one_it_reads(
    setup, tmp_path, monkeypatch):
  """A training run beside an evaluator saves new steps and deletes old ones (max_to_keep). The
  step being read vanished, the evaluator fell back to older ones, deleted too, and reported that
  no checkpoint restores (8 of 12 evals beside a run with max_to_keep=1); orbax's listing could
  fail on a vanished step with a FileNotFoundError, reported as a full disk. The steps are listed
  again; a step named alone that vanished is reported as deleted."""
  import shutil  # pylint: disable=g-import-not-at-top
  config, model, mesh, step_fn, data = setup
  state = train.create_train_state(config, model, mesh)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5)
  for start in (0, 2, 4):
    state, _ = _run(step_fn, state, data, mesh, start, 2)
    ckpt.save(state)
  ckpt.close()
  steps = tmp_path / "checkpoints"
  shutil.move(steps / "6", tmp_path / "6")  # written by training once the evaluator has listed
  restore, reader = ckpt_lib._restore, ckpt_lib._reader

  def training_moves_on(manager, step, *args):  # while step 4 is read: saves 6, deletes 2 and 4
    if step == 4 and (tmp_path / "6").exists():
      shutil.move(tmp_path / "6", steps / "6")
      for old in ("2", "4"):
        shutil.rmtree(steps / old)
      raise FileNotFoundError(str(steps / "4"))
    return restore(manager, step, *args)

  listings = []

  def listing_fails_once(directory):
    listings.append(directory)
    if len(listings) == 1:
      raise FileNotFoundError(os.path.join(directory, "4"))
    return reader(directory)

  monkeypatch.setattr(ckpt_lib, "_restore", training_moves_on)
  monkeypatch.setattr(ckpt_lib, "_reader", listing_fails_once)
  target = train.abstract_train_state(config, model)
  assert int(ckpt_lib.restore_path(str(tmp_path), target).step) == 6 and len(listings) == 3

  def deleted(manager, step, *args):
    shutil.rmtree(steps / str(step))
    raise FileNotFoundError(str(steps / str(step)))

  monkeypatch.setattr(ckpt_lib, "_restore", deleted)
  with pytest.raises(ValueError, match=r"checkpoints/6 was deleted while it was read \(a training "
                     r"run keeps its newest training.max_to_keep steps\): pass a newer step"):
    ckpt_lib.restore_path(str(steps / "6"), target)


def test_weight_decay_spares_biases_and_the_schedule(setup):
  """As in the published VDM code, kernels and norm scales decay and biases do not; unlike it, γ's
  parameters do not either (that code decays the schedule's endpoints towards γ = 0)."""
  _, model, _, _, _ = setup
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  mask = train.decay_mask(params)
  flat = {"/".join(str(getattr(p, "key", p)) for p in path): m
          for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat and not any(m for name, m in flat.items() if name.startswith("schedule/"))
  assert all(m == (not name.endswith("/bias")) for name, m in flat.items() if name.startswith("net/"))
  assert any(name.endswith("/scale") and m for name, m in flat.items())  # GroupNorm scales
  assert any(name.endswith("/kernel") and m for name, m in flat.items())


def test_throughput_counts_training_time_only(monkeypatch):
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  clock = [0.0]
  monkeypatch.setattr(logging_utils.time, "time", lambda: clock[0])
  rate = logging_utils.Throughput(0, 100, 8)
  clock[0] = 60.0  # compiling the first step
  rate.restart(0)
  clock[0] = 61.0
  assert rate.update(10) == {"steps_per_sec": 10.0, "images_per_sec": 80.0, "eta_sec": 9.0}
  clock[0] = 90.0  # an evaluation
  rate.restart(10)
  clock[0] = 92.0
  assert rate.update(20)["steps_per_sec"] == 5.0


def test_image_grid_draws_any_number_of_channels():
  """RGB tiles as they are; other channel counts as grey, each channel a tile's column block (a
  PNG has no other way to show 2, 4 or 5 channels, and RGBA would hide the fourth as alpha)."""
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  for c in (1, 2, 3, 4, 5):
    images = np.arange(2 * 2 * 3 * c).reshape(2, 2, 3, c) % 4
    grid = logging_utils.image_grid(images, vocab_size=4, ncol=2, pad=1)
    w = 3 if c == 3 else 3 * c
    assert grid.shape == (4, 2 * w + 3, 3) and grid.dtype == np.uint8, (c, grid.shape)
    tile = grid[1:3, 1:1 + w]
    want = images[0] if c == 3 else np.repeat(images[0].transpose(0, 2, 1).reshape(2, w, 1), 3, -1)
    np.testing.assert_array_equal(tile, want * 85)


def test_a_rerun_keeps_the_previous_results(tmp_path):
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  out = tmp_path / "r.json"
  out.write_text("first")
  os.utime(out, (0, 0))
  logging_utils.keep_previous(str(out))
  out.write_text("second")
  os.utime(out, (0, 0))  # the same second: numbered
  logging_utils.keep_previous(str(out))
  assert not out.exists()
  kept = {p.name: p.read_text() for p in tmp_path.iterdir()}
  assert kept == {"r.19700101T000000Z.json": "first", "r.19700101T000000Z.1.json": "second"}


def test_json_records_stay_whole_and_in_place_under_concurrent_writers(tmp_path, monkeypatch):
  """write_json's writers shared one temporary file (two evaluators of a step within a millisecond
  wrote corrupt JSON and lost results), and a kept record was renamed away before the new one
  took its place (a reader of a resume's config.json could find none, and skip the config check).
  Each writer now has its own temporary file, and the kept copy is a link made first."""
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "eval_4.json")
  logging_utils.write_json(path, {"run": "first"})
  replace, dump, inside = os.replace, logging_utils.json.dump, []

  def replace_checked(src, dst):
    assert not src.endswith(".tmp") or os.path.exists(dst), f"{dst} was missing for a moment"
    replace(src, dst)

  def dump_with_another_writer(obj, f, **kwargs):  # writer B runs whole inside writer A's write
    if not inside:
      inside.append(1)
      logging_utils.write_json(path, {"run": "B"}, keep=True)
    dump(obj, f, **kwargs)

  monkeypatch.setattr(logging_utils.os, "replace", replace_checked)
  monkeypatch.setattr(logging_utils.json, "dump", dump_with_another_writer)
  logging_utils.write_json(path, {"run": "A"}, keep=True)
  records = sorted(logging_utils.read_json(str(p), "")["run"] for p in tmp_path.iterdir())
  assert records == ["A", "B", "first"] and logging_utils.read_json(path, "")["run"] == "A"


WRITER_B = r"""
import os, sys, time
from vdm import logging_utils
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
  time.sleep(0.01)
logging_utils.write_json(sys.argv[1], {"run": "B"}, keep=True)
"""


def test_a_second_process_keeping_a_record_waits_its_turn(tmp_path, monkeypatch):
  """Process B wrote its record whole between A's keeping of the old one and A's rename: A's
  rename replaced B's record, which was lost (two evals of one step). The two take turns now."""
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  path, go = str(tmp_path / "eval_4.json"), str(tmp_path / "go")
  logging_utils.write_json(path, {"run": "first"})
  b = subprocess.Popen([sys.executable, "-c", WRITER_B, path, go], stdout=subprocess.PIPE,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert b.stdout.readline().strip() == "ready"
  link = os.link

  def link_then_let_b_write(src, dst):
    link(src, dst)
    open(go, "w").close()
    time.sleep(1.0)  # B writes now, unless it waits for A

  monkeypatch.setattr(logging_utils.os, "link", link_then_let_b_write)
  logging_utils.write_json(path, {"run": "A"}, keep=True)
  assert b.wait(timeout=60) == 0
  records = sorted(logging_utils.read_json(str(p), "")["run"] for p in tmp_path.glob("*.json"))
  assert records == ["A", "B", "first"] and logging_utils.read_json(path, "")["run"] == "B"


def test_provenance_names_the_commit_the_runbook_passes(monkeypatch):
  """Every result JSON records its commit: $VDM_COMMIT where set (the GPU runbook's, from the
  development checkout; the device's copy had a stale git ref), else this checkout's."""
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  here = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  monkeypatch.delenv("VDM_COMMIT", raising=False)
  assert logging_utils.provenance()["commit"] == (here or None)
  monkeypatch.setenv("VDM_COMMIT", "abc1234")
  got = logging_utils.provenance()
  assert got["commit"] == "abc1234" and got["jax"] == jax.__version__, got
  assert got["date"].endswith("+00:00") and got["num_devices"] == jax.device_count(), got


def test_json_is_strict(tmp_path):
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "r.json")
  logging_utils.write_json(path, {"nan": float("nan"), "inf": -np.inf, "array": jnp.array([1.5]),
                                  "scalar": np.float32(2.0)})
  with open(path) as f:  # parse_constant: refuse NaN / Infinity, as strict parsers do
    got = json.load(f, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
  assert got == {"nan": None, "inf": None, "array": [1.5], "scalar": 2.0}


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_samplers_give_integer_images(setup, sampler):
  config, model, mesh, _, _ = setup
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  images = train.make_sample_fn(config, model, sampler, 2, 3, mesh)(params, jax.random.PRNGKey(0))
  images = np.asarray(images)
  assert images.shape == (3, 4, 4, 1)
  assert images.min() >= 0 and images.max() < config.data.vocab_size
  with pytest.raises(ValueError, match="unknown sampler"):
    train.make_sample_fn(config, model, "leapfrog", 2, 3, mesh)


def test_a_discrete_time_model_is_sampled_at_its_training_times(setup):
  """A T-step model is trained at t = i/T only: a sampler of N steps is refused unless N divides T,
  and the error names the nearest divisor below N."""
  config, model, mesh, _, _ = setup
  config = config.copy_and_resolve_references()
  config.model.num_timesteps = 10
  with pytest.raises(ValueError, match=r"num_steps=4 does not divide model.num_timesteps=10.*2\)"):
    train.make_sample_fn(config, model, "ddim", 4, 3, mesh)
  for num_steps in (1, 5, 10):
    train.make_sample_fn(config, model, "ancestral", num_steps, 3, mesh)


def test_sampling_decodes_with_the_models_decoder(setup):
  """With decoder='discretized_gaussian' the samples are the bins of x̂_0, the mean of
  N(x̂_0, e^{γ_0}), x̂_0 = (z_0 − σ_0 ε̂)/α_0 (tests/test_samplers.py checks that decoder); the
  VDM decoder reads z_0/α_0, and before, every config sampled that way."""
  config = setup[0].copy_and_resolve_references()
  # γ_0 = −5: σ_0/α_0 ≈ 10 bins, so reading z_0 instead of x̂_0 changes most pixels.
  config.model.decoder, config.model.gamma_min = "discretized_gaussian", -5.0
  model = model_lib.make_model(config)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  noise = lambda p: 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape)
  params = jax.tree.map(lambda p: p + noise(p), params)
  sample = train.make_sample_fn(config, model, "ddim", 2, 64, setup[2])
  images = np.asarray(sample(params, jax.random.PRNGKey(2)))

  from vdm import elbo, samplers  # pylint: disable=g-import-not-at-top
  eps_fn, gamma_fn = model_lib.eps_fn_for(model, params), model_lib.gamma_fn_for(model, params)
  z_1 = jax.random.normal(jax.random.split(jax.random.PRNGKey(2))[0], (64,) + model.image_shape)
  z_0 = samplers.ddim(eps_fn, gamma_fn, z_1, 2)
  gamma_0 = gamma_fn(jnp.zeros(()))
  x_hat = elbo.predict_x0(z_0, gamma_0, eps_fn(z_0, jnp.full((64,), gamma_0)))
  expected = samplers.decode(z_0, gamma_0, vocab_size=256, decoder="discretized_gaussian",
                             x_hat=x_hat)
  read_z_0 = np.asarray(samplers.decode(z_0, gamma_0, vocab_size=256))
  np.testing.assert_array_equal(images, expected)
  assert np.mean(images != read_z_0) > 0.2  # many pixels sit at 0 or 255 either way


def _learned_monotone_config(**loss):
  config = tiny_config()
  config.model.schedule = "learned_monotone"
  config.loss.update(loss)
  return config


def test_variance_minimizing_step_fits_the_shape_and_keeps_the_elbo_gradients(setup):
  _, _, mesh, _, data = setup
  configs = {vm: _learned_monotone_config() for vm in (False, True)}
  configs[True].model.variance_minimizing = True
  model = model_lib.make_model(configs[True])
  state = train.create_train_state(configs[True], model, mesh)
  x, keys = _batch(data, mesh, 0), jax.random.split(jax.random.PRNGKey(3))
  both = jax.jit(lambda p: {vm: train.loss_and_grads(c, model, p, x, *keys)
                            for vm, c in configs.items()})
  (loss, _, elbo_grads), (vm_loss, _, vm_grads) = jax.device_get(both(state.params)).values()
  np.testing.assert_allclose(vm_loss, loss, rtol=1e-6)
  close = lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-7)
  # The score network and γ(0), γ(1) get the ELBO's gradients ...
  assert all(jax.tree.leaves(jax.tree.map(close, vm_grads["net"], elbo_grads["net"])))
  for end in ("gamma_min", "gamma_max"):
    assert close(vm_grads["schedule"]["params"][end], elbo_grads["schedule"]["params"][end]), end
  # ... the shape network those of the loss's second moment, not the ELBO's.
  for layer in ("l1", "l2", "l3"):
    shape_grads = [g["schedule"]["params"][layer]["kernel"] for g in (vm_grads, elbo_grads)]
    assert not close(*shape_grads), layer

  step_fn = train.make_train_step(configs[True], model, mesh)
  before = jax.device_get(state.params["schedule"])
  state, metrics = _run(step_fn, state, data, mesh, 0, 2)
  after = jax.device_get(state.params["schedule"])
  assert int(state.nonfinite) == 0 and np.isfinite(metrics[-1]["diffusion_second_moment"])
  assert not np.allclose(after["params"]["l2"]["kernel"], before["params"]["l2"]["kernel"])
  gamma = model_lib.gamma_fn_for(model, state.params)(jnp.array([0.0, 1.0]))
  ends = [after["params"]["gamma_min"], after["params"]["gamma_max"]]
  np.testing.assert_allclose(gamma, ends, rtol=1e-5)


def test_importance_sampled_time_tracks_the_loss_and_stays_unbiased(setup):
  _, _, mesh, _, data = setup
  config = _learned_monotone_config(time_sampling="importance", importance_num_bins=16,
                                    importance_warmup_steps=2)
  model = model_lib.make_model(config)
  step_fn = train.make_train_step(config, model, mesh)
  state = train.create_train_state(config, model, mesh)
  uniform = np.full(16, 1 / 16, np.float32)
  state, _ = _run(step_fn, state, data, mesh, 0, 1)
  # Step 0: 8 antithetic times 1/8 apart, one per bin of width 1/16, each bin's EMA from 0.
  assert np.count_nonzero(np.asarray(state.time_second_moment)) == 8
  np.testing.assert_array_equal(train.time_proposal_params(config.loss, state)["probs"], uniform)
  state, _ = _run(step_fn, state, data, mesh, 1, 1)

  # Step 2 (after the warm-up) samples t from q ∝ sqrt(EMA) and feeds ℓ(t) = q(t) × the
  # 1/q-weighted term back into the EMA.
  q = train.time_proposal_params(config.loss, state)
  assert np.abs(np.asarray(q["probs"]) - uniform).max() > 0.01
  moment_before, params = jax.device_get((state.time_second_moment, state.params))
  x = _batch(data, mesh, 2)

  @jax.jit
  def estimates(q, keys_elbo, keys_dropout):
    """(bpd, terms) of loss_and_grads per key pair, with t ~ q and with uniform t."""
    out = {}
    for name, proposal in (("importance", importance.time_proposal(q)), ("uniform", None)):
      out[name] = jax.vmap(lambda ke, kd: train.loss_and_grads(  # noqa: B023
          config, model, params, x, ke, kd, proposal)[:2])(keys_elbo, keys_dropout)
    return out

  # Draw 0 uses step 2's keys (fold_in(rng, step), split into ELBO and dropout keys).
  keys = jax.random.split(jax.random.PRNGKey(5), 2 * 256).reshape(2, 256, -1)
  keys = keys.at[:, 0].set(jax.random.split(jax.random.fold_in(state.rng, 2)))
  out = jax.device_get(estimates(q, *keys))
  state, _ = _run(step_fn, state, data, mesh, 2, 1)
  terms = jax.tree.map(lambda a: a[0], out["importance"][1])
  expected = importance.update_second_moment(
      moment_before, terms["t"], terms["diffusion"] * importance.density(q, terms["t"]), 0.99)
  # Two programs (the step; a vmap of loss_and_grads) round the net differently: 1.4e-5 apart in
  # one bin on jax 0.11.2. Feeding the 1/q-weighted term instead would move a sampled bin whose q
  # is ≥ 16 % off uniform by over 1e-3 (a quarter of its EMA's 1 % update).
  np.testing.assert_allclose(state.time_second_moment, expected, rtol=1e-4)

  # Unbiased: the bound averaged over the 256 draws agrees with uniform t within 4 SE, while
  # dropping the 1/q weights would be far off.
  to_bits = 1.0 / (16 * math.log(2.0))
  (is_bpd, is_terms), (u_bpd, _) = out["importance"], out["uniform"]
  se = math.hypot(is_bpd.std(), u_bpd.std()) / math.sqrt(256)
  q_t = importance.density(q, is_terms["t"])
  unweighted = is_bpd + (is_terms["diffusion"] * (q_t - 1)).mean(-1) * to_bits
  print(f"importance {is_bpd.mean():.3f}, uniform {u_bpd.mean():.3f}, SE {se:.3f}, "
        f"unweighted {unweighted.mean():.3f}")
  assert abs(is_bpd.mean() - u_bpd.mean()) < 4 * se
  assert abs(unweighted.mean() - u_bpd.mean()) > 10 * se


def test_loss_options_that_do_not_combine_exit_2(tmp_path):
  bad = {"variance_minimizing": ["--config.model.variance_minimizing=True"],  # learned_linear
         "loss.time_sampling='importance'": ["--config.loss.time_sampling=importance",
                                             "--config.model.num_timesteps=10"],
         "unknown loss.time_sampling": ["--config.loss.time_sampling=beta"],
         "loss.weighting='simple' with model.schedule='learned_linear'": [
             "--config.loss.weighting=simple"],
         "optimizer.grad_clip": ["--config.model.variance_minimizing=True",
                                 "--config.model.schedule=learned_monotone",
                                 "--config.optimizer.grad_clip=1.0"]}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = {msg: subprocess.Popen(
      [sys.executable, "-m", "vdm.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path / str(i)}", *args], cwd=root, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i, (msg, args) in enumerate(bad.items())}
  for msg, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("vdm: error: ") and msg in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_schedules_are_ddpms_own_betas_whatever_num_timesteps(kind):
  """With model.num_timesteps=999, t_i = i/999 lands on DDPM's x_1..x_1000: ᾱ_i = Π_{j≤i}(1 − β_j)."""
  config = quickstart.get_config()
  config.model.schedule, config.model.num_timesteps = f"ddpm_{kind}", 999
  gamma_fn = model_lib.make_model(config).fixed_gamma_fn
  alpha_bar = np.cumprod(1.0 - schedules.ddpm_betas(kind, 1000))
  got = np.asarray(schedules.alpha2(gamma_fn(jnp.arange(1000) / 999)), np.float64)
  np.testing.assert_allclose(got, alpha_bar, rtol=1e-5)


def test_one_train_step_is_a_hand_computed_clipped_adamw_step_and_ema(setup):
  """One step from step 5 with a fresh optimizer: the gradients are loss_and_grads' on the keys
  split from fold_in(rng, 5) (ELBO key first, dropout key second); Adam's moments hold the
  clipped gradients, (1 − b1)·g_c and (1 − b2)·g_c²; the parameters move by
  −lr·(g_c / (|g_c| + eps) + wd·mask·p) (AdamW's first step: m̂ = g_c, v̂ = g_c²), the schedule's
  and the biases' without decay; the EMA is r·e + (1 − r)·p_new; metrics report the unclipped
  norm, the loss and the rate."""
  _, _, mesh, _, data = setup
  config = tiny_config()
  config.model.dropout = 0.2  # so that the dropout key matters
  o = config.optimizer
  o.weight_decay, o.grad_clip, o.ema_rate, o.b1, o.b2 = 0.5, 0.05, 0.9, 0.8, 0.95
  model = model_lib.make_model(config)
  step_fn = train.make_train_step(config, model, mesh)
  state = train.create_train_state(config, model, mesh)
  state = state.replace(step=jnp.full((), 5, jnp.int32))
  p0, rng = jax.device_get((state.params, state.rng))
  x = _batch(data, mesh, 5)
  keys = jax.random.split(jax.random.fold_in(rng, 5))
  loss, terms, g = jax.device_get(jax.jit(
      lambda p, x: train.loss_and_grads(config, model, p, x, *keys))(p0, x))
  norm = math.sqrt(sum(float(np.sum(np.square(a))) for a in jax.tree.leaves(g)))
  assert norm > 2 * o.grad_clip  # clipping is active
  g_c = jax.tree.map(lambda a: a * (o.grad_clip / norm), g)
  state, m = jax.device_get(step_fn(state, x))
  assert int(state.step) == 6 and int(state.nonfinite) == 0
  np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(m["grad_norm"], norm, rtol=1e-4)
  np.testing.assert_allclose(m["lr"], o.learning_rate, rtol=1e-6)
  nats = terms["prior"] + terms["diffusion"] + terms["reconstruction"]  # per example
  np.testing.assert_allclose(m["bpd"], nats.mean() / (16 * math.log(2)), rtol=1e-5)
  tree_get = lambda key: optax.tree_utils.tree_get(state.opt_state, key)
  close = lambda a, b, **tol: jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol),
                                           a, b)
  scale = o.grad_clip / math.sqrt(sum(a.size for a in jax.tree.leaves(g)))  # a typical |g_c|
  close(tree_get("mu"), jax.tree.map(lambda a: (1 - o.b1) * a, g_c), rtol=1e-3,
        atol=1e-3 * scale)
  close(tree_get("nu"), jax.tree.map(lambda a: (1 - o.b2) * a * a, g_c), rtol=2e-3,
        atol=1e-3 * scale ** 2)
  mask = train.decay_mask(p0)
  p1 = jax.tree.map(
      lambda p, gc, dec: p - o.learning_rate * (gc / (np.abs(gc) + o.eps)
                                               + o.weight_decay * dec * p), p0, g_c, mask)
  close(state.params, p1, rtol=0, atol=2e-2 * o.learning_rate)
  close(state.ema_params, jax.tree.map(lambda e, p: o.ema_rate * e + (1 - o.ema_rate) * p,
                                       p0, state.params), rtol=1e-6, atol=1e-7)


def test_eval_step_sums_the_masked_deterministic_bound(setup):
  """make_eval_step: the masked sums of the bits/dim of elbo_terms (its times spread over the
  kept rows) with the network without dropout (a model with dropout evaluates deterministically),
  their squares and the count; summarize_eval gives their means and the standard error of the
  mean bound."""
  from vdm import elbo  # pylint: disable=g-import-not-at-top
  _, _, mesh, _, data = setup
  config = tiny_config()
  config.model.dropout = 0.5
  model = model_lib.make_model(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(  # non-zero everywhere: dropout feeds a zero-initialised convolution
      lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
      model_lib.init_params(model, jax.random.PRNGKey(0)))
  x, key = _batch(data, mesh, 0), jax.random.PRNGKey(4)
  mask_np = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.float32)
  mask = ip.to_global(mask_np, train.batch_sharding(mesh))
  sums = jax.device_get(train.make_eval_step(config, model, mesh)(params, x, mask, key))
  terms = jax.device_get(jax.jit(lambda p, x: elbo.elbo_terms(
      model_lib.eps_fn_for(model, p), model_lib.gamma_fn_for(model, p), x, key, mask=mask_np,
      **train._elbo_kwargs(config)))(params, x))  # pylint: disable=protected-access
  dims = 4 * 4 * 1
  bpd = {k: np.asarray(terms[k]) / (dims * math.log(2)) for k in elbo.TERMS}
  bpd["bpd"] = sum(bpd[k] for k in elbo.TERMS)
  for k, v in bpd.items():
    np.testing.assert_allclose(sums[k], np.sum(v * mask_np), rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(sums["bpd_sq"], np.sum(bpd["bpd"] ** 2 * mask_np), rtol=1e-5)
  assert float(sums["count"]) == 6
  out = train.summarize_eval(sums)
  kept = bpd["bpd"][mask_np > 0]
  np.testing.assert_allclose(out["bpd"], kept.mean(), rtol=1e-5)
  np.testing.assert_allclose(out["bpd_stderr"], kept.std(ddof=1) / math.sqrt(6), rtol=1e-3)
  assert out["num_examples"] == 6


def test_one_image_has_no_standard_error():
  """summarize_eval: one image's bound has no spread to estimate its error from: nan, not the
  "± 0" that the one-pass variance (0 for n = 1) gave."""
  sums = {"bpd": 11.0, "bpd_sq": 121.0, "count": 1.0, "prior": 0.5, "diffusion": 10.0,
          "reconstruction": 0.5}
  out = train.summarize_eval(sums)
  assert out["bpd"] == 11.0 and out["num_examples"] == 1 and math.isnan(out["bpd_stderr"])
  two = train.summarize_eval({**sums, "bpd": 20.0, "bpd_sq": 202.0, "count": 2.0})  # 9 and 11
  np.testing.assert_allclose(two["bpd_stderr"], 1.0)


def test_an_eval_batch_larger_than_the_split_gives_the_bound_of_one_that_fits(setup):
  """16 test images evaluated with eval.batch_size 128 (112 rows of padding) give the bound they
  give with eval.batch_size 16. Before the times were spread over the kept rows alone, the 16
  images all got t within 16/128 of one random u_0: the bound swung with eval.seed and its
  standard error, which takes the images as independent, was far too small. The comparison
  relies on jax drawing the first rows of a larger normal array as the smaller array
  (partitionable threefry, jax's default since 0.5), checked first."""
  config, model, mesh, _, _ = setup
  key = jax.random.PRNGKey(0)
  assert np.array_equal(jax.random.normal(key, (128, 4, 4, 1))[:16],
                        jax.random.normal(key, (16, 4, 4, 1))), "jax's random layout changed"
  params = model_lib.init_params(model, jax.random.PRNGKey(1))
  split = ip.load_split(config.data, "test")
  assert len(split) == 16
  out = {}
  for batch_size in (16, 128):
    c = tiny_config()
    c.eval.batch_size = batch_size
    out[batch_size] = train.evaluate(train.make_eval_step(c, model, mesh), params, split, c, mesh)
  assert out[128]["num_examples"] == 16
  for k in ("bpd", "bpd_stderr", "diffusion"):
    np.testing.assert_allclose(out[128][k], out[16][k], rtol=1e-4, err_msg=k)


def test_evaluate_gives_each_batch_its_own_key_and_sums_every_batch(setup):
  """evaluate: batch i of the split (the last padded, its mask 0 there) gets the key
  fold_in(PRNGKey(eval.seed), i), and the summary is of the sums over all batches (or the first
  num_batches)."""
  config, _, mesh, _, _ = setup
  split = ip.Split("test", 20, lambda idx: np.zeros((len(idx), 4, 4, 1), np.uint8))
  seen = []

  def spy_step(params, x, mask, key):
    seen.append((jax.device_get(key), jax.device_get(mask)))
    m = jnp.float32(len(seen))  # batch i's bound is i + 1 on every real image
    return {"bpd": m * jnp.sum(mask), "bpd_sq": m * m * jnp.sum(mask), "count": jnp.sum(mask),
            **{k: m * jnp.sum(mask) for k in ("prior", "diffusion", "reconstruction")}}

  out = train.evaluate(spy_step, None, split, config, mesh)
  base = jax.random.PRNGKey(config.eval.seed)
  assert len(seen) == 3
  for i, (key, _) in enumerate(seen):
    np.testing.assert_array_equal(key, jax.random.fold_in(base, i))
  np.testing.assert_array_equal(seen[-1][1], [1, 1, 1, 1, 0, 0, 0, 0])
  assert out["num_examples"] == 20
  np.testing.assert_allclose(out["bpd"], (8 * 1 + 8 * 2 + 4 * 3) / 20, rtol=1e-6)
  seen.clear()
  assert train.evaluate(spy_step, None, split, config, mesh, num_batches=2)["num_examples"] == 16
  assert len(seen) == 2
