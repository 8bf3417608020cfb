"""Test bits/dim against seconds of training: the end-to-end speed figure of issue 4.

  python experiments/train_curve.py --config=configs/cifar10.py \
      --config.data.source=npz --config.data.path=.data/cifar10_subset.npz \
      [--config.model.dtype=bfloat16 --compare_dtype=float32] --seconds=330 --output=curve.json \
      [--workdir=RUN]
  python experiments/train_curve.py --plot=curve.png curve.json [other.json ...]

Trains from scratch with the config's model, optimiser and batch size (``vdm.train``'s step,
compiled ahead of time, outside the clock). The clock runs only while training steps execute:
at each mark of --marks it stops with the device synchronised, the test split's bound is
evaluated with the raw parameters (--params=ema for the EMA) by the estimator of
``python -m vdm.main --mode=eval`` (one (t, ε) draw per image, the config's eval seed: every
mark sees the same noise), and the clock restarts. One draw's noise on the whole bound is about
0.03 bits/dim for the CIFAR-10 net (less than its per-image standard error, which counts the
spread of the images too), so the last mark, where the 330 s target is judged, averages
--final_draws draws (eval seeds seed, seed + 1, ...) and reports their standard error as well.
The step loop keeps one step in flight: it waits for step k − 1 after dispatching step k, so
the clock is at most one step ahead of the device when it is read.

The JSON holds the points (mark, training seconds, step, test bpd ± SE and its terms, the last
training bpd), the compile time, the training images/s, the first mark whose test bpd reaches
each target, and the machine; it is rewritten after every mark. With --workdir the final state
is saved as a checkpoint there (for experiments/likelihood.py). --compare_dtype=float32 then
evaluates the final parameters at that precision and at model.dtype on the whole test split with
shared draws, and adds the paired difference (issue 4's bf16-vs-fp32 figure). --plot draws test bpd against training seconds for one or
more such JSON files beside the reference points of the published VDM code.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402
from vdm import checkpoint, config_checks, elbo, input_pipeline, logging_utils, nets, train  # noqa: E402
from vdm.model import make_model  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=False)
flags.DEFINE_float("seconds", 330.0, "Training seconds (compile and evaluation excluded).")
flags.DEFINE_list("marks", ["30", "60", "90", "110", "120", "180", "240", "300"],
                  "Training seconds at which to evaluate (--seconds is always the last).")
flags.DEFINE_enum("params", "raw", ["raw", "ema"], "Evaluate the raw or the EMA parameters.")
flags.DEFINE_integer("eval_batches", 0, "Test batches (of eval.batch_size) per evaluation; 0 = all.")
flags.DEFINE_integer("final_draws", 16, "Draws of (t, ε) per image averaged at the last mark.")
flags.DEFINE_string("output", None, "Output JSON (required unless --plot).")
flags.DEFINE_string("workdir", None, "Save the final train state as a checkpoint here.")
flags.DEFINE_enum("compare_dtype", None, ["float32", "bfloat16"],
                  "After training, the bound of the final parameters at this compute dtype and at "
                  "model.dtype on the whole test split, with shared draws (a paired difference).")
flags.DEFINE_integer("compare_samples", 4, "Draws of (t, ε, z_0) per image for --compare_dtype.")
flags.DEFINE_integer("compare_batch_size", 128, "Images per call for --compare_dtype (a divisor "
                     "of the split avoids compiling a ragged last batch: 113 for 1,017).")
flags.DEFINE_string("plot", None, "Plot the JSON files given as arguments to this PNG instead.")

# The published VDM code on one H100 (jax 0.11.2, CIFAR-10 config, batch 128, fp32), trained from
# scratch on the subset's train images, raw parameters: the figures quoted in issue 4.
REFERENCE = {"label": "published VDM code, fp32 (H100)",
             "seconds": [60.0, 120.0, 180.0, 300.0, 330.0],
             "bpd": [4.37, 3.90, 3.74, 3.60, 3.575]}
TARGETS_BPD = (3.575, 3.40)


def parse_marks(marks, seconds: float) -> list[float]:
  """Sorted distinct marks in (0, seconds], with ``seconds`` itself last."""
  if seconds <= 0:
    raise ValueError(f"--seconds={seconds} must be > 0.")
  try:
    values = sorted({float(m) for m in marks if float(m) < seconds} | {float(seconds)})
  except ValueError:
    raise ValueError(f"--marks={','.join(marks)} must be numbers of seconds, e.g. 60,120.") from None
  if values[0] <= 0:
    raise ValueError(f"--marks={','.join(marks)} must be > 0 seconds.")
  return values


def first_mark_reaching(points: list[dict], bpd: float) -> float | None:
  """The training seconds of the first point whose test bpd is ≤ ``bpd`` (None if none is)."""
  return next((p["train_seconds"] for p in points if p["test_bpd"] <= bpd), None)


def evaluate_draws(eval_step, params, split, config, mesh, draws: int, eval_batches: int = 0,
                   desc: str = "eval",
                   on_draw: Callable[[dict], None] = lambda summary: None) -> dict:
  """:func:`vdm.train.evaluate`'s summary averaged over ``draws`` draws of (t, ε) per image (eval
  seeds config.eval.seed + d), with "draws" and "draws_stderr", the standard error of the mean
  over draws (None for one): the noise of the estimate on these images. "bpd_stderr" is the first
  draw's per-image standard error. ``on_draw`` gets the summary of the draws so far after each."""
  summaries = []
  for d in range(draws):
    seeded = config.copy_and_resolve_references()
    seeded.eval.seed = config.eval.seed + d
    summaries.append(train.evaluate(eval_step, params, split, seeded, mesh, eval_batches,
                                    desc=f"{desc}, draw {d + 1}/{draws}" if draws > 1 else desc))
    bpd = np.array([s["bpd"] for s in summaries])
    means = {k: float(np.mean([s[k] for s in summaries])) for k in ("bpd",) + elbo.TERMS}
    summary = {**summaries[0], **means, "draws": d + 1,
               "draws_stderr": float(bpd.std(ddof=1) / np.sqrt(d + 1)) if d else None}
    on_draw(summary)
  return summary


def run_curve(config, seconds: float, marks: list[float], use_ema: bool = False,
              eval_batches: int = 0, save: Callable[[dict], None] = lambda results: None,
              final_draws: int = 1) -> tuple[dict, train.TrainState]:
  """Train for ``seconds`` of step time, evaluating at ``marks`` (the last with ``final_draws``
  draws per image: :func:`evaluate_draws`); returns (results, final state). ``save(results)``
  runs after every evaluation, so a run stopped part-way keeps its points."""
  mesh = train.make_mesh()
  model = make_model(config)
  batch_size = config.training.batch_size
  data = input_pipeline.TrainData(
      input_pipeline.load_split(config.data, config.data.train_split, config.seed), batch_size,
      config.seed, config.data.random_flip)
  test_split = input_pipeline.load_split(config.data, config.data.eval_split, config.seed)
  state = train.create_train_state(config, model, mesh)
  batches = input_pipeline.train_iterator(data, 0, train.batch_sharding(mesh), config.data.prefetch)

  batch_shape = jax.ShapeDtypeStruct((batch_size,) + model.image_shape, jnp.uint8,
                                     sharding=train.batch_sharding(mesh))
  t0 = time.perf_counter()
  step_fn = train.make_train_step(config, model, mesh).lower(state, batch_shape).compile()
  compile_s = time.perf_counter() - t0
  eval_step = train.make_eval_step(config, model, mesh)
  logging.info("train step compiled in %.1f s; %d parameters, batch %d, dtype %s", compile_s,
               nets.num_params(state.params), batch_size, config.model.dtype)

  points, train_s, step, previous = [], 0.0, 0, None
  results = {
      **logging_utils.provenance(),
      "config": json.loads(config.to_json_best_effort()),
      "params": "ema" if use_ema else "raw", "compile_seconds": compile_s,
      # The runbook sets a compilation cache, which makes compile_seconds a cache load.
      **logging_utils.compile_settings(),
      "points": points, "reference": REFERENCE,
  }
  for mark in marks:
    if train_s >= mark:  # passed already by the step that ended the previous mark
      continue
    start = time.perf_counter()
    while True:  # at least one step: a mark can pass between two readings of the clock
      state, metrics = step_fn(state, next(batches))
      if previous is not None:
        jax.block_until_ready(previous)  # step k − 1, while step k runs
      previous = metrics["bpd"]
      step += 1
      if train_s + time.perf_counter() - start >= mark:
        break
    jax.block_until_ready(state)
    train_s += time.perf_counter() - start
    last = jax.device_get(metrics)
    num_points = len(points)

    def record(summary):  # after each draw: a stop during the last mark's draws keeps the point
      points[num_points:] = [{
          "mark_seconds": mark, "train_seconds": train_s, "step": step,
          "test_bpd": summary["bpd"], "test_bpd_se": summary["bpd_stderr"],
          "test_draws": summary["draws"], "test_bpd_draws_se": summary["draws_stderr"],
          **{f"test_{k}_bpd": summary[k] for k in elbo.TERMS},
          "num_test_images": summary["num_examples"],
          "train_bpd": float(last["bpd"]), "nonfinite": int(last["nonfinite"])}]
      results.update(
          train_seconds=train_s, steps=step, images_per_second=step * batch_size / train_s,
          first_seconds_reaching={str(b): first_mark_reaching(points, b) for b in TARGETS_BPD})
      save(results)

    summary = evaluate_draws(eval_step, state.ema_params if use_ema else state.params, test_split,
                             config, mesh, final_draws if mark == marks[-1] else 1, eval_batches,
                             desc=f"eval @ {train_s:.0f} s", on_draw=record)
    draws = (f"; ± {summary['draws_stderr']:.4f} over {summary['draws']} draws"
             if summary["draws"] > 1 else "")
    logging.info("%.1f s, step %d: test %.4f ± %.4f bits/dim (per image%s; train %.4f)", train_s,
                 step, summary["bpd"], summary["bpd_stderr"], draws, float(last["bpd"]))
  batches.close()  # stop and join the prefetch thread
  return results, state


def curve_label(res: dict) -> str:
  """A curve's legend entry: what tells its run apart (dtypes, unroll, remat, a norm other than
  autodiff's, importance-sampled t), its images/s and the device it ran on, since the reference
  points are an H100's."""
  model = res["config"]["model"]  # runs from before residual_dtype had their stream in dtype
  unroll = model.get("unroll", 1)
  if isinstance(unroll, bool):  # the first lease's unroll: True for all blocks, False for one
    unroll = 0 if unroll else 1
  parts = [f"vdm {model['dtype']}", f"residual {model.get('residual_dtype', model['dtype'])}",
           f"unroll {unroll}", f"remat {model.get('remat', 'none')}"]
  if model.get("norm_impl", "autodiff") != "autodiff":
    parts.append(f"norm {model['norm_impl']}")
  if res["config"]["loss"].get("time_sampling", "uniform") != "uniform":
    parts.append(f"t {res['config']['loss']['time_sampling']}")
  device = f", {res['device']}" if res.get("device") else ""
  return f"{', '.join(parts)} ({res['images_per_second']:.0f} img/s{device})"


def plot(paths: list[str], out: str) -> None:
  """Test bpd ± 2 SE against training seconds for each JSON, beside the reference points."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (a test extra: not on the GPU image)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fix = ": pass the JSON files that train_curve.py --output wrote."
  curves = []  # (seconds, bpd, 2 SE, label) of each JSON, all read before anything is drawn
  for path in paths:
    res = logging_utils.read_json(path, fix)
    try:
      pts = res["points"]
      curves.append(([p["train_seconds"] for p in pts], [p["test_bpd"] for p in pts],
                     # an SE written as null: one test image, whose spread is unknown
                     [math.nan if p["test_bpd_se"] is None else 2 * p["test_bpd_se"] for p in pts],
                     curve_label(res)))
    except KeyError as e:
      raise ValueError(f"{path} is not a training curve (it lacks {e}){fix}") from None
    except (TypeError, AttributeError) as e:
      raise ValueError(f"{path} is not a training curve (a malformed part: {e}){fix}") from None
  fig, ax = plt.subplots(figsize=(6, 4))
  for seconds, bpd, two_se, label in curves:
    ax.errorbar(seconds, bpd, yerr=two_se, marker="o", ms=3, capsize=2, label=label)
  ax.plot(REFERENCE["seconds"], REFERENCE["bpd"], "ks--", label=REFERENCE["label"])
  ax.axhline(TARGETS_BPD[1], color="tab:red", lw=0.8, ls=":", label=f"target {TARGETS_BPD[1]} at 330 s")
  ax.plot([110.0], [TARGETS_BPD[0]], "r*", ms=10, label=f"target {TARGETS_BPD[0]} within 110 s")
  ax.set(xlabel="training seconds (compile and evaluation excluded)", ylabel="test bits/dim",
         title="CIFAR-10 subset: test bound against training time")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: long labels
  fig.savefig(out, dpi=120, bbox_inches="tight")
  plt.close(fig)


@logging_utils.one_line_errors
def main(argv):
  if FLAGS.plot:
    if len(argv) < 2:
      raise app.UsageError("--plot needs the JSON files of runs as arguments.")
    plot(argv[1:], FLAGS.plot)
    logging.info("wrote %s", FLAGS.plot)
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}.")
  if FLAGS.config is None or FLAGS.output is None:
    raise app.UsageError("--config and --output are required (or --plot=PNG with JSON files).")
  config = FLAGS.config
  config_checks.validate(config)
  marks = parse_marks(FLAGS.marks, FLAGS.seconds)
  if FLAGS.final_draws < 1:
    raise ValueError(f"--final_draws={FLAGS.final_draws} must be >= 1.")
  if FLAGS.eval_batches < 0:
    raise ValueError(f"--eval_batches={FLAGS.eval_batches} must be >= 0 (0 = the whole test "
                     "split).")
  if FLAGS.workdir and checkpoint.has_checkpoints(FLAGS.workdir):
    raise ValueError(f"--workdir={FLAGS.workdir} already holds checkpoints, which the likelihood "
                     "scripts would take for this run's: use a fresh --workdir.")
  if FLAGS.workdir:  # checked now: the trained state is saved there after the whole budget
    logging_utils.writable_dir(FLAGS.workdir, "--workdir")
  common.prepare_output("train_curve")  # --output, which is required here
  save = lambda results: logging_utils.write_json(FLAGS.output, results)
  results, state = run_curve(config, FLAGS.seconds, marks, FLAGS.params == "ema",
                             FLAGS.eval_batches, save, FLAGS.final_draws)
  logging.info("wrote %s: %.0f images/s; reached %s", FLAGS.output, results["images_per_second"],
               results["first_seconds_reaching"])
  if FLAGS.workdir:
    saver = checkpoint.Checkpointer(FLAGS.workdir)
    saver.save(state, force=True)
    saver.close()
    checkpoint.record_run_config(FLAGS.config, FLAGS.workdir)

  if FLAGS.compare_dtype:
    keep = lambda res: (results.update(dtype_comparison=res), save(results))  # noqa: E731
    res = common.compare_dtype(
        make_model(config), state.ema_params if FLAGS.params == "ema" else state.params,
        FLAGS.compare_dtype, common.load_images(config, config.data.eval_split, 0),
        jax.random.PRNGKey(config.eval.seed),
        batch_size=FLAGS.compare_batch_size, num_samples=FLAGS.compare_samples,
        vocab_size=config.data.vocab_size, decoder=config.model.decoder,
        num_timesteps=config.model.num_timesteps, save=keep)
    keep(res)
    logging.info("model.dtype %s − %s: %+.5f ± %.5f bits/dim on %d images", res["b"], res["a"],
                 res["difference_bpd"], res["difference_se"], res["num_images"])

if __name__ == "__main__":
  app.run(main, flags_parser=logging_utils.parse_flags)
