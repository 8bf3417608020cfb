"""One process of a multi-process `vdm.main` run (tests/test_distributed.py starts several).

Runs the real entry point with this process's argv (--coordinator_address, --num_processes,
--process_id, ...) and records, in $VDM_RECORD_DIR/process_<i>.npz:
  steps, indices  the training steps and the example indices this process read for each;
  files           every file Python opened for writing under --workdir;
  param_<k>       this process's copy of the parameters at its last checkpoint save
(written at exit).
"""
import atexit
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
from vdm import checkpoint, input_pipeline, main  # noqa: E402

RECORD_DIR = os.environ["VDM_RECORD_DIR"]
WORKDIR = os.path.abspath(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")))
steps, indices, written, last = [], [], [], {}


def _audit(event, args):
  if event != "open" or not isinstance(args[0], str):
    return
  path, mode, flags = args  # mode None: os.open (write_json's temporary file), known by its flags
  writes = set(mode) & set("wax+") if mode is not None else flags & (os.O_WRONLY | os.O_RDWR)
  if writes and os.path.abspath(path).startswith(WORKDIR):
    written.append(os.path.relpath(os.path.abspath(path), WORKDIR))


class _Recording:
  """A Split that notes which indices are read."""

  def __init__(self, split, step):
    self.split, self.step = split, step

  def __len__(self):
    return len(self.split)

  def get(self, idx):
    steps.append(self.step)
    indices.append(np.asarray(idx))
    return self.split.get(idx)


_batch = input_pipeline.TrainData.batch
_save = checkpoint.Checkpointer.save


def batch(self, step):
  real = self.split
  self.split = _Recording(real, step)
  try:
    return _batch(self, step)
  finally:
    self.split = real


def save(self, state, force=False):
  last["process"] = jax.process_index()
  last["params"] = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  return _save(self, state, force)


@atexit.register
def _write():
  np.savez(os.path.join(RECORD_DIR, f"process_{last['process']}.npz"), steps=np.array(steps),
           indices=np.stack(indices), files=np.array(sorted(set(written)) or [""]),
           **{f"param_{k}": p for k, p in enumerate(last["params"])})


input_pipeline.TrainData.batch = batch
checkpoint.Checkpointer.save = save
sys.addaudithook(_audit)
main.run()
