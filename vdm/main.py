r"""Train, evaluate and sample VDM models.

  python -m vdm.main --config=configs/cifar10.py --workdir=DIR [--mode=train|eval|sample]
                     [--checkpoint=PATH] [--sampler=ancestral --num_steps=1000 --num_samples=64]
                     [--config.training.batch_size=64 ...]

train   trains from scratch, or resumes from the newest good checkpoint in DIR; writes
        TensorBoard events (DIR/tensorboard), checkpoints (DIR/checkpoints), sample grids
        (DIR/samples) and periodic test-split bounds. Compiled programs are kept in DIR/xla_cache
        (unless JAX_COMPILATION_CACHE_DIR names another cache) for resumes, eval and sample.
eval    the bound on the whole eval split in bits/dim (and its three terms, with a standard
        error) with the EMA parameters of the newest checkpoint or --checkpoint; DIR/eval_<step>.json.
sample  --num_samples images with --sampler in --num_steps steps; DIR/samples/*.png and *.npz.

Preemption: SIGTERM (or Ctrl-C) makes training save a checkpoint at the current step and exit with
status 0 (a second one acts as usual); rerunning the same command resumes from it. A SIGKILL loses
at most the steps since the last checkpoint (rerun to resume; the result is bit-identical to an
uninterrupted run).

Multi-device / multi-host: the same command. The global batch is split over all devices. On a
cluster, start one process per host with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (or --distributed alone where jax.distributed.initialize detects the cluster:
TPU pods, SLURM, Open MPI); each process reads its own slice of every batch. Only process 0
writes logs, samples, results and checkpoints; --workdir must be the same shared directory on
every host, since every process restores from it.

Bad input (config, data, paths) ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

# `configs/*.py` import each other as `configs.<name>`: make the checkout's root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vdm import checkpoint as ckpt_lib
from vdm import config_checks, input_pipeline, logging_utils, nets, samplers, schedules, train
from vdm.model import eval_fp32_share, gamma_fn_for, make_model

SAMPLES_DIR, TENSORBOARD_DIR, XLA_CACHE_DIR = "samples", "tensorboard", "xla_cache"  # in the workdir

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_string("checkpoint", None, "eval/sample: a checkpoint step directory or a workdir "
                    "(default: the newest good checkpoint in --workdir).")
flags.DEFINE_string("sampler", None, f"sample: one of {', '.join(samplers.SAMPLERS)} "
                    "(default: config.sampling.sampler).")
flags.DEFINE_integer("num_steps", None, "sample: sampler steps (default: config.sampling.num_steps).")
flags.DEFINE_integer("num_samples", None, "sample: how many (default: config.sampling.num_samples).")
flags.DEFINE_integer("sample_seed", 0, "sample: the seed of the samples.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize, which detects "
                  "TPU pods, SLURM and Open MPI (implied by --coordinator_address).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")


# The flags that only some modes read.
MODE_FLAGS = {"checkpoint": ("eval", "sample"), "sampler": ("sample",), "num_steps": ("sample",),
              "num_samples": ("sample",), "sample_seed": ("sample",)}


class Diverged(RuntimeError):
  """Too many non-finite steps in a row: reported as one line, exit status 1."""


# ---------------------------------------------------------------- distributed --------------------

def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, detect: bool = False) -> None:
  """``jax.distributed.initialize`` (before any other use of jax) when multi-host is asked for."""
  if not (coordinator_address or detect or num_processes is not None or process_id is not None):
    return
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (RuntimeError, ValueError) as e:
    raise ValueError(f"jax.distributed.initialize failed ({' '.join(str(e).split())[:300]}): pass "
                     "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, the same "
                     "address and N on every process.") from None


def prepare_workdir(workdir: str) -> str:
  if not workdir:
    raise ValueError("--workdir is required: pass a directory for checkpoints and logs.")
  workdir = logging_utils.writable_dir(workdir, "--workdir")
  for name, wanted in ((ckpt_lib.CHECKPOINT_DIR, os.path.isdir), (SAMPLES_DIR, os.path.isdir),
                       (TENSORBOARD_DIR, os.path.isdir), (XLA_CACHE_DIR, os.path.isdir),
                       (ckpt_lib.RUN_CONFIG, os.path.isfile)):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not wanted(path):
      raise ValueError(f"{path} is in the way: the run writes a "
                       f"{'directory' if wanted is os.path.isdir else 'file'} there; move it or "
                       "choose another --workdir.")
  return workdir


def use_compilation_cache(workdir: str) -> None:
  """Keep the run's compiled programs in ``workdir/xla_cache`` (jax's persistent cache, programs
  that took over a second to compile), so that a resume, an eval or a sampling run of the workdir
  loads what its run compiled instead of compiling it again: a minute or more a program at
  CIFAR-10's size on a GPU. A cache named by JAX_COMPILATION_CACHE_DIR (none, if empty) is used
  instead. Call it before jax compiles anything: jax decides once whether a process caches."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, XLA_CACHE_DIR))


# ---------------------------------------------------------------- evaluation ---------------------

def _sample_and_save(sample_fn, params, rng, out_dir: str, name: str, config, writer=None,
                     step: int = 0, keep: bool = False) -> str:
  """Sample, then write ``name``.png (a grid) and ``name``.npz; with ``keep``, files of that name
  from an earlier call (another count or dtype) are kept under :func:`logging_utils.keep_previous`'s
  names. Returns the PNG's path (process 0) or ''."""
  images = np.asarray(jax.device_get(sample_fn(params, rng)))
  if not logging_utils.is_main_process():
    return ""
  os.makedirs(out_dir, exist_ok=True)
  grid = logging_utils.image_grid(images, config.data.vocab_size)
  upscale = max(1, 128 // max(config.data.image_size, 1))
  png, npz = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("png", "npz"))
  for path in (png, npz) if keep else ():
    logging_utils.keep_previous(path)
  logging_utils.save_png(png, grid, upscale=min(upscale, 8))
  np.savez_compressed(npz, samples=images.astype(np.uint8))
  if writer is not None:
    writer.image(step, "samples", grid)
  return png


# ---------------------------------------------------------------- modes --------------------------

class StopNotice:
  """Records SIGTERM (a preemption notice) or SIGINT (Ctrl-C) so training can checkpoint and stop
  between steps; a second signal acts as usual. SIGINT is left alone where it is ignored (a
  background job's)."""

  def __init__(self):
    self.received: str | None = None  # the signal's name
    self._previous: dict = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name
    self.close()
    logging.warning("%s: checkpointing after this step, then stopping (send it again to stop at "
                    "once, losing the steps since the last checkpoint).", self.received)

  def agreed(self) -> bool:
    """Whether any process has received it (collective when there are several processes)."""
    return bool(logging_utils.from_every_process([self.received is not None]).any())

  def close(self) -> None:
    previous, self._previous = self._previous, {}
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _due_record(path: str) -> dict:
  """The eval and samples recorded as due at a checkpointed step ({} if no record)."""
  if not os.path.isfile(path):
    return {}
  return logging_utils.read_json(path, ": delete it to resume without the eval and samples it "
                                 "records as due.")


def run_train(config, workdir: str) -> dict:
  """Train (or resume) to config.training.num_steps. Returns the last eval summary. A workdir in
  use by another run, or holding a run of another config (:func:`vdm.checkpoint.check_run_config`),
  is refused."""
  with contextlib.ExitStack() as cleanup:  # signal handlers, writers, threads: on any exit
    return _train(config, workdir, cleanup)


def _train(config, workdir: str, cleanup: contextlib.ExitStack) -> dict:
  t_cfg = config.training
  cleanup.enter_context(ckpt_lib.workdir_lock(workdir))
  ckpt_lib.check_run_config(config, workdir, "train")
  notice = StopNotice()  # from the start: a notice during start-up stops at the first step
  cleanup.callback(notice.close)
  mesh = train.make_mesh()
  model = make_model(config)
  train_split = input_pipeline.load_split(config.data, config.data.train_split, config.seed)
  eval_split = input_pipeline.load_split(config.data, config.data.eval_split, config.seed)
  ckpt_lib.check_train_data(workdir, train_split.fingerprint())
  data = input_pipeline.TrainData(train_split, t_cfg.batch_size, config.seed, config.data.random_flip)

  checkpointer = ckpt_lib.Checkpointer(workdir, t_cfg.max_to_keep)
  cleanup.callback(checkpointer.close)
  # Restored into the state's shapes: a fresh state (its init compiled and run) only for step 0.
  state = checkpointer.restore_latest(train.abstract_train_state(config, model),
                                      train.replicated(mesh))
  if state is None and checkpointer.all_steps():
    raise ValueError(f"none of the checkpoints {checkpointer.all_steps()} in {checkpointer.directory} "
                     "could be restored (corrupt, or written with a different config): fix the "
                     "config or use a fresh --workdir.")
  if state is None:
    state = train.create_train_state(config, model, mesh)
  else:
    logging.info("Resumed from %s at step %d.", checkpointer.directory, int(state.step))
  start = int(jax.device_get(state.step))
  logging.info("Model: %d parameters; data: %s (%d train, %d eval examples); %d devices.",
               nets.num_params(state.params), train_split.name, len(train_split), len(eval_split),
               jax.device_count())

  ckpt_lib.record_run_config(config, workdir)
  writer = cleanup.enter_context(contextlib.closing(
      logging_utils.Writer(os.path.join(workdir, TENSORBOARD_DIR))))
  train_step = train.make_train_step(config, model, mesh)
  eval_step = train.make_eval_step(config, model, mesh)
  sample_fn = None
  throughput = logging_utils.Throughput(start, t_cfg.num_steps, t_cfg.batch_size)
  batches = input_pipeline.train_iterator(data, start, train.batch_sharding(mesh),
                                          config.data.prefetch, t_cfg.num_steps)
  cleanup.callback(batches.close)  # stop and join the prefetch thread before the interpreter exits
  summary: dict = {}
  pending = None  # (done, metrics) of the previous step: its non-finite count is read one step late

  def check_finite():
    """Check the last dispatched step once: fetching its counter waits for that step only."""
    nonlocal pending
    if pending is None:
      return
    (step, metrics), pending = pending, None
    count = int(jax.device_get(metrics["nonfinite"]))
    if count:
      logging.warning("Step %d: non-finite loss, squared loss or gradient; update skipped (%d in a "
                      "row).", step, count)
    if count >= t_cfg.max_nonfinite_steps:
      last = checkpointer.last_good_step
      where = (os.path.join(checkpointer.directory, str(last)) if last is not None else "none")
      raise Diverged(f"training stopped at step {step}: {count} non-finite steps in a row (loss, "
                     f"squared loss or gradient NaN/inf); last good checkpoint: {where}. Lower "
                     "optimizer.learning_rate or set optimizer.grad_clip > 0, and rerun to resume "
                     "from it.")

  def evaluate_and_sample(done: int, evaluate: bool, sample: bool) -> None:
    """The eval and samples at step ``done``; then the record that they were due is removed."""
    nonlocal summary, sample_fn
    if evaluate:
      summary = train.evaluate(eval_step, state.ema_params, eval_split, config, mesh,
                               config.eval.num_batches, desc=f"eval @ {done}")
      summary["step"] = done
      writer.scalars(done, {k: v for k, v in summary.items() if k != "step"}, prefix="eval/")
      logging.info("eval @ step %d: %.4f ± %.4f bits/dim (prior %.4f, diffusion %.4f, "
                   "reconstruction %.4f) on %d examples", done, summary["bpd"],
                   summary["bpd_stderr"], summary["prior"], summary["diffusion"],
                   summary["reconstruction"], summary["num_examples"])
    if sample:
      if sample_fn is None:
        s = config.sampling
        sample_fn = train.make_sample_fn(config, model, s.sampler, s.num_steps, s.num_samples, mesh)
      _sample_and_save(sample_fn, state.ema_params, jax.random.PRNGKey(done),
                       os.path.join(workdir, SAMPLES_DIR), f"step_{done}", config, writer, done)
    if logging_utils.is_main_process() and os.path.isfile(due_path):
      os.remove(due_path)

  # The eval and samples due at a checkpointed step are recorded before its checkpoint and the
  # record removed once they are written: a run stopped (notice, kill) in between does them on
  # resuming there, the final step's included.
  due_path = os.path.join(workdir, "due_at_checkpoint.json")
  record = _due_record(due_path)
  if record.get("step") == start:
    evaluate_and_sample(start, bool(record.get("evaluate")), bool(record.get("sample")))

  for step in range(start, t_cfg.num_steps):
    state, metrics = train_step(state, next(batches))
    if step == start:  # the call compiled the step: not training time
      throughput.restart(start)
    check_finite()  # the previous step, while this one runs
    done = step + 1  # steps taken: the number the console, TensorBoard and checkpoints use
    pending = (done, metrics)
    last = done == t_cfg.num_steps
    if done % t_cfg.log_every == 0 or last:
      check_finite()
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      rates = throughput.update(done)
      writer.scalars(done, {**values, **rates}, prefix="train/")
      if logging_utils.is_main_process():
        logging.info(logging_utils.console_line(done, t_cfg.num_steps, values, rates))
    due = {"evaluate": done % t_cfg.eval_every == 0 or last,
           "sample": done % t_cfg.sample_every == 0 or last}
    # Several processes agree on a notice by a collective, a host sync: only at log boundaries.
    stop = (not last and (jax.process_count() == 1 or done % t_cfg.log_every == 0)
            and notice.agreed())
    if done % t_cfg.checkpoint_every == 0 or last or stop:
      check_finite()
      if any(due.values()) and logging_utils.is_main_process():
        logging_utils.write_json(due_path, {"step": done, **due})  # until they are done
      checkpointer.save(state)
      throughput.restart(done)  # the save waited for this step
    if stop:
      logging.warning("%s at step %d: checkpoint saved in %s; rerun the same command to resume.",
                      notice.received or "A stop notice to another process", done,
                      checkpointer.directory)
      break
    if any(due.values()):
      evaluate_and_sample(done, **due)
      throughput.restart(done)

  if start >= t_cfg.num_steps:
    logging.info("Already trained to step %d (training.num_steps=%d): nothing to do.", start,
                 t_cfg.num_steps)
  if summary and logging_utils.is_main_process():
    logging_utils.write_json(os.path.join(workdir, "train_eval.json"), summary)
  return summary


def run_eval(config, workdir: str, checkpoint: str | None) -> dict:
  if config.eval.num_batches:
    logging.warning("eval.num_batches=%d limits training's periodic evals; --mode=eval evaluates "
                    "the whole split.", config.eval.num_batches)
  mesh = train.make_mesh()
  model, params, info = ckpt_lib.load_params(config, checkpoint or workdir,
                                              sharding=train.replicated(mesh))
  split = input_pipeline.load_split(config.data, config.data.eval_split, config.seed)
  step = info["step"]
  eval_step = train.make_eval_step(config, model, mesh)
  t0 = time.time()
  summary = train.evaluate(eval_step, params, split, config, mesh, 0, desc="eval")
  gamma = np.asarray(gamma_fn_for(model, params)(np.array([0.0, 1.0], np.float32)))
  summary.update(step=step, split=split.name, params="ema", seconds=time.time() - t0,
                 sigma2_0=float(schedules.sigma2(gamma[0])), sigma2_1=float(schedules.sigma2(gamma[1])),
                 checkpoint=os.path.abspath(checkpoint or workdir),
                 # how the bound was computed, which an earlier file of this name may not share
                 model_dtype=config.model.dtype, residual_dtype=config.model.residual_dtype,
                 eval_fp32_fraction=eval_fp32_share(model), eval_seed=config.eval.seed,  # as used
                 **logging_utils.provenance())
  if logging_utils.is_main_process():
    path = os.path.join(workdir, f"eval_{step}.json")
    # another eval of this step (another dtype, checkpoint) is kept
    logging_utils.write_json(path, summary, keep=True)
    print(f"step {step}: {summary['bpd']:.4f} ± {summary['bpd_stderr']:.4f} bits/dim on "
          f"{summary['num_examples']} examples of {split.name} (prior {summary['prior']:.4f}, "
          f"diffusion {summary['diffusion']:.4f}, reconstruction {summary['reconstruction']:.4f}) "
          f"-> {path}", flush=True)
  return summary


def run_sample(config, workdir: str, checkpoint: str | None, sampler: str, num_steps: int,
               num_samples: int, seed: int) -> str:
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"unknown --sampler {sampler!r}: use one of {', '.join(samplers.SAMPLERS)}.")
  if num_steps < 1 or num_samples < 1:
    raise ValueError(f"--num_steps={num_steps} and --num_samples={num_samples} must be >= 1.")
  config_checks.check_seed(seed, "--sample_seed")
  mesh = train.make_mesh()
  model, params, info = ckpt_lib.load_params(config, checkpoint or workdir,
                                              sharding=train.replicated(mesh))
  step = info["step"]
  sample_fn = train.make_sample_fn(config, model, sampler, num_steps, num_samples, mesh)
  png = _sample_and_save(sample_fn, params, jax.random.PRNGKey(seed),
                         os.path.join(workdir, SAMPLES_DIR),
                         f"{sampler}_{num_steps}steps_step{step}_seed{seed}", config, keep=True)
  if png:
    print(f"{num_samples} samples ({sampler}, {num_steps} steps, checkpoint step {step}) -> {png}",
          flush=True)
  return png


# ---------------------------------------------------------------- entry point --------------------

class _QuietLibraries:
  """Keep INFO records of vdm only (orbax alone logs a screenful per checkpoint); keep every
  library's warnings and errors but one: orbax's traceback of a failed save's thread, whose
  exception orbax raises again where the save waits, and the run reports in one line there."""

  def filter(self, record) -> bool:  # pylint: disable=invalid-name
    import logging as std_logging  # pylint: disable=g-import-not-at-top
    if (record.pathname.endswith(os.path.join("futures", "future.py"))
        and "raised an exception" in record.getMessage()):
      return False
    return (record.levelno >= std_logging.WARNING or f"{os.sep}vdm{os.sep}" in record.pathname
            or "absl" in record.pathname)


@logging_utils.one_line_errors
def main(argv) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    logging_utils.fail(f"unexpected arguments {' '.join(argv[1:])!r}: pass options as "
                       "--name=value.")
  config = FLAGS.config
  if config is None:
    logging_utils.fail("--config is required: e.g. --config=configs/quickstart.py.")
  try:
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     FLAGS.distributed)
    config_checks.validate(config)
    misplaced = [f"--{name}" for name in MODE_FLAGS if FLAGS[name].present
                 and FLAGS.mode not in MODE_FLAGS[name]]
    if misplaced:
      raise ValueError(f"{', '.join(misplaced)} has no effect with --mode={FLAGS.mode}: drop it "
                       "(run lengths and sampler settings of training are config keys).")
    workdir = prepare_workdir(FLAGS.workdir)
    use_compilation_cache(workdir)
    if FLAGS.mode == "train":  # each mode checks the config against the run's own record
      run_train(config, workdir)
    elif FLAGS.mode == "eval":
      run_eval(config, workdir, FLAGS.checkpoint)
    else:
      run_sample(config, workdir, FLAGS.checkpoint,
                 FLAGS.sampler or config.sampling.sampler,
                 FLAGS.num_steps if FLAGS.num_steps is not None else config.sampling.num_steps,
                 FLAGS.num_samples if FLAGS.num_samples is not None else config.sampling.num_samples,
                 FLAGS.sample_seed)
  except Diverged as e:
    logging_utils.fail(str(e), status=1)
  except OSError as e:  # a full or read-only disk, mid-run: the newest checkpoint stands
    logging_utils.fail(str(e) if e.errno is None else
                       f"{e}: if the disk is full or read-only, free space or make it writable, "
                       "then rerun the same command to resume from the newest checkpoint.", status=1)


def run() -> None:
  app.run(main, flags_parser=logging_utils.parse_flags)


if __name__ == "__main__":
  run()
