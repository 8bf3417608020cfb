"""experiments/schedule_variance.py: the fitted shape lowers the variance at the same ELBO (toy), and
the script runs on a checkpoint, reading the trained endpoints and keeping them."""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/
from configs import quickstart  # noqa: E402
from conftest import run_script  # noqa: E402
from vdm import checkpoint, train  # noqa: E402
from vdm.model import make_model  # noqa: E402

SCRIPT = os.path.join(ROOT, "experiments", "schedule_variance.py")


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True)


def test_toy_mode_lowers_the_variance_at_equal_elbo(tmp_path):
  out = tmp_path / "toy.json"
  proc = _run("--toy", f"--output={out}", "--n_features=32", "--fit_steps=100", "--draws=100",
              "--test_batch_size=32")
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  assert res["commit"] and res["date"] and res["jax"], res  # what RESULTS.md needs beside a figure
  c = res["comparison"]
  assert res["variance_ratio"] == c["variance_ratio"] < 1.0
  assert abs(c["mean_difference"]) < 4 * c["mean_difference_se"]
  np.testing.assert_allclose([res["endpoints"]["fitted_gamma_0"], res["endpoints"]["fitted_gamma_1"]],
                             [res["endpoints"]["gamma_0"], res["endpoints"]["gamma_1"]], atol=1e-4)
  assert len(res["gamma_grid"]["fitted"]) == 101 and len(res["fit_second_moment"]) == 100


def test_bad_flags_give_one_line_and_status_2(tmp_path):
  for flag, message in (("--draws=1", "draws=1 must be an integer >= 2"),
                        ("--n_features=0", "n_features=0 must be an integer >= 1"),
                        ("--fit_steps=0", "--fit_steps=0 must be >= 1")):  # the flag's name
    proc = _run("--toy", f"--output={tmp_path / 'x.json'}", flag)
    assert proc.returncode == 2 and not (tmp_path / "x.json").exists(), (flag, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1].startswith(f"vdm: error: {message}"), flag
  proc = _run("--notoy", "--config=configs/quickstart.py", "--config.model.num_timesteps=100",
              f"--workdir={tmp_path}", f"--output={tmp_path / 'x.json'}")
  assert proc.returncode == 2 and not (tmp_path / "x.json").exists(), proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(  # its premise fails in discrete time
      "vdm: error: model.num_timesteps=100: the variance-minimising shape is for a continuous"), (
      proc.stderr[-2000:])


def _finite(o):
  """No NaN (written as null) or infinity anywhere in a JSON value."""
  if isinstance(o, dict):
    return all(_finite(v) for v in o.values())
  if isinstance(o, list):
    return all(_finite(v) for v in o)
  return o is not None and (not isinstance(o, float) or math.isfinite(o))


def test_runs_on_a_checkpoint_and_keeps_its_endpoints(tmp_path):
  config = quickstart.get_config()
  model = make_model(config)
  state = train.create_train_state(config, model)
  # Endpoints other than the config's, so the script must read them from the checkpoint.
  schedule = {"params": {"b": jnp.float32(-11.0), "w": jnp.float32(15.0)}}
  state = state.replace(params={**state.params, "schedule": schedule},
                        ema_params={**state.ema_params, "schedule": schedule})
  checkpoint.Checkpointer(str(tmp_path)).save(state, force=True)

  out = tmp_path / "sv.json"
  proc = _run("--config=configs/quickstart.py", f"--workdir={tmp_path}", f"--output={out}",
              "--fit_steps=3", "--fit_batch_size=8", "--n_features=16", "--test_batch_size=8",
              "--draws=4", "--config.model.dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  assert _finite(res), res
  assert res["info"]["step"] == 0 and res["info"]["schedule"] == "learned_linear"
  assert res["info"]["eps_dtype"] == "float32"  # a bf16 bound's fp32 share depends on the shape
  e = res["endpoints"]
  np.testing.assert_allclose([e["gamma_0"], e["gamma_1"]], [-11.0, 4.0], atol=1e-5)
  np.testing.assert_allclose([e["fitted_gamma_0"], e["fitted_gamma_1"]], [-11.0, 4.0], atol=1e-4)
  np.testing.assert_allclose(res["info"]["trained_gamma"], np.linspace(-11.0, 4.0, 101), atol=1e-4)
  assert res["comparison"]["linear"]["num_examples"] == 8 and res["comparison"]["fitted"]["draws"] == 4


STOPPED_IN_THE_COMPARISON = r"""
import json, sys
sys.path.insert(0, ".")
import numpy as np
from experiments import schedule_variance
from vdm import variance

def stop(eps_fn, module, linear, fitted, x, rng, *, draws, vocab_size):
  # What the comparison was given, then a time limit striking during it.
  t = np.linspace(0.0, 1.0, 101)
  compared.append({"linear": module.apply(linear, t), "fitted": module.apply(fitted, t),
                   "num_examples": x.shape[0], "draws": draws, "vocab_size": vocab_size})
  raise KeyboardInterrupt

variance.compare_shapes = stop
schedule_variance.FLAGS(["schedule_variance.py", "--toy", "--fit_steps=3", "--fit_batch_size=4",
                         "--n_features=8", "--test_batch_size=4", "--draws=2"])
runs, compared = [], []
for lr in (1e-6, 0.3):
  schedule_variance.FLAGS.learning_rate = lr
  saved = []
  try:
    schedule_variance.run(lambda r: saved.append(json.dumps(r, default=lambda o: np.asarray(o).tolist())))
  except KeyboardInterrupt:
    runs.append([json.loads(s) for s in saved])
print(json.dumps({"runs": runs, "compared": compared},
                 default=lambda o: np.asarray(o).tolist()))
"""


@pytest.mark.ci_once  # the script's own control flow
def test_the_comparison_is_of_the_linear_and_the_saved_fit_which_a_stop_there_keeps():
  """run() hands the fit to ``save`` before the comparison, so a time limit that strikes there
  keeps the fitted schedule; the comparison gets the exactly linear γ between the same endpoints
  and the fitted γ that was saved, on --test_batch_size images with --draws; --learning_rate is
  the fit's (a tiny one leaves the start point)."""
  out = run_script(STOPPED_IN_THE_COMPARISON)
  runs, compared = out["runs"], out["compared"]
  assert [len(saved) for saved in runs] == [1, 1], runs
  slow, fast = (saved[0] for saved in runs)
  for res in (slow, fast):
    assert "comparison" not in res and len(res["fit_second_moment"]) == 3
    assert res["flags"]["fit_steps"] == 3 and len(res["gamma_grid"]["fitted"]) == 101
  assert (slow["flags"]["learning_rate"], fast["flags"]["learning_rate"]) == (1e-6, 0.3)
  moved = np.abs(np.subtract(fast["gamma_grid"]["fitted"], slow["gamma_grid"]["fitted"])).max()
  assert moved > 0.05, moved
  for res, given in zip((slow, fast), compared):
    e = res["endpoints"]
    assert (given["num_examples"], given["draws"], given["vocab_size"]) == (4, 2, 16)
    np.testing.assert_allclose(given["linear"], e["gamma_0"] + (e["gamma_1"] - e["gamma_0"]) *
                               np.linspace(0.0, 1.0, 101), atol=1e-4)
    # the two grids are computed apart, in fp32 at |γ| up to 13.3 (1.2e-6 apart on jax 0.10.2)
    np.testing.assert_allclose(given["fitted"], res["gamma_grid"]["fitted"], rtol=0, atol=1e-5)
