"""Checkpoints of the TrainState with orbax: keep the last N, resume from the newest good one.

A checkpoint holds step, params, ema_params, opt_state, rng and the non-finite counter; the
data position is the step (see vdm.input_pipeline). Checkpoints with non-finite parameters are
never written. If the newest checkpoint cannot be restored (truncated, corrupt), the failure is
logged and the next older one is tried; the bad one is replaced when training reaches its step
again.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vdm.model import Model, make_model
from vdm.train import TrainState, abstract_train_state

CHECKPOINT_DIR = "checkpoints"


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)]
  return all(bool(np.isfinite(np.asarray(jax.device_get(x))).all()) for x in leaves)


def _abstract(target, sharding=None):
  def leaf(x):
    kwargs = {"sharding": sharding} if sharding is not None else {}
    return jax.ShapeDtypeStruct(x.shape, x.dtype, **kwargs)
  return jax.tree.map(leaf, target)


class Checkpointer:
  """``save(state)`` / ``restore_latest(target)`` under ``workdir/checkpoints/<step>``."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(max_to_keep), 1), create=True))
    self.last_good_step: Optional[int] = self._manager.latest_step()
    self._unrestorable: set[int] = set()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def needs_rewrite(self, step: int) -> bool:
    """Whether ``step`` holds a checkpoint that failed to restore: training saves again when it
    reaches that step, whatever its checkpoint interval (a SIGTERM save may sit off it)."""
    return step in self._unrestorable

  def save(self, state: TrainState, force: bool = False) -> bool:
    """Write ``state`` at its step (collective: call on every process). Returns whether it did."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      if step not in self._unrestorable:
        return False
      logging.warning("Replacing the unrestorable checkpoint %s/%d.", self.directory, step)
      self._manager.delete(step)
      self._unrestorable.discard(step)
    if not _all_finite((state.params, state.ema_params)):
      logging.error("Not saving the checkpoint at step %d: its parameters are not finite "
                    "(last good checkpoint: %s).", step, self.last_good_step)
      return False
    # The state is replicated: saving host copies makes orbax write from process 0 alone (its
    # jax.Array handler would write replica slices from every process in parallel).
    self._manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=force)
    self._manager.wait_until_finished()
    self.last_good_step = step
    return True

  def restore_latest(self, target: TrainState, sharding=None) -> Optional[TrainState]:
    """The newest checkpoint that restores, shaped like ``target``; None if there is none."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(target, sharding)))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint %s/%d could not be restored (%s: %s); trying the previous one.",
                        self.directory, step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        self._unrestorable.add(step)
        continue
      self.last_good_step = step
      return state
    return None

  def close(self) -> None:
    self._manager.close()


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager that never saves or deletes (orbax's read_only mode logs warnings on every use)."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, save_interval_steps=0))


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


@_orbax_logs_off()
def restore_path(path: str, target: TrainState, sharding=None) -> TrainState:
  """Restore one checkpoint: a step directory (``.../checkpoints/1000``), or a workdir or
  checkpoints directory (its newest good step)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise ValueError(f"--checkpoint={path} does not exist: give a step directory such as "
                     f"WORKDIR/{CHECKPOINT_DIR}/1000, or a workdir.")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit():
    manager = _reader(os.path.dirname(path))
    try:
      return manager.restore(int(base), args=ocp.args.StandardRestore(_abstract(target, sharding)))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--checkpoint={path} could not be restored ({type(e).__name__}): it is "
                       "truncated, corrupt or from a different config; pass another step.") from None
    finally:
      manager.close()
  directory = os.path.join(path, CHECKPOINT_DIR) if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) else path
  manager = _reader(directory)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return manager.restore(step, args=ocp.args.StandardRestore(_abstract(target, sharding)))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint %s/%d could not be restored (%s); trying the previous one.",
                        directory, step, type(e).__name__)
  finally:
    manager.close()
  raise ValueError(f"no restorable checkpoint under {path}: train first, or pass "
                   f"--checkpoint=WORKDIR/{CHECKPOINT_DIR}/STEP.")


def load_params(config, path: str, use_ema: bool = True) -> tuple[Model, dict, dict]:
  """(model, params, info) of a trained run for inference: the EMA (or, with ``use_ema=False``,
  the raw) parameters of the checkpoint at ``path`` (as :func:`restore_path`), built from
  ``config``; info = {"checkpoint", "step", "ema"}."""
  model = make_model(config)
  state = restore_path(path, abstract_train_state(config, model))
  params = state.ema_params if use_ema else state.params
  return model, params, {"checkpoint": os.path.abspath(path), "step": int(state.step), "ema": use_ema}
