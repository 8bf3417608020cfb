"""The paper's variance-minimising noise schedule, fitted to a trained denoiser (issue 5).

  python experiments/schedule_variance.py --config=configs/cifar10.py --workdir=WORKDIR \
      [--checkpoint=WORKDIR/checkpoints/STEP] [--noema] [--fit_steps=600 --draws=200 ...]

In continuous time the ELBO depends on γ only through γ(0) and γ(1); the shape in between sets
only the variance of the diffusion-loss estimator L = ½ γ'(t) ||ε − ε̂(z_t; γ_t)||², t ~ U(0, 1).
This script reads the trained schedule's endpoints γ(0), γ(1), builds a LearnedMonotone with
those endpoints, fits its shape (Adam on E[L²], endpoints frozen, :func:`vdm.variance.fit_shape`)
on batches of the train split, then measures L per test image over --draws independent (t, ε)
on one fixed test batch, under the linear schedule with the same endpoints and under the fitted
one (:func:`vdm.variance.compare_shapes`).

The denoiser stays frozen, so the two means agree only because ε̂ takes γ_t, not t, as input:
substituting γ = γ(t), E_t[γ'(t) f(γ(t))] = ∫_{γ(0)}^{γ(1)} f(γ) dγ, whatever the shape. (A
denoiser conditioned on t would see different inputs under another shape and its bound would
change.)

Without --checkpoint the newest restorable checkpoint under WORKDIR is used (EMA parameters
unless --noema). --toy uses the Bayes-optimal denoiser of a small factorised discrete
distribution instead (no model, no data: a quick self-check). Output: WORKDIR/schedule_variance.json
(or --output) with the variance ratio, both means ± SE, their difference ± SE, the fitted γ(t) on
101 points, the fit's objective mean_i L_i² per step, timings (the fit's includes its compilation),
the device and the JAX version.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import common  # noqa: E402
from vdm import input_pipeline, logging_utils, schedules, toy, variance  # noqa: E402
from vdm.model import traced_fns, with_dtype  # noqa: E402

FLAGS = flags.FLAGS
common.define_model_flags("schedule_variance")
flags.DEFINE_integer("fit_steps", 600, "Adam steps on the schedule's shape.")
flags.DEFINE_integer("fit_batch_size", 128, "Train images per fit step.")
flags.DEFINE_float("learning_rate", 0.3, "Adam's initial step size (cosine decay to 0).")
flags.DEFINE_integer("n_features", 1024, "Width of the LearnedMonotone network.")
flags.DEFINE_integer("test_batch_size", 128, "Test images in the fixed batch of the comparison.")
flags.DEFINE_integer("draws", 200, "Independent (t, ε) per test image for each schedule.")

START_L3 = 1e-2  # the fit's start point: the linear shape with l3's kernel at this value


def _toy_setup():
  """(eps_fn, γ(0), γ(1), batch_at, test batch, vocab_size, info) of the toy distribution."""
  data = toy.FactorizedDiscrete.random(0, dims=16, vocab_size=16)
  key_fit, key_test = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), 1))
  batches = np.asarray(data.sample(key_fit, FLAGS.fit_steps * FLAGS.fit_batch_size))
  batches = batches.reshape(FLAGS.fit_steps, FLAGS.fit_batch_size, data.dims)
  test = data.sample(key_test, FLAGS.test_batch_size)
  info = {"toy": "FactorizedDiscrete(seed 0, D=16, V=16)"}
  return (data.eps_fn(), schedules.GAMMA_MIN, schedules.GAMMA_MAX, batches.__getitem__, test,
          data.vocab_size, info)


def _trained_setup():
  """The same for the checkpoint of --config / --workdir (or --checkpoint)."""
  model, params, info = common.load_trained()
  # The network in fp32: a bf16 bound's fp32 share goes to the least noisy ranks of each batch,
  # which two shapes map to other examples, so the two means would differ by bf16's error.
  fp32 = with_dtype(model, "float32")
  eps_fn, gamma_fn = traced_fns(fp32, params)
  info["eps_dtype"] = str(jnp.dtype(fp32.net.dtype))
  config = FLAGS.config
  gamma_0, gamma_1 = (float(g) for g in gamma_fn(jnp.array([0.0, 1.0])))
  train_split = input_pipeline.load_split(config.data, config.data.train_split, config.seed)
  train = input_pipeline.TrainData(train_split, FLAGS.fit_batch_size, FLAGS.seed,
                                   setting="--fit_batch_size", sharded=False)  # used on the host
  test = common.load_images(config, config.data.eval_split, FLAGS.test_batch_size)
  info["schedule"] = config.model.schedule
  info["trained_gamma"] = np.asarray(gamma_fn(jnp.linspace(0.0, 1.0, 101)))
  return eps_fn, gamma_0, gamma_1, train.batch, test, config.data.vocab_size, info


def run(save) -> dict:
  """Fit and compare as the flags say; returns the results, handed to ``save`` after the fit and
  again at the end (a run stopped in the comparison keeps its fit)."""
  for name in ("fit_steps", "fit_batch_size", "test_batch_size"):  # by the flags' names
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1.")
  variance.check_settings(learning_rate=FLAGS.learning_rate, draws=FLAGS.draws,
                          n_features=FLAGS.n_features)
  if not FLAGS.toy and FLAGS.config is not None and FLAGS.config.model.num_timesteps:
    raise ValueError(f"model.num_timesteps={FLAGS.config.model.num_timesteps}: the variance-"
                     "minimising shape is for a continuous-time model, whose bound depends on γ's "
                     "endpoints alone; with T steps a new shape changes the bound itself.")
  eps_fn, gamma_0, gamma_1, batch_at, test, vocab_size, info = (
      _toy_setup() if FLAGS.toy else _trained_setup())
  rng = jax.random.PRNGKey(FLAGS.seed)
  rng_start, rng_fit, rng_measure = jax.random.split(rng, 3)
  module, start = variance.linear_monotone(rng_start, gamma_0, gamma_1, n_features=FLAGS.n_features,
                                           l3=START_L3)
  _, linear = variance.linear_monotone(rng_start, gamma_0, gamma_1, n_features=FLAGS.n_features)

  t0 = time.time()
  fitted, second_moments = variance.fit_shape(eps_fn, module, start, batch_at, rng_fit,
                                              steps=FLAGS.fit_steps, learning_rate=FLAGS.learning_rate,
                                              vocab_size=vocab_size)
  fit_s = time.time() - t0
  t_grid = jnp.linspace(0.0, 1.0, 101)
  fitted_gamma = np.asarray(jax.jit(module.apply)(fitted, t_grid))
  results = {
      "info": info,
      "flags": {k: FLAGS[k].value for k in ("seed", "fit_steps", "fit_batch_size", "learning_rate",
                                            "n_features", "test_batch_size", "draws")},
      "endpoints": {"gamma_0": gamma_0, "gamma_1": gamma_1,
                    "fitted_gamma_0": fitted_gamma[0], "fitted_gamma_1": fitted_gamma[-1]},
      "fit_second_moment": second_moments,
      "gamma_grid": {"t": np.asarray(t_grid), "fitted": fitted_gamma},
      "timings": {"fit_s": fit_s},
      **logging_utils.provenance(),
  }
  save(results)
  t0 = time.time()
  comparison = variance.compare_shapes(eps_fn, module, linear, fitted, test, rng_measure,
                                       draws=FLAGS.draws, vocab_size=vocab_size)
  results["timings"]["measure_s"] = time.time() - t0
  results.update(variance_ratio=comparison["variance_ratio"], comparison=comparison)
  save(results)
  return results


@logging_utils.one_line_errors
def main(argv):
  del argv
  common.prepare_output("schedule_variance")
  results = run(lambda r: common.write_results(r, "schedule_variance"))
  c = results["comparison"]
  logging.info("variance ratio fitted/linear %.3f; diffusion loss %.4f ± %.4f (fitted) vs "
               "%.4f ± %.4f (linear) bits/dim, difference %.4f ± %.4f; fit %d steps in %.1f s",
               c["variance_ratio"], c["fitted"]["mean"], c["fitted"]["mean_se"], c["linear"]["mean"],
               c["linear"]["mean_se"], c["mean_difference"], c["mean_difference_se"], FLAGS.fit_steps,
               results["timings"]["fit_s"])
  logging.info("wrote %s", common.output_path("schedule_variance"))


if __name__ == "__main__":
  app.run(main, flags_parser=logging_utils.parse_flags)
