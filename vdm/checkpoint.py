"""Checkpoints of the TrainState with orbax: keep the last N, resume from the newest good one.

A checkpoint holds the TrainState: step, params, ema_params, opt_state, rng, the non-finite
counter and the importance sampler's per-t second moments; the data position is the step (see
vdm.input_pipeline). Checkpoints with non-finite parameters are never written. If the newest
checkpoint cannot be restored (truncated, corrupt), the failure is logged and the next older one
is tried; once one restores, the newer unrestorable ones are moved to ``checkpoints_unrestorable/``
(kept for inspection, out of orbax's way: it writes no step at or below its newest); the reads
(or writes) still in flight when one fails would otherwise print hundreds of tracebacks
(_quiet_failed_io). A save that fails (a full or read-only disk) raises a one-line OSError that
names the step to resume from.
A run's config.json (:func:`record_run_config`) guards its workdir against another run's config
(:func:`check_run_config`), its data.json against other training images (:func:`check_train_data`),
and its run.lock against a second run training there at the same time (:func:`workdir_lock`).
"""
from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import sys
from typing import Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vdm import logging_utils
from vdm.model import Model, make_model
from vdm.train import TrainState, abstract_train_state

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "config.json"  # the run's config, in its workdir: record_run_config
LOCK_FILE = "run.lock"  # held by the run training in its workdir: workdir_lock
TRAIN_DATA = "data.json"  # a fingerprint of the run's training images: check_train_data


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)]
  return all(bool(np.isfinite(np.asarray(jax.device_get(x))).all()) for x in leaves)


def _abstract(target, sharding=None):
  def leaf(x):
    kwargs = {"sharding": sharding} if sharding is not None else {}
    return jax.ShapeDtypeStruct(x.shape, x.dtype, **kwargs)
  return jax.tree.map(leaf, target)


def _is_late_io_report(unraisable) -> bool:
  """Whether ``unraisable`` is a TensorStore read or write reporting to orbax's closed event loop:
  after one read of a restore (or write of a save) fails, orbax closes its loop, and each one
  still in flight then raises 'Event loop is closed' in ``call_soon_threadsafe`` (hundreds of
  tracebacks per failed restore or save)."""
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == "Event loop is closed"
          and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


def _keep_record(record) -> bool:
  """False for asyncio's '{Task,Future} exception was never retrieved' about a failed TensorStore
  read or write of orbax's (the restore or save reported the failure already), which names its
  store as tensorstore_spec or, for a chunk read, TensorStore({...}); True for any other record."""
  message = record.getMessage()
  return not ("exception was never retrieved" in message.split("\n", 1)[0]
              and ("tensorstore_spec" in message or "TensorStore({" in message))


def _quiet_failed_io() -> None:
  """Silence the aftermath of a failed read or write for the rest of the process (it comes from
  orbax's threads after the restore or save has returned): late reports
  (:func:`_is_late_io_report`) and asyncio's records of them (:func:`_keep_record`). Idempotent;
  every other unraisable exception and asyncio record is reported as before."""
  std_logging.getLogger("asyncio").addFilter(_keep_record)  # a no-op when there already
  if getattr(sys.unraisablehook, "vdm_quiet_io", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_late_io_report(unraisable):
      previous(unraisable)
  hook.vdm_quiet_io = True
  sys.unraisablehook = hook


class ModelMismatch(ValueError):
  """A checkpoint of another model: its parameters differ from the target's in names or shapes."""


def _check_params(manager: ocp.CheckpointManager, step: int, target: TrainState) -> None:
  """Raise ModelMismatch naming the first parameter whose name or shape differs between step
  ``step`` and ``target`` (and how many more do), from the checkpoint's metadata: before any array
  is read. Unreadable metadata is left to the restore to report."""
  try:
    saved = manager.item_metadata(step)["params"]
  except Exception:  # pylint: disable=broad-except
    return
  def shapes(tree) -> dict:
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  there, here = shapes(saved), shapes(target.params)
  differ = sorted(k for k in there.keys() | here.keys() if there.get(k) != here.get(k))
  if differ:
    show = lambda shape: "absent" if shape is None else f"shape {shape}"
    more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
    raise ModelMismatch(f"another model: params.{differ[0]} has {show(there.get(differ[0]))} in "
                        f"the checkpoint, {show(here.get(differ[0]))} in this config{more}")


def _restore(manager: ocp.CheckpointManager, step: int, target, sharding=None):
  """Step ``step`` of ``manager``, shaped like ``target`` (ModelMismatch: another model's). The
  reads' aftermath is silenced first: the metadata read fails, too, on a checkpoint whose data
  chunks are truncated, and leaves reads in flight."""
  _quiet_failed_io()
  _check_params(manager, step, target)
  return manager.restore(step, args=ocp.args.StandardRestore(_abstract(target, sharding)))


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  """orbax's manager of the steps under ``directory``, each a StandardCheckpointHandler item."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options),
                               item_handlers=ocp.StandardCheckpointHandler())


class Checkpointer:
  """``save(state)`` / ``restore_latest(target)`` under ``workdir/checkpoints/<step>``."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (the checkpoints kept on disk).")
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    # Synchronous: the run waits for each save anyway, and a failed write then raises here at
    # once (async, a step directory that cannot be made leaves the save waiting 300 s for it).
    self._manager = _manager(self.directory, max_to_keep=max_to_keep, create=True,
                             enable_async_checkpointing=False)
    self.last_good_step: Optional[int] = self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: TrainState, force: bool = False) -> bool:
    """Write ``state`` at its step (collective: call on every process). Returns whether it did:
    False if that step is already on disk or the parameters are not finite."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    if not _all_finite((state.params, state.ema_params)):
      logging.error("Not saving the checkpoint at step %d: its parameters are not finite "
                    "(last good checkpoint: %s).", step, self.last_good_step)
      return False
    # The state is replicated: saving host copies makes orbax write from process 0 alone (its
    # jax.Array handler would write replica slices from every process in parallel).
    _quiet_failed_io()  # a failed write leaves writes in flight reporting to a closed loop
    try:
      saved = self._manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=force)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"could not write checkpoint {step} in {self.directory} ({type(e).__name__}: "
                    f"{logging_utils.first_line(e)[:300]}): free space or make it writable, then rerun the same command to "
                    f"resume from step {self.last_good_step or 0}.") from e
    if not saved:
      raise RuntimeError(f"orbax did not write step {step} in {self.directory} (its newest step "
                         f"is {self._manager.latest_step()}): move the newer steps out of that "
                         "directory and resume.")
    self.last_good_step = step
    return True

  def restore_latest(self, target: TrainState, sharding=None) -> Optional[TrainState]:
    """The newest checkpoint that restores on every process, shaped like ``target``; None if there
    is none. Newer ones that failed are then moved aside (see the module docstring). Collective:
    the processes agree on the steps they see and on each step's outcome, so that a read that
    fails on one process alone does not leave the others training from a state it lacks."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    seen = logging_utils.from_every_process([len(steps), sum(steps)])
    if (seen != seen[0]).any():
      raise ValueError(f"the processes see different checkpoints under {self.directory} "
                       f"([count, sum of steps] by process: {seen.tolist()}): put the workdir on "
                       "a filesystem that every process reads alike.")
    failed = []
    for step in steps:
      try:
        state = _restore(self._manager, step, target, sharding)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint %s/%d could not be restored (%s: %s); trying the previous one.",
                        self.directory, step, type(e).__name__, logging_utils.first_line(e)[:200])
        state = None
      if not logging_utils.from_every_process([state is not None]).all():
        if state is not None:
          logging.warning("Checkpoint %s/%d could not be restored on every process; trying the "
                          "previous one.", self.directory, step)
        failed.append(step)
        continue
      self._set_aside(failed)
      self.last_good_step = step
      return state
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Move the step directories ``steps`` to ``checkpoints_unrestorable/`` (collective)."""
    if not steps:
      return
    aside = self.directory + "_unrestorable"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dest, n = os.path.join(aside, str(step)), 1
        while os.path.exists(dest):
          dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.replace(os.path.join(self.directory, str(step)), dest)
        logging.warning("Moved the unrestorable checkpoint %s/%d to %s; training writes its steps "
                        "again.", self.directory, step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vdm: unrestorable checkpoints set aside")
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager that never saves or deletes (orbax's read_only mode logs warnings on every use)."""
  return _manager(directory, create=False, save_interval_steps=0)


@contextlib.contextmanager
def _orbax_logs_off():
  """Drop orbax's log records: restore_path reports a failure itself, in one line."""
  logger = std_logging.getLogger("absl")
  drop = lambda record: "orbax" not in record.pathname
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class _Deleted(Exception):
  """A step was deleted while restore_path read it: list the steps again."""


@_orbax_logs_off()
def restore_path(path: str, target: TrainState, sharding=None) -> TrainState:
  """Restore one checkpoint: a step directory (``.../checkpoints/1000``), or a workdir or
  checkpoints directory (its newest good step). A training run beside this one may delete a step
  while it is read (its max_to_keep): the steps of a directory are then listed again."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise ValueError(f"--checkpoint={path} does not exist: give a step directory such as "
                     f"WORKDIR/{CHECKPOINT_DIR}/1000, or a workdir.")
  base = os.path.basename(path.rstrip("/"))
  held = os.path.join(path, CHECKPOINT_DIR)  # a workdir's (whose name may be a number: runs/1)
  if base.isdigit() and not os.path.isdir(held):
    try:
      with contextlib.closing(_reader(os.path.dirname(path))) as manager:
        return _restore(manager, int(base), target, sharding)
    except ModelMismatch as e:
      raise ValueError(f"--checkpoint={path} holds {e}: pass the config it was trained "
                       "with.") from None
    except Exception as e:  # pylint: disable=broad-except
      if not os.path.isdir(path):
        raise ValueError(f"--checkpoint={path} was deleted while it was read (a training run keeps "
                         "its newest training.max_to_keep steps): pass a newer step, or the "
                         "workdir.") from None
      raise ValueError(f"--checkpoint={path} could not be restored ({type(e).__name__}): it is "
                       "truncated, corrupt or from a different config; pass another step.") from None
  directory = held if os.path.isdir(held) else path
  for _ in range(3):
    try:
      with contextlib.closing(_reader(directory)) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
          try:
            return _restore(manager, step, target, sharding)
          except Exception as e:  # pylint: disable=broad-except
            if not os.path.isdir(os.path.join(directory, str(step))):
              raise _Deleted() from None
            reason = (f"holds {e}" if isinstance(e, ModelMismatch)
                      else f"could not be restored ({type(e).__name__})")
            logging.warning("Checkpoint %s/%d %s; trying the previous one.", directory, step, reason)
      break
    except (_Deleted, FileNotFoundError):  # a step deleted while read, or while orbax listed it
      continue
  else:
    raise ValueError(f"the checkpoints under {path} were deleted while they were read, three times "
                     "(a training run keeps its newest training.max_to_keep steps): rerun, or raise "
                     "the run's training.max_to_keep.")
  raise ValueError(f"no checkpoint under {path} restores into this config (none there, or each "
                   "truncated, corrupt or from another model): train first, or pass "
                   f"--checkpoint=WORKDIR/{CHECKPOINT_DIR}/STEP of a run of this config.")


# What may differ between the invocations on one run: how the same function is computed, how
# long and how often, how it is evaluated and sampled, where the data lie, and the step size
# (lowering it, or clipping, is the remedy for a diverged run: resume from the last good step).
COMPUTE_KEYS = ("model.dtype", "model.residual_dtype", "model.unroll", "model.remat",
                "model.norm_impl", "model.eval_fp32_fraction")
FREE_KEYS = COMPUTE_KEYS + (
    "training.num_steps", "training.log_every", "training.eval_every", "training.sample_every",
    "training.checkpoint_every", "training.max_to_keep", "training.max_nonfinite_steps", "eval.",
    "sampling.", "data.data_dir", "data.download", "data.path", "data.prefetch", "data.eval_split",
    "data.synthetic_num_test", "optimizer.learning_rate", "optimizer.grad_clip")
# Evaluating or sampling a trained run, only what defines its function and parameters must match,
# and what shapes the checkpointed state (the importance sampler's bins).
INFERENCE_KEYS = ("model.", "data.image_size", "data.channels", "data.vocab_size",
                  "loss.importance_num_bins")


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run_dir(path: str) -> str:
  """The workdir of ``path``: a workdir, its checkpoints directory or one of its step directories."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR:
    path = os.path.dirname(path)
  return os.path.dirname(path) if os.path.basename(path) == CHECKPOINT_DIR else path


def has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds anything (a step, or one being written)."""
  checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))


def record_run_config(config, workdir: str) -> None:
  """Write ``workdir/config.json`` (process 0; atomically, so a kill never leaves half a record).
  A record that differs (a resume that changed a free setting, e.g. the learning rate or the step
  count) is kept as config.<its time>.json: the steps before ran with its settings. The new record
  is written before the old one moves, so a full disk leaves the old one in place."""
  if logging_utils.is_main_process():
    path = os.path.join(workdir, RUN_CONFIG)
    record = json.loads(config.to_json_best_effort())
    same = False
    if os.path.isfile(path):
      try:
        same = read_config_json(path, "") == _flat(record)
      except ValueError:  # an unreadable record: keep it too
        pass
    logging_utils.write_json(path, record, keep=not same)


def config_items(config) -> dict:
  """A ConfigDict's values by dotted key, as its JSON record holds them."""
  return _flat(json.loads(config.to_json_best_effort()))


def read_config_json(path: str, fix: str) -> dict:
  """The config recorded at ``path`` (:func:`record_run_config`) by dotted key, or a ValueError
  that names the file and ends with ``fix`` (:func:`vdm.logging_utils.read_json`)."""
  return _flat(logging_utils.read_json(path, fix))


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Hold ``workdir/run.lock`` (an exclusive lock; process 0 of a run takes it) while training:
  a second run started on the same workdir would write over the first one's checkpoints and
  records. It is refused in one line naming the process that holds the lock. The kernel releases
  the lock when its holder exits, however it exits."""
  if not logging_utils.is_main_process():
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with logging_utils.exclusive(os.path.join(workdir, LOCK_FILE),
                               f"{workdir} is in use by another training run (process {{holder}}): "
                               "wait for it to end, or train in another --workdir."):
    yield


def check_train_data(workdir: str, fingerprint: str) -> None:
  """Refuse to resume a run on other training images than those its checkpoints were trained on
  (``fingerprint``: :meth:`vdm.input_pipeline.Split.fingerprint`), as when a file is replaced at
  the same data.path or a relative path finds another file: the config alone cannot tell. A
  workdir without checkpoints, or whose run predates the record, gets the record (process 0)."""
  path = os.path.join(workdir, TRAIN_DATA)
  if has_checkpoints(workdir) and os.path.isfile(path):
    recorded = logging_utils.read_json(path, ": restore it, or use a fresh --workdir.").get("train")
    if recorded != fingerprint:
      raise ValueError(f"{workdir} holds a run trained on other images ({recorded}; the data "
                       f"now has {fingerprint}): point data.path at the run's data, or use a "
                       "fresh --workdir.")
  elif logging_utils.is_main_process():
    logging_utils.write_json(path, {"train": fingerprint})


def check_run_config(config, path: str, mode: str = "eval") -> None:
  """Refuse a config that differs from the one training recorded in the run's config.json in what
  defines the run (``mode`` 'train') or its trained function ('eval', 'sample'), when the run at
  ``path`` (as :func:`run_dir`) has checkpoints: resuming or evaluating it with another seed,
  optimizer, data or model would silently mix two runs. Training also refuses checkpoints without
  a record (eval and sampling then take the config they are given)."""
  workdir = run_dir(path)
  recorded = os.path.join(workdir, RUN_CONFIG)
  if not has_checkpoints(workdir):
    return
  if not os.path.isfile(recorded):
    if mode == "train":  # a resume would go on unchecked, and record its own config as the run's
      raise ValueError(f"{workdir} has checkpoints but no {RUN_CONFIG}, the record of the settings "
                       "they were trained with: restore it (a config.<time>.json there is an "
                       "earlier record) or use a fresh --workdir.")
    return
  saved = read_config_json(recorded, ", the config of the run whose checkpoints are there: "
                           "restore it, or use a fresh --workdir.")
  current = config_items(config)
  if mode == "train":
    defining = lambda k: not k.startswith(FREE_KEYS)
  else:
    defining = lambda k: k.startswith(INFERENCE_KEYS) and not k.startswith(COMPUTE_KEYS)
  differ = [k for k in sorted(saved.keys() & current.keys()) if saved[k] != current[k]]
  changed = [k for k in differ if defining(k)]
  if mode == "train" and not changed and any(k.startswith("optimizer.") for k in differ):
    logging.warning("Resuming %s with %s.", workdir, ", ".join(
        f"{k}={current[k]!r} (was {saved[k]!r})" for k in differ if k.startswith("optimizer.")))
  if changed:
    shown = ", ".join(f"{k}={saved[k]!r} (now {current[k]!r})" for k in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise ValueError(f"{workdir} holds a run with {shown}{more}: use that run's config "
                     f"(--config=configs/run.py:{workdir}) or a fresh --workdir.")


def load_params(config, path: str, use_ema: bool = True,
                sharding=None) -> tuple[Model, dict, dict]:
  """(model, params, info) of a trained run for inference: the EMA (or, with ``use_ema=False``,
  the raw) parameters of the checkpoint at ``path`` (as :func:`restore_path`, placed with
  ``sharding`` if given), built from ``config``; info = {"checkpoint", "step", "ema"}."""
  check_run_config(config, path)
  model = make_model(config)
  state = restore_path(path, abstract_train_state(config, model), sharding)
  params = state.ema_params if use_ema else state.params
  return model, params, {"checkpoint": os.path.abspath(path), "step": int(state.step), "ema": use_ema}
