"""Reliability of `vdm.main` training: SIGKILL / SIGTERM at any moment then resume bit-identically,
a corrupt newest checkpoint, and divergence (bad input: tests/test_main.py).

Restarts skip compilation: the runs share the suite's persistent XLA compilation cache
(conftest.py).
"""
import errno
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import subprocess_env  # pylint: disable=g-bad-import-order
from test_main import ROOT, TINY, _cmd  # pylint: disable=g-bad-import-order

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
      return subprocess.Popen(_cmd(workdir, *args), cwd=ROOT, env=subprocess_env(),
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


def _assert_same_state(restored, saved, what=""):
  """Every leaf of ``restored`` equals ``saved``'s, and there is at least one."""
  a, b = jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)
  assert len(a) == len(b) > 0, what
  assert all(np.array_equal(x, y) for x, y in zip(a, b)), what


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
    _assert_same_state(resumed[key], straight[key], key)


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
  unreadable record of what is due is one line that names it. The reruns restore into the
  state's shapes: no fresh state is built (its init compiled and run) to be overwritten."""
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

  create_train_state = train.create_train_state

  def fresh_state(*args, **kwargs):  # traced (abstract_train_state's shapes) is all a resume needs
    state = create_train_state(*args, **kwargs)
    assert isinstance(state.step, jax.core.Tracer), "a resume built a fresh train state"
    return state

  monkeypatch.setattr(train, "create_train_state", fresh_state)
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
  _assert_same_state(good["params"], first["params"])


# ------------------ in-process: Checkpointer on a tiny state, the stop notice, logging_utils ---

def _tiny_states(steps):
  """(config, target, {step: host TrainState}): the tiny model's state at each of ``steps``, its
  parameters marked by the step (params + step, EMA params - step) so that a restore shows which
  step it read."""
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from vdm import model as model_lib, train  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  target = train.create_train_state(config, model_lib.make_model(config))
  state = jax.device_get(target)
  states = {k: state.replace(step=np.int32(k), params=jax.tree.map(lambda p: p + k, state.params),
                             ema_params=jax.tree.map(lambda p: p - k, state.params))
            for k in steps}
  return config, target, states


def test_every_unrestorable_step_above_the_resumed_one_is_moved_aside(tmp_path):
  """Two corrupt newest checkpoints: both are moved aside, named by their steps, and the state of
  the step before them is restored leaf by leaf. One left in place would stop orbax writing the
  steps up to it (the resumed run's next save raises). Saving keeps the newest max_to_keep."""
  from vdm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  _, target, states = _tiny_states([0, 1, 2, 3])
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  for k in (0, 1, 2, 3):
    assert ckpt.save(states[k])
  assert ckpt.all_steps() == [1, 2, 3]
  for k in (2, 3):
    _corrupt(str(tmp_path), k)
  resumed = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  restored = resumed.restore_latest(target)
  _assert_same_state(restored, states[1])
  assert resumed.last_good_step == 1 and resumed.all_steps() == [1]
  assert sorted(os.listdir(ckpt.directory + "_unrestorable")) == ["2", "3"]
  # A step on disk is not written again, nor one whose EMA parameters are not finite.
  nan_ema = states[2].replace(ema_params=jax.tree.map(lambda p: p * np.nan, states[2].ema_params))
  assert not resumed.save(states[1]) and not resumed.save(nan_ema) and resumed.all_steps() == [1]
  # Both written again, the newest corrupt again: kept beside the first one, not over it.
  assert resumed.save(states[2]) and resumed.save(states[3]) and resumed.all_steps() == [1, 2, 3]
  _corrupt(str(tmp_path), 3)
  again = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  _assert_same_state(again.restore_latest(target), states[2])
  assert sorted(os.listdir(ckpt.directory + "_unrestorable")) == ["2", "3", "3.1"]


def test_inference_reads_the_newest_step_ema_or_raw(tmp_path):
  """load_params of a workdir reads its newest step: the EMA parameters, or the raw ones with
  use_ema=False, leaf by leaf, and names that step."""
  from vdm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config, _, states = _tiny_states([1, 2])
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  for k in (1, 2):
    assert ckpt.save(states[k])
  for use_ema, want in ((True, states[2].ema_params), (False, states[2].params)):
    _, params, info = ckpt_lib.load_params(config, str(tmp_path), use_ema=use_ema)
    assert info == {"checkpoint": str(tmp_path), "step": 2, "ema": use_ema}
    _assert_same_state(params, want)


def test_a_stop_notice_is_agreed_and_gives_back_the_handlers(monkeypatch):
  """A notice another process received stops this one too; the signal itself is recorded and
  hands SIGTERM and SIGINT back to their previous handlers, so that a second one acts as usual."""
  import threading  # pylint: disable=g-import-not-at-top
  from vdm import logging_utils, main  # pylint: disable=g-import-not-at-top
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are installed from the main thread only")
  signals = (signal.SIGTERM, signal.SIGINT)
  handlers = [signal.getsignal(s) for s in signals]
  notice = main.StopNotice()
  try:
    assert signal.getsignal(signal.SIGTERM) == notice._handle  # pylint: disable=protected-access
    assert not notice.agreed()
    with monkeypatch.context() as m:  # another process has received it
      m.setattr(logging_utils, "from_every_process",
                lambda values: np.asarray([values, [1]], np.int32))
      assert notice.agreed() and notice.received is None
    signal.raise_signal(signal.SIGTERM)
    assert notice.received == "SIGTERM" and notice.agreed()
    assert [signal.getsignal(s) for s in signals] == handlers
  finally:
    notice.close()
  assert [signal.getsignal(s) for s in signals] == handlers


def test_eta_and_atomic_json(tmp_path, monkeypatch):
  """The console's ETA past a day (its hours shown, even 0) and with no progress (unknown, not a
  division by zero); write_json leaves the previous record whole when writing the new one fails."""
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  assert [logging_utils.format_eta(s) for s in (65, 3725, 86400 + 300, 2 * 86400 + 3725)] == [
      "1:05", "1:02:05", "1d0:05:00", "2d1:02:05"]
  monkeypatch.setattr(logging_utils.time, "time", lambda: 10.0)
  rate = logging_utils.Throughput(5, 100, 8)
  rates = rate.update(5)
  assert rates["steps_per_sec"] == 0 and logging_utils.format_eta(rates["eta_sec"]) == "?"
  path = str(tmp_path / "record.json")
  logging_utils.write_json(path, {"step": 1})
  with pytest.raises(TypeError):
    logging_utils.write_json(path, {"step": 2, "bad": object()})
  with open(path) as f:
    assert f.read() == '{\n  "step": 1\n}\n'
  assert os.listdir(tmp_path) == ["record.json"]  # the failed write's temporary file removed
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~logging_utils._UMASK  # as open() makes files


def test_an_unknown_flag_ends_the_run_before_any_work(tmp_path):
  """A misspelt flag (--num_step for --num_steps) is refused in one line, not dropped in silence
  (the run would go on without it: here, to its own error about the empty workdir)."""
  r = subprocess.run(_cmd(str(tmp_path / "run"), "--mode=eval", "--num_step=3"), cwd=ROOT,
                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "Unknown command line flag 'num_step'" in lines[-1], lines


def test_the_writer_records_each_value_at_its_step(tmp_path):
  """TensorBoard's event file holds each scalar under its prefixed tag at its step, and the image
  at its step and size (read back record by record)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from vdm import logging_utils  # pylint: disable=g-import-not-at-top
  writer = logging_utils.Writer(str(tmp_path))
  writer.scalars(7, {"bpd": np.float32(3.5), "lr": 0.25}, prefix="train/")
  writer.scalars(9, {"bpd": 2.75}, prefix="eval/")
  writer.image(9, "samples", np.zeros((4, 5, 3), np.uint8))
  writer.close()
  path, = glob.glob(str(tmp_path / "events.out.tfevents*"))
  with open(path, "rb") as f:
    data = f.read()
  seen, i = [], 0
  while i < len(data):  # TFRecords: length (8 bytes), its CRC (4), the event, its CRC (4)
    n, = struct.unpack("<Q", data[i:i + 8])
    event, i = event_pb2.Event.FromString(data[i + 12:i + 12 + n]), i + 16 + n
    seen += [(event.step, v.tag, v.simple_value if v.HasField("simple_value")
              else (v.image.height, v.image.width)) for v in event.summary.value]
  assert seen == [(7, "train/bpd", 3.5), (7, "train/lr", 0.25), (9, "eval/bpd", 2.75),
                  (9, "samples", (4, 5))]


def test_a_checkpoint_that_cannot_be_written_ends_the_run_in_one_line(tmp_path):
  """A file-size limit that the first checkpoint exceeds (as a full disk would): the save fails at
  once (saves are synchronous: an async one waits 300 s for a step directory that a full disk
  never makes) and the run ends with one line naming the step to resume from, status 1, without
  the tracebacks of orbax's writes still in flight or orbax's own log of the failure (more than a
  thousand lines before)."""
  workdir = str(tmp_path / "w")
  cmd = _cmd(workdir, *TINY, *QUIET, "--config.training.num_steps=2")
  r = subprocess.run(["bash", "-c", 'ulimit -f 500 && exec "$@"', "_", *cmd], cwd=ROOT,
                     env=subprocess_env(), capture_output=True, text=True, timeout=600)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 1, r.stderr[-3000:]
  assert re.fullmatch(r"vdm: error: could not write checkpoint 2 in \S+checkpoints \(.+\): free space "
                      r"or make it writable, then rerun the same command to resume from step 0\.", last), last
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]


def test_the_writer_raises_a_failed_write_at_the_call(tmp_path):
  """tensorboardX's SummaryWriter writes in a thread: a full disk killed the thread, and the run
  then blocked for good on its queue, deaf to SIGTERM. The Writer writes in the caller's thread, so
  the write's OSError reaches the run (here a file-size limit of 8 KiB, as a full disk)."""
  script = ("import resource, numpy as np; from vdm import logging_utils\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
            f"w = logging_utils.Writer({str(tmp_path)!r})\n"
            "try:\n"
            "  w.image(1, 'samples', np.random.default_rng(0).integers(0, 256, (64, 64, 3)))\n"
            "except OSError as e:\n"
            "  print('raised', e.errno)\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == f"raised {errno.EFBIG}", (r.stdout, r.stderr[-2000:])
