"""experiments/train_curve.py: timed training with evaluations at marks, its checkpoint, the plot,
and the paired precision comparison of experiments/likelihood.py on that checkpoint."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_script

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
  assert (cmp["num_samples"], cmp["batch_size"]) == (2, 64)  # --compare_samples, _batch_size
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
  _script("likelihood.py", *TINY, f"--workdir={workdir}", "--noema", "--num_images=0",
          "--num_time_samples=2", "--timesteps=0", "--is_fit_batches=1", "--variance_repeats=3",
          "--ode_num_images=0", "--compare_dtype=bfloat16", f"--output={lik}")
  lik = json.loads(lik.read_text())
  # Importance sampling ran first; the comparison is still of the model's parameters.
  assert set(lik["elbo"]) == {"continuous", "continuous_importance"}
  # --num_images=0: the whole test split (128 images; the train split holds 8,192).
  assert [s["num_images"] for s in lik["elbo"].values()] == [128, 128], lik["elbo"]
  cmp = lik["dtype_comparison"]
  assert (cmp["a"], cmp["b"], cmp["num_images"]) == ("float32", "bfloat16", 128)
  assert (cmp["a_eval_fp32_fraction"], cmp["b_eval_fp32_fraction"]) == (0.0, 0.3)
  assert (cmp["num_samples"], cmp["batch_size"]) == (2, 128)  # --num_time_samples, --batch_size
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
  points = run_script(STOPPED_IN_THE_LAST_DRAWS)["points"]
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


def test_plot_refuses_files_that_are_not_curves_in_one_line(tmp_path):
  png, broken = tmp_path / "curves.png", tmp_path / "broken.json"
  broken.write_text('{"points":')
  no_model = tmp_path / "no_model.json"  # a curve's top-level keys, but no config.model
  no_model.write_text('{"config": {}, "points": [], "images_per_second": 1}')
  malformed = tmp_path / "malformed.json"  # points that are no list
  malformed.write_text('{"config": {}, "points": 3, "images_per_second": 1}')
  results = os.path.join(ROOT, "experiments", "results", "h100_2026-11-22_s5")
  curve = os.path.join(results, "curve_default_f03_a581b67.json")
  sweep = os.path.join(results, "sweep_a581b67.json")
  for path, words in ((tmp_path / "missing.json", "missing.json (FileNotFoundError"),
                      (broken, "broken.json (JSONDecodeError"),
                      (sweep, "sweep_a581b67.json is not a training curve"),
                      (no_model, "no_model.json is not a training curve (it lacks 'model')"),
                      (malformed, "malformed.json is not a training curve (a malformed part:")):
    proc = _script("train_curve.py", f"--plot={png}", curve, str(path), check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("vdm: error:") and words in line, proc.stderr
    assert line.endswith("pass the JSON files that train_curve.py --output wrote.")
  assert not png.exists()  # nothing drawn from the good file either


def test_plot_draws_a_point_whose_standard_error_is_unknown(tmp_path):
  """A curve evaluated on one test image has no standard error (summarize_eval: nan, written as
  null): --plot draws the point without an error bar, instead of calling the file no curve."""
  results = os.path.join(ROOT, "experiments", "results", "h100_2026-11-22_s5")
  with open(os.path.join(results, "curve_default_f03_a581b67.json")) as f:
    res = json.load(f)
  res["points"][0]["test_bpd_se"] = None
  one_image, png = tmp_path / "one_image.json", tmp_path / "curves.png"
  one_image.write_text(json.dumps(res))
  _script("train_curve.py", f"--plot={png}", str(one_image))
  assert png.stat().st_size > 10_000


FAKE_CLOCK = r"""
import json, sys
sys.path.insert(0, ".")
from configs import quickstart
from experiments import train_curve
from vdm import train

config = quickstart.get_config()
config.update_from_flattened_dict({"data.image_size": 4, "training.batch_size": 16,
                                   "eval.batch_size": 64, "data.synthetic_num_test": 128})
now = [0.0]
def reading():  # a clock of 1/8 s a reading (exact in binary)
  now[0] += 0.125
  return now[0]
train_curve.time = type("Clock", (), {"perf_counter": staticmethod(reading)})
"""

CLOCKED = FAKE_CLOCK + r"""
# Compiling costs 64 s of the clock, an evaluation 128 s.
evaluate, make_train_step, calls = train.evaluate, train.make_train_step, []

def slow_evaluate(*args, **kwargs):  # the marks' bounds: 3.5, then 3.3 (only the 2nd reaches 3.4)
  now[0] += 128.0
  out = evaluate(*args, **kwargs)
  calls.append(out["bpd"])
  return {**out, "bpd": (3.5, 3.3)[len(calls) - 1]}

class SlowCompile:
  def __init__(self, lowered):
    self.lowered = lowered
  def compile(self):
    now[0] += 64.0
    return self.lowered.compile()

class Lowerable:
  def __init__(self, jitted):
    self.jitted = jitted
  def lower(self, *args, **kwargs):
    return SlowCompile(self.jitted.lower(*args, **kwargs))

train.evaluate = slow_evaluate
train.make_train_step = lambda *a, **k: Lowerable(make_train_step(*a, **k))
res, state = train_curve.run_curve(config, 1.0, [0.3, 0.35, 1.0], use_ema=True, eval_batches=1)
mesh = train.make_mesh()
eval_step = train.make_eval_step(config, train_curve.make_model(config), mesh)
split = train_curve.input_pipeline.load_split(config.data, config.data.eval_split, config.seed)
res["ema_bpd"], res["raw_bpd"] = (evaluate(eval_step, p, split, config, mesh, 1)["bpd"]
                                  for p in (state.ema_params, state.params))
points = [{"train_seconds": 61.0, "test_bpd": 4.0}, {"train_seconds": 118.5, "test_bpd": 3.575},
          {"train_seconds": 170.0, "test_bpd": 3.2}]
res["pure"] = {"reaching": [train_curve.first_mark_reaching(points, b) for b in (4.0, 3.575, 3.4, 3.1)],
               "marks": train_curve.parse_marks(["60", "30", "30.0", "330", "400"], 330),
               "reference": train_curve.REFERENCE, "targets": train_curve.TARGETS_BPD}
# main() hands its flags to run_curve (here a stand-in that records them).
import os, tempfile
calls = []
train_curve.run_curve = lambda *args: (calls.append(args), ({"images_per_second": 1.0,
                                                             "first_seconds_reaching": {}}, None))[1]
train_curve.FLAGS(["train_curve.py", "--config=configs/quickstart.py", "--seconds=7", "--marks=30,3",
                   "--params=ema", "--eval_batches=2", "--final_draws=5",
                   "--output=" + os.path.join(tempfile.mkdtemp(), "c.json")])
train_curve.main(["train_curve.py"])
args = calls[0]
res["main"] = {"seconds": args[1], "marks": args[2], "use_ema": args[3], "eval_batches": args[4],
               "final_draws": args[6]}
print(json.dumps(res))
"""


@pytest.mark.ci_once  # the script's own control flow
def test_the_curve_clock_counts_training_steps_only():
  """A fake clock whose compile takes 64 s and each evaluation 128 s: every point's training
  seconds stay within two readings after its mark (neither counted), a mark that the previous
  mark's last step passed has no point, images/s are steps over those seconds, the targets'
  first seconds come from the marks' bounds, the points evaluate the EMA parameters on
  --eval_batches batches (main() passes on --params, --eval_batches, --final_draws, --seconds
  and --marks); the reference points are the published code's (issue 4)."""
  res = run_script(CLOCKED)
  pts = res["points"]
  assert [p["mark_seconds"] for p in pts] == [0.3, 1.0], pts  # 0.35: passed by the 0.3 mark's step
  for p in pts:
    assert p["mark_seconds"] <= p["train_seconds"] <= p["mark_seconds"] + 0.25, p
    assert p["num_test_images"] == 64 and p["test_draws"] == 1
  assert res["compile_seconds"] >= 64 and res["train_seconds"] == pts[-1]["train_seconds"]
  assert res["steps"] == pts[-1]["step"] > pts[0]["step"] > 0
  np.testing.assert_allclose(res["images_per_second"], res["steps"] * 16 / res["train_seconds"])
  assert res["first_seconds_reaching"] == {"3.575": pts[0]["train_seconds"],
                                           "3.4": pts[1]["train_seconds"]}
  assert res["params"] == "ema" and res["ema_bpd"] != res["raw_bpd"]
  terms = sum(pts[-1][f"test_{k}_bpd"] for k in ("prior", "diffusion", "reconstruction"))
  np.testing.assert_allclose(terms, res["ema_bpd"], rtol=1e-5)
  pure = res["pure"]
  assert pure["reaching"] == [61.0, 118.5, 170.0, None]
  assert pure["marks"] == [30.0, 60.0, 330.0]
  assert pure["reference"]["seconds"] == [60.0, 120.0, 180.0, 300.0, 330.0]
  assert pure["reference"]["bpd"] == [4.37, 3.90, 3.74, 3.60, 3.575]
  assert pure["targets"] == [3.575, 3.40] and res["reference"] == pure["reference"]
  assert res["main"] == {"seconds": 7.0, "marks": [3.0, 7.0], "use_ema": True, "eval_batches": 2,
                         "final_draws": 5}, res["main"]


SHORT_MARK = FAKE_CLOCK + r"""
# One reading is longer than the whole curve.
res, _ = train_curve.run_curve(config, 0.0625, [0.0625], eval_batches=1)
print(json.dumps(res))
"""


@pytest.mark.ci_once  # the script's own control flow
def test_a_mark_shorter_than_a_clock_reading_still_trains_a_step():
  """A first mark passed between two readings of the clock (--seconds=1e-9) ran no step, and the
  run ended in an UnboundLocalError traceback after compiling; every mark now trains a step."""
  res = run_script(SHORT_MARK)
  assert res["steps"] == 1 and [p["step"] for p in res["points"]] == [1], res["points"]
  assert math.isfinite(res["points"][0]["test_bpd"])


@pytest.mark.ci_once  # the script's own control flow, two processes
def test_likelihood_toy_run_follows_its_flags_and_keeps_an_earlier_json(tmp_path):
  """--toy without --output writes WORKDIR/likelihood.json: the ELBO of every --timesteps and the
  importance proposal, at --num_time_samples draws on --num_images images, near the toy's entropy;
  the proposal keeps --is_uniform_mix / --is_bins as its floor; a rerun keeps the first JSON
  beside its own, whose ODE section has each --dequantization on --ode_num_images images."""
  sys.path.insert(0, ROOT)
  from vdm import toy
  args = ["--toy", f"--workdir={tmp_path}", "--batch_size=32", "--num_images=64",
          "--num_time_samples=3", "--timesteps=0,10", "--is_bins=8", "--is_fit_batches=2",
          "--is_uniform_mix=0.5", "--variance_repeats=2", "--ode_num_images=0"]
  _script("likelihood.py", *args)
  res = json.loads((tmp_path / "likelihood.json").read_text())
  entropy = toy.FactorizedDiscrete.random(0, dims=4, vocab_size=4).entropy_bits_per_dim()
  assert res["info"]["entropy_bpd"] == entropy and "ode" not in res
  assert set(res["elbo"]) == {"continuous", "T=10", "continuous_importance"}, res["elbo"].keys()
  for name, stats in res["elbo"].items():
    assert (stats["num_images"], stats["num_samples"]) == (64, 3), (name, stats)
    assert abs(stats["bpd"] - entropy) < 5 * stats["bpd_se"] + 0.05, (name, stats, entropy)
  imp = res["importance"]
  assert imp["fit_images"] == 64 and len(imp["proposal_probs"]) == 8
  assert min(imp["proposal_probs"]) >= 0.5 / 8 - 1e-6 and abs(sum(imp["proposal_probs"]) - 1) < 1e-5
  assert res["flags"]["timesteps"] == ["0", "10"] and res["flags"]["num_time_samples"] == 3
  assert {"importance_s", "elbo_s"} <= set(res["timings"])

  _script("likelihood.py", "--toy", f"--workdir={tmp_path}", "--num_images=16", "--batch_size=16",
          "--timesteps=0", "--noimportance", "--ode_num_images=4", "--ode_batch_size=4",
          "--dequantization=uniform", "--rtol=1e-3", "--atol=1e-3")
  assert len(list(tmp_path.glob("likelihood.*.json"))) == 1  # the first run's, kept
  again = json.loads((tmp_path / "likelihood.json").read_text())
  assert set(again["elbo"]) == {"continuous"} and "importance" not in again
  assert set(again["ode"]) == {"uniform"} and again["ode"]["uniform"]["num_images"] == 4
  assert math.isfinite(again["ode"]["uniform"]["bpd"])

  # A run writing the same output at the same time was not refused, and one of the two results
  # was lost; the output is locked while a run writes it.
  from vdm import logging_utils
  with logging_utils.exclusive(logging_utils.lock_path(str(tmp_path / "likelihood.json")), ""):
    r = _script("likelihood.py", "--toy", f"--workdir={tmp_path}", check=False)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert lines[0].endswith(f"likelihood.json is being written by another run (process "
                           f"{os.getpid()} on {os.uname().nodename}): wait for it to end, or "
                           "pass another --output."), lines
  assert json.loads((tmp_path / "likelihood.json").read_text()) == again
  assert not list(tmp_path.glob("*.lock"))  # nothing beside the results


CURVE_LABELS = r"""
import copy, json, sys
sys.path.insert(0, ".")
from experiments import train_curve

third = json.load(open("experiments/results/h100_2026-11-22_s5/curve_unrolled_bf16_stream_f03_a581b67.json"))
first = json.load(open("experiments/results/h100_2026-11-22/curve_bf16.json"))
nxt = copy.deepcopy(third)  # the next lease's curve, on whichever card it gets
nxt["config"]["loss"]["time_sampling"] = "importance"
nxt["config"]["model"]["norm_impl"] = "pallas"
nxt["device"] = "NVIDIA H200"
old = copy.deepcopy(first)
del old["device"]
print(json.dumps([train_curve.curve_label(r) for r in (third, first, nxt, old)]))
"""


def test_each_curve_is_labelled_with_its_settings_and_device():
  """Two curves of one dtype, unroll and remat but other time sampling or norm, or another card,
  must not share a legend entry beside the H100's reference points."""
  third, first, nxt, old = run_script(CURVE_LABELS)
  assert third == ("vdm bfloat16, residual bfloat16, unroll 0, remat none "
                   "(1580 img/s, NVIDIA H100 80GB HBM3)")
  assert first == ("vdm bfloat16, residual bfloat16, unroll 1, remat convs "  # unroll False: 1
                   "(1143 img/s, NVIDIA H100 80GB HBM3)")
  assert nxt == ("vdm bfloat16, residual bfloat16, unroll 0, remat none, norm pallas, "
                 "t importance (1580 img/s, NVIDIA H200)")
  assert old == first.replace(", NVIDIA H100 80GB HBM3", "")  # a JSON without a device
