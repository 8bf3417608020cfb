"""Reliability of `vdm.main` training: SIGKILL / SIGTERM at any moment then resume bit-identically,
a corrupt newest checkpoint, and divergence (bad input: tests/test_main.py).

Restarts skip compilation: the runs share the suite's persistent XLA compilation cache
(conftest.py).
"""
import glob
import os
import random
import re
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_main import ROOT, TINY, _cmd, _env  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.ci_once  # vdm's resume logic; test_main and test_train restore on each leg

# Eval and sampling only at the last step, with the smallest settings.
QUIET = ["--config.training.eval_every=100000", "--config.training.sample_every=100000",
         "--config.training.log_every=1", "--config.sampling.num_steps=1",
         "--config.sampling.num_samples=1"]
# The quickstart model and data shape (8x8x3, batch 32), with fewer training images.
QUICKSTART = ["--config.data.synthetic_num_train=512", "--config.data.synthetic_num_test=32",
              "--config.eval.batch_size=32"]


def _start(workdir, args, log):
  # SIGINT as in a terminal: a suite started in the background ignores it, and so would the run
  # (a preexec_fn would fork the multithreaded test process, which jax warns may deadlock).
  ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  if ignored:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # exec resets a handler to default
  try:
    with open(log, "w") as f:
      return subprocess.Popen(_cmd(workdir, *args), cwd=ROOT, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=f)
  finally:
    if ignored:
      signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finish(proc, log, timeout=900):
  proc.wait(timeout=timeout)
  with open(log) as f:
    return proc.returncode, f.read()


def _entries(workdir):
  try:
    return os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []


def _steps(workdir):
  return sorted(int(e) for e in _entries(workdir) if e.isdigit())


def restore(workdir, step):
  """Checkpoint ``step`` of ``workdir`` as numpy arrays, whatever devices wrote it."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  checkpointer = ocp.StandardCheckpointer()
  one_device = jax.sharding.make_single_device_sharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                        dict(checkpointer.metadata(path).item_metadata))
  return jax.device_get(checkpointer.restore(path, target))


def _wait(proc, condition, timeout=600):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() < deadline, "timed out waiting to interrupt the run"
    time.sleep(0.001)


def _interrupt(proc, workdir, log, moment, resume, rng):
  """Interrupt a run that resumed at step ``resume`` at ``moment``. Returns where it must resume."""
  if moment == "startup":  # during start-up / compilation, before any step
    time.sleep(rng.uniform(0.5, 3.0))
  elif moment == "checkpoint_write":  # while orbax writes this run's second checkpoint or later
    def writing():  # a temporary directory '<step>.orbax-checkpoint-tmp...' beyond the newest step
      newest = max(_steps(workdir) + [0])
      return newest > resume and any(not e.isdigit() and e.split(".")[0].isdigit()
                                     and int(e.split(".")[0]) > newest for e in _entries(workdir))
    _wait(proc, writing)
  else:  # 'random': a random time after this run's first checkpoint; 'sigterm': at it
    _wait(proc, lambda: max(_steps(workdir) + [0]) > resume)
    time.sleep(rng.uniform(0.0, 0.5) if moment == "random" else 0.0)
  if moment == "sigterm":
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc, log, timeout=300)
    assert rc == 0, err[-3000:]
    saved = int(re.search(r"SIGTERM at step (\d+): checkpoint saved", err).group(1))
    assert _steps(workdir)[-1] == saved
    return saved
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return _steps(workdir)[-1] if _steps(workdir) else 0


def _corrupt(workdir, step, files="**/*"):
  """Truncate the files of checkpoint ``step`` (``files``: a pattern under its directory) to a
  third, all but _CHECKPOINT_METADATA."""
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), files), recursive=True):
    if os.path.isfile(path) and "_CHECKPOINT_METADATA" not in path:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))


def _assert_resumed(err, step):
  if step:
    assert re.search(rf"Resumed from \S+ at step {step}\.", err), err[-3000:]
  else:
    assert "Resumed from" not in err, err[-3000:]


def _preempted_run_is_bit_identical(tmp_path, args, num_steps, moments, seed=0):
  """Train ``num_steps`` straight, and again interrupted at each of ``moments`` (rerun after each),
  then with the newest checkpoint corrupted; the final checkpoints must be equal bit for bit."""
  rng = random.Random(seed)
  args = [*args, f"--config.training.num_steps={num_steps}"]
  t0 = time.time()
  ref = str(tmp_path / "straight")
  rc, err = _finish(_start(ref, args, tmp_path / "straight.log"), tmp_path / "straight.log")
  assert rc == 0, err[-3000:]
  t_straight = time.time() - t0

  workdir, resume = str(tmp_path / "preempted"), 0
  for i, moment in enumerate(moments):
    log = tmp_path / f"run{i}.log"
    proc = _start(workdir, args, log)
    next_resume = _interrupt(proc, workdir, log, moment, resume, rng)
    _assert_resumed(log.read_text(), resume)
    print(f"{moment}: resumed at {resume}, stopped; checkpoints {_steps(workdir)}")
    resume = next_resume

  # The newest checkpoint is corrupt: reported, moved aside, the previous one used, and the step
  # written again.
  steps = _steps(workdir)
  assert len(steps) >= 2, steps
  _corrupt(workdir, steps[-1])
  log = tmp_path / "final.log"
  rc, err = _finish(_start(workdir, args, log), log)
  assert rc == 0, err[-3000:]
  assert f"checkpoints/{steps[-1]} could not be restored" in err, err[-3000:]
  assert (f"Moved the unrestorable checkpoint {workdir}/checkpoints/{steps[-1]} to "
          f"{workdir}/checkpoints_unrestorable/{steps[-1]}") in err, err[-3000:]
  _assert_resumed(err, steps[-2])
  print(f"straight run {t_straight:.0f} s; all {time.time() - t0:.0f} s")

  straight, resumed = restore(ref, num_steps), restore(workdir, num_steps)
  assert int(resumed["step"]) == num_steps
  assert sorted(straight) == sorted(resumed)
  for key in straight:  # time_second_moment too, which uniform t leaves out of the parameters
    a, b = jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])
    assert len(a) == len(b) > 0
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), key


def test_sigkill_in_checkpoint_write_and_sigterm_resume_bit_identically(tmp_path):
  _preempted_run_is_bit_identical(
      tmp_path, [*TINY, *QUIET, "--config.training.checkpoint_every=2"], 10,
      ["checkpoint_write", "sigterm"])


def test_steps_below_an_unrestorable_checkpoint_are_written(tmp_path):
  """A corrupt checkpoint newer than the one resumed from is moved aside, so that the steps before
  it are written (orbax writes no step at or below its newest): here the last step, 3, below the
  corrupt 4; before, it was skipped in silence and the next run resumed at 2 again. Only its data
  chunks are truncated, so orbax fails partway through reading it: the reads still in flight then
  printed hundreds of 'Event loop is closed' tracebacks, and now print nothing."""
  workdir, args = str(tmp_path / "run"), [*TINY, *QUIET, "--config.training.checkpoint_every=2"]
  rc, err = _finish(_start(workdir, [*args, "--config.training.num_steps=4"],
                           tmp_path / "a.log"), tmp_path / "a.log")
  assert rc == 0 and _steps(workdir) == [2, 4], err[-3000:]
  _corrupt(workdir, 4, files="**/d/*")
  rc, err = _finish(_start(workdir, [*args, "--config.training.num_steps=3"],
                           tmp_path / "b.log"), tmp_path / "b.log")
  assert rc == 0, err[-3000:]
  assert "checkpoints/4 could not be restored (ValueError: OUT_OF_RANGE" in err, err[-3000:]
  assert "Traceback" not in err and "never retrieved" not in err, err[:3000]
  _assert_resumed(err, 2)
  assert _steps(workdir) == [2, 3] and int(restore(workdir, 3)["step"]) == 3
  assert os.listdir(os.path.join(workdir, "checkpoints_unrestorable")) == ["4"]


@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.ci_once)])
def test_eval_and_samples_due_at_a_stop_notice_run_on_resuming(tmp_path, name):
  """A notice during start-up stops after step 1, before its eval and samples (eval_every =
  sample_every = 1); the resumed run does them at step 1 before training on. Ctrl-C (SIGINT) is
  such a notice too: it ended the run in a traceback, losing the steps since the last
  checkpoint."""
  workdir = str(tmp_path / "run")
  args = [*TINY, "--config.training.eval_every=1", "--config.training.sample_every=1",
          "--config.sampling.num_steps=1", "--config.sampling.num_samples=1"]
  log = tmp_path / "a.log"
  proc = _start(workdir, [*args, "--config.training.num_steps=3"], log)
  _wait(proc, lambda: "Model: " in log.read_text())  # the notice's handler is installed
  proc.send_signal(getattr(signal, name))
  rc, err = _finish(proc, log, timeout=300)
  assert rc == 0 and f"{name} at step 1: checkpoint saved" in err, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert "eval @ step 1" not in err and not os.path.exists(os.path.join(workdir, "samples"))
  rc, err = _finish(_start(workdir, [*args, "--config.training.num_steps=2"],
                           tmp_path / "b.log"), tmp_path / "b.log")
  assert rc == 0, err[-3000:]
  _assert_resumed(err, 1)
  assert "eval @ step 1:" in err and "eval @ step 2:" in err, err[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "step_1.npz", "step_1.png", "step_2.npz", "step_2.png"]


def test_eval_and_samples_killed_at_the_final_checkpoint_run_on_rerunning(tmp_path, monkeypatch):
  """The last step's checkpoint is written before its eval and samples; a kill between them
  left a finished run that a rerun ("Already trained") never evaluated or sampled. The killed run
  gives back the signal handlers of its stop notice (the next Ctrl-C was only logged), and an
  unreadable record of what is due is one line that names it."""
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from vdm import main, train  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_steps=2, checkpoint_every=2, eval_every=2, sample_every=2)
  config.sampling.num_steps, config.sampling.num_samples = 2, 2
  workdir = str(tmp_path / "run")

  def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed during the final eval")

  monkeypatch.setattr(train, "evaluate", killed)
  handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  with pytest.raises(KeyboardInterrupt):
    main.run_train(config, workdir)
  assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
  assert _steps(workdir) == [2] and not os.path.exists(os.path.join(workdir, "train_eval.json"))
  monkeypatch.undo()
  due = os.path.join(workdir, "due_at_checkpoint.json")
  with open(due) as f:
    record = f.read()
  for text in (record[:12], "[2]"):  # cut short; not an object
    with open(due, "w") as f:
      f.write(text)
    with pytest.raises(ValueError, match=f"cannot read {due} .*: delete it to resume without"):
      main.run_train(config, workdir)
  with open(due, "w") as f:
    f.write(record)
  summary = main.run_train(config, workdir)
  assert summary["step"] == 2 and np.isfinite(summary["bpd"])
  assert os.path.isfile(os.path.join(workdir, "train_eval.json"))
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_2.npz", "step_2.png"]
  assert not os.path.exists(os.path.join(workdir, "due_at_checkpoint.json"))  # done: no rerun


@pytest.mark.slow
def test_quickstart_model_survives_repeated_kills(tmp_path):
  _preempted_run_is_bit_identical(
      tmp_path, [*QUICKSTART, *QUIET, "--config.training.checkpoint_every=5"], 60,
      ["startup", "random", "checkpoint_write", "sigterm", "random", "checkpoint_write"], seed=1)


def test_divergence_stops_with_the_step_and_last_good_checkpoint(tmp_path):
  """An absurd learning rate (after one warm-up step at lr 0) overflows every update: each step is
  skipped and counted, and the third in a row stops the run (exit status 1)."""
  workdir = str(tmp_path / "run")
  log = tmp_path / "run.log"
  rc, err = _finish(_start(workdir, [*TINY, *QUIET, "--config.optimizer.learning_rate=1e30",
                                     "--config.optimizer.warmup_steps=2",
                                     "--config.training.checkpoint_every=1",
                                     "--config.training.max_nonfinite_steps=3",
                                     "--config.training.num_steps=20"], log), log)
  assert rc == 1, err[-3000:]
  # Steps are counted as taken, as on the console and in TensorBoard: the first is step 1.
  for k in (1, 2, 3):
    assert (f"Step {k + 1}: non-finite loss, squared loss or gradient; update skipped ({k} in a "
            "row).") in err
  lines = [l for l in err.splitlines() if l.strip()]
  ckpt = os.path.join(workdir, "checkpoints", "3")
  assert lines[-1].startswith("vdm: error: training stopped at step 4: 3 non-finite steps in a row")
  assert f"last good checkpoint: {ckpt}." in lines[-1]
  assert "Traceback" not in err
  assert _steps(workdir) == [1, 2, 3]
  good, first = restore(workdir, 3), restore(workdir, 1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good["params"]))
  # The skipped steps left the parameters as the one good step made them.
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(good["params"]),
                                                  jax.tree.leaves(first["params"])))
