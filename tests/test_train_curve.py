"""experiments/train_curve.py: timed training with evaluations at marks, its checkpoint, the plot,
and the paired precision comparison of experiments/likelihood.py on that checkpoint."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/quickstart.py", "--config.data.image_size=4",
        "--config.training.batch_size=16", "--config.eval.batch_size=64",
        "--config.data.synthetic_num_test=128"]


def _script(name, *args, check=True):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args], cwd=ROOT,
                        capture_output=True, text=True, check=check)


@pytest.mark.ci_once  # the scripts' control flow; test_likelihood and test_train make its jax calls
def test_curve_marks_checkpoint_plot_and_dtype_comparison(tmp_path):
  out, workdir, png = tmp_path / "curve.json", tmp_path / "run", tmp_path / "curve.png"
  _script("train_curve.py", *TINY, "--seconds=3", "--marks=1,2,9", "--final_draws=3",
          f"--output={out}", f"--workdir={workdir}", "--compare_dtype=bfloat16",
          "--compare_batch_size=64", "--compare_samples=2")
  res = json.loads(out.read_text())
  cmp = res["dtype_comparison"]
  assert (cmp["a"], cmp["b"], cmp["num_images"]) == ("float32", "bfloat16", 128)
  assert (cmp["a_eval_fp32_fraction"], cmp["b_eval_fp32_fraction"]) == (0.0, 0.3)
  assert 0 < cmp["max_abs_difference_bpd"] < 0.1 and cmp["difference_se"] < cmp["a_se"] / 10
  by_time = cmp["by_time"]  # where in t the two precisions differ, over the same images
  assert by_time["num_images"] == 128 and len(by_time["bin_difference_bpd"]) == 10
  assert abs(by_time["difference_bpd"]) < 0.1 and by_time["difference_se"] > 0
  pts = res["points"]
  assert [p["mark_seconds"] for p in pts] == [1.0, 2.0, 3.0]  # 9 > --seconds is dropped
  for p, q in zip(pts, pts[1:]):
    assert q["train_seconds"] > p["train_seconds"] and q["step"] > p["step"]
  for p in pts:
    assert p["train_seconds"] >= p["mark_seconds"] and p["num_test_images"] == 128
    assert math.isfinite(p["test_bpd"]) and p["test_bpd_se"] > 0 and p["nonfinite"] == 0
    terms = p["test_prior_bpd"] + p["test_diffusion_bpd"] + p["test_reconstruction_bpd"]
    np.testing.assert_allclose(terms, p["test_bpd"], rtol=1e-5)
  assert res["steps"] == pts[-1]["step"] and res["compile_seconds"] > 0
  assert "compilation_cache_dir" in res  # a cached compile is a load, not a compile
  assert "--xla_backend_optimization_level=0" in res["xla_flags"]  # the tests' (conftest)
  np.testing.assert_allclose(res["images_per_second"], res["steps"] * 16 / res["train_seconds"])
  assert set(res["first_seconds_reaching"]) == {"3.575", "3.4"}

  assert [(p["test_draws"], p["test_bpd_draws_se"]) for p in pts[:-1]] == [(1, None)] * 2
  assert pts[-1]["test_draws"] == 3

  # The checkpoint is the final state, and re-evaluating its raw parameters gives the last point:
  # the mean over eval seeds seed, seed + 1, seed + 2, their standard error, and the first draw's
  # per-image standard error.
  sys.path.insert(0, ROOT)
  from configs import quickstart
  from vdm import checkpoint, input_pipeline, train
  config = quickstart.get_config()
  config.update_from_flattened_dict({"data.image_size": 4, "training.batch_size": 16,
                                     "eval.batch_size": 64, "data.synthetic_num_test": 128})
  model, params, info = checkpoint.load_params(config, str(workdir), use_ema=False)
  assert info["step"] == res["steps"] and not info["ema"]
  mesh = train.make_mesh()
  split = input_pipeline.load_split(config.data, config.data.eval_split, config.seed)
  draws = []
  for d in range(3):
    config.eval.seed = quickstart.get_config().eval.seed + d
    draws.append(train.evaluate(train.make_eval_step(config, model, mesh), params, split, config,
                                mesh))
  bpd = np.array([d["bpd"] for d in draws])
  assert len(set(bpd)) == 3  # three different draws
  np.testing.assert_allclose(bpd.mean(), pts[-1]["test_bpd"], rtol=1e-5)
  np.testing.assert_allclose(bpd.std(ddof=1) / np.sqrt(3), pts[-1]["test_bpd_draws_se"], rtol=1e-3)
  np.testing.assert_allclose(draws[0]["bpd_stderr"], pts[-1]["test_bpd_se"], rtol=1e-5)

  _script("train_curve.py", f"--plot={png}", str(out))
  assert png.stat().st_size > 10_000

  lik = tmp_path / "likelihood.json"
  _script("likelihood.py", *TINY, f"--workdir={workdir}", "--noema", "--num_images=128",
          "--num_time_samples=2", "--timesteps=0", "--is_fit_batches=1", "--variance_repeats=3",
          "--ode_num_images=0", "--compare_dtype=bfloat16", f"--output={lik}")
  lik = json.loads(lik.read_text())
  # Importance sampling ran first; the comparison is still of the model's parameters.
  assert set(lik["elbo"]) == {"continuous", "continuous_importance"}
  cmp = lik["dtype_comparison"]
  assert (cmp["a"], cmp["b"], cmp["num_images"]) == ("float32", "bfloat16", 128)
  assert (cmp["a_eval_fp32_fraction"], cmp["b_eval_fp32_fraction"]) == (0.0, 0.3)
  assert 0 < cmp["max_abs_difference_bpd"] < 0.1 and cmp["difference_se"] < cmp["a_se"] / 10


STOPPED_IN_THE_LAST_DRAWS = r"""
import json, sys
sys.path.insert(0, ".")
from configs import quickstart
from experiments import train_curve
from vdm import train

config = quickstart.get_config()
config.update_from_flattened_dict({"data.image_size": 4, "training.batch_size": 16,
                                   "eval.batch_size": 64, "data.synthetic_num_test": 128})
evaluate, calls, saved = train.evaluate, [], []

def evaluate_until_the_third(*args, **kwargs):  # a time limit striking during the second draw
  calls.append(1)
  if len(calls) == 3:
    raise KeyboardInterrupt
  return evaluate(*args, **kwargs)

train.evaluate = evaluate_until_the_third
clock = iter(range(10**6))  # 0.1 s a reading: the marks, not the host's load, decide the steps
train_curve.time = type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock) / 10)})
try:
  train_curve.run_curve(config, 1.0, [0.5, 1.0], save=lambda r: saved.append(json.dumps(r)),
                        final_draws=4)
except KeyboardInterrupt:
  print(saved[-1])
"""


@pytest.mark.ci_once  # the script's own control flow
def test_the_last_mark_is_saved_after_its_first_draw():
  """A run stopped during the last mark's draws keeps that mark's point, from the draws it
  finished: the point was saved only after all --final_draws (16 in the lease)."""
  r = subprocess.run([sys.executable, "-c", STOPPED_IN_THE_LAST_DRAWS], cwd=ROOT,
                     capture_output=True, text=True, check=True)
  points = json.loads(r.stdout.strip().splitlines()[-1])["points"]
  assert [(p["mark_seconds"], p["test_draws"]) for p in points] == [(0.5, 1), (1.0, 1)], points
  assert math.isfinite(points[-1]["test_bpd"]) and points[-1]["test_bpd_draws_se"] is None


@pytest.mark.ci_once  # the script's own checks, many processes
def test_bad_marks_and_missing_data_are_one_line_errors(tmp_path):
  out = str(tmp_path / "c.json")
  open(out, "w").close()
  used = tmp_path / "used"  # another run's checkpoints, which the likelihood scripts would load
  os.makedirs(used / "checkpoints" / "5")
  for args, words in ((["--marks=abc"], "must be numbers"), (["--seconds=0"], "must be > 0"),
                      (["--config.data.source=npz", "--config.data.path=/nonexistent.npz"], "npz"),
                      (["--config.optimizer.learning_rate=-2e-4"],
                       "learning_rate=-0.0002 must be finite and > 0"),
                      (["--eval_batches=-1"], "--eval_batches=-1 must be >= 0"),
                      (["--final_draws=0"], "--final_draws=0 must be >= 1"),
                      ([f"--workdir={used}"], "already holds checkpoints"),
                      ([f"--workdir={out}"],  # a file, found before training, not after it
                       f"--workdir={out} is not a writable directory"),
                      (["--config.model.n_embdd=64"], "unknown config key 'n_embdd'")):
    proc = _script("train_curve.py", *TINY, f"--output={out}", *args, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("vdm: error:") and words in line, proc.stderr[-2000:]
  assert os.path.getsize(out) == 0  # not replaced by a result

