"""Scaling without changes: 8 simulated CPU devices match one device, and two processes joined by
``jax.distributed`` train through `vdm.main`, each reading its own shard, with only process 0
writing. The device count is fixed when jax starts, so each case runs in fresh subprocesses."""
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import run_script, subprocess_env  # pylint: disable=g-bad-import-order
from test_main import ROOT, TINY, _cmd  # pylint: disable=g-bad-import-order
from test_reliability import restore  # pylint: disable=g-bad-import-order

SHARDED_VS_ONE_DEVICE = r"""
import json, re, sys
import jax, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, ".")
from configs import quickstart
from vdm import input_pipeline as ip, model as model_lib, train

assert jax.device_count() == 8
config = quickstart.get_config()
config.training.batch_size = 16
model = model_lib.make_model(config)
data = ip.TrainData(ip.load_split(config.data, "train", config.seed), 16, config.seed)
out = {}
for n in (8, 1):
  mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
  step = train.make_train_step(config, model, mesh)
  state = train.create_train_state(config, model, mesh)
  losses = []
  for k in range(3):
    batch = ip.to_global(data.batch(k), train.batch_sharding(mesh))
    assert len(batch.addressable_shards) == n and batch.addressable_shards[0].data.shape[0] == 16 // n
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  out[n] = (losses, [np.asarray(p) for p in jax.tree.leaves(jax.device_get(state.params))])
  sample = train.make_sample_fn(config, model, "ancestral", 3, 5, mesh)  # padded to 8 on 8
  hlo = sample.lower(state.params, jax.random.PRNGKey(1)).compile().as_text()
  out[n] += (sorted(set(re.findall(r"f32\[(\d+),8,8,3\]", hlo))),
             np.asarray(sample(state.params, jax.random.PRNGKey(1))))
print(json.dumps({
    "sample_batch_8": out[8][2], "sample_batch_1": out[1][2],
    "samples_identical": bool(np.array_equal(out[8][3], out[1][3])),
    "loss_8": out[8][0], "loss_1": out[1][0],
    "max_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(out[8][1], out[1][1])),
    "max_param_change": max(float(np.abs(a).max()) for a in out[1][1]),
    "identical": all(np.array_equal(a, b) for a, b in zip(out[8][1], out[1][1]))}))
"""


def test_eight_devices_match_one_device():
  """3 steps of the quickstart model on a global batch of 16: sharded 8 ways (2 per device) vs on
  one device, the same loss and parameters to float tolerance. Then 5 samples: each of 8 devices
  runs the net on 1 of them (padded to 8; before, each ran all 5), and the images are the same."""
  out = run_script(SHARDED_VS_ONE_DEVICE, devices=8)
  print(out)
  np.testing.assert_allclose(out["loss_8"], out["loss_1"], rtol=1e-5)
  assert out["max_param_diff"] < 1e-5, out
  assert out["sample_batch_8"] == ["1"] and out["sample_batch_1"] == ["5"], out
  assert out["samples_identical"], out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_read_their_shards_and_only_process_0_writes(tmp_path):
  """Two processes (2 CPU devices each, so 4 in all) train 4 steps with a global batch of 8."""
  workdir, records = str(tmp_path / "run"), tmp_path / "records"
  records.mkdir()
  num_steps, batch, port = 4, 8, _free_port()
  args = [*TINY, f"--config.training.num_steps={num_steps}", "--config.training.eval_every=4",
          "--config.training.sample_every=4", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2"]
  env = subprocess_env(devices=2, VDM_RECORD_DIR=str(records))
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "_distributed_worker.py"),
       *_cmd(workdir, *args, f"--process_id={i}")[3:]], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = []
  for proc in procs:
    _, err = proc.communicate(timeout=900)
    errs.append(err)
  for proc, err in zip(procs, errs):
    assert proc.returncode == 0, err[-3000:]
  assert "4 devices" in errs[0] and "step 4/4" in errs[0]

  rec = [np.load(records / f"process_{i}.npz") for i in range(2)]
  # Each process read exactly its half of every global batch, nothing more.
  sys.path.insert(0, ROOT)
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from vdm import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.data.update(image_size=4, channels=1, synthetic_num_train=64)
  full = ip.TrainData(ip.load_split(config.data, "train", config.seed), batch, config.seed)
  for i, r in enumerate(rec):
    assert list(r["steps"]) == list(range(num_steps))
    for k in range(num_steps):
      np.testing.assert_array_equal(r["indices"][k], full.indices(k)[i * batch // 2:(i + 1) * batch // 2])
  assert not set(rec[0]["indices"].ravel()) & set(rec[1]["indices"].ravel())

  # Both processes hold the same parameters, and process 0's checkpoint holds them.
  params = [[r[f"param_{k}"] for k in range(len([n for n in r.files if n.startswith("param_")]))]
            for r in rec]
  assert len(params[0]) == len(params[1]) > 0
  assert all(np.array_equal(a, b) for a, b in zip(*params))
  saved = restore(workdir, num_steps)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved["params"]), params[0]))

  # Only process 0 writes config, logs, samples, results and checkpoints; process 1 writes
  # nothing but its write probe.
  written = [set(re.sub(r"\.json\.\w+\.tmp$", ".json.tmp", f)  # write_json's temporary files
                   for f in r["files"] if f and not f.startswith(".write_test_")) for r in rec]
  assert {"config.json.tmp", "train_eval.json.tmp", "samples/step_4.npz"} <= written[0], written[0]
  assert any(f.startswith("tensorboard/events.out.tfevents") for f in written[0])
  assert any(f.endswith("_CHECKPOINT_METADATA") for f in written[0])
  assert not written[1], written[1]
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
