"""Likelihood evaluation of a trained VDM: ELBO (continuous and discrete time), importance-sampled
time, and the probability-flow ODE bound; one JSON with every number and its standard error.

  python experiments/likelihood.py --config=configs/cifar10.py --workdir=WORKDIR \
      [--checkpoint=WORKDIR/checkpoints/STEP] [--num_images=1000 --timesteps=0,100,1000 ...]

Without --checkpoint the newest restorable checkpoint under WORKDIR is used (EMA parameters
unless --noema). --toy evaluates the Bayes-optimal denoiser of a small factorised discrete
distribution instead (no model, no data: a self-check whose true entropy is known).
--compare_dtype=bfloat16 also evaluates the same parameters at that compute precision on the same
images and draws, and reports the paired difference of the bounds with its standard error.
Output: WORKDIR/likelihood.json (or --output).
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
from vdm import importance, likelihood, logging_utils, ode_likelihood, schedules, toy  # noqa: E402
from vdm.model import forward_differentiable, traced_fns  # noqa: E402

FLAGS = flags.FLAGS
common.define_model_flags("likelihood")
flags.DEFINE_integer("batch_size", 128, "Images per denoiser call for the ELBO.")
# (1) ELBO
flags.DEFINE_integer("num_images", 1024, "Test images for the ELBO (0 = the whole split).")
flags.DEFINE_integer("num_time_samples", 4, "K: Monte-Carlo draws of (t, ε, z_0) per image.")
flags.DEFINE_list("timesteps", ["0", "100", "1000"], "T values: 0 = continuous time; the "
                  "model's own model.num_timesteps is always added. Empty with --noimportance: no "
                  "ELBO section (e.g. for --compare_dtype alone).")
flags.DEFINE_enum("compare_dtype", None, ["float32", "bfloat16"],
                  "Also evaluate the same parameters with this compute dtype (model.dtype) on the "
                  "same images and draws (K = --num_time_samples), and report the paired difference.")
# (2) importance-sampled time
flags.DEFINE_bool("importance", True, "Fit a time proposal and compare estimator variances.")
flags.DEFINE_integer("is_bins", 64, "Bins of the piecewise-constant proposal.")
flags.DEFINE_integer("is_fit_batches", 2,
                     "Batches (of batch_size, from the start of the train split) to fit it.")
flags.DEFINE_float("is_uniform_mix", 0.1, "Uniform fraction mixed into the proposal (its floor).")
flags.DEFINE_integer("is_spread", 1, "Widen the proposal by taking the max over ±spread bins.")
flags.DEFINE_integer("variance_repeats", 100, "Draws of the batch-mean estimate for the variance comparison.")
# (3) ODE
flags.DEFINE_integer("ode_num_images", 64, "Test images for the ODE bound (0 = skip).")
flags.DEFINE_integer("ode_batch_size", 32, "Images per ODE solve.")
flags.DEFINE_integer("ode_num_draws", 1, "Dequantisation (and probe) draws per image.")
flags.DEFINE_list("dequantization", ["uniform", "vdm"], "ODE bounds: 'uniform' and/or 'vdm'.")
flags.DEFINE_enum("divergence", "hutchinson", ode_likelihood.DIVERGENCES, "Divergence estimator.")
flags.DEFINE_integer("num_probes", 1, "Rademacher probes per solve (Hutchinson).")
flags.DEFINE_enum("solver", "tsit5", list(ode_likelihood.SOLVERS), "Adaptive ODE solver.")
flags.DEFINE_float("rtol", 1e-6, "ODE relative tolerance (1e-5 biased the bound low: see "
                   "vdm.ode_likelihood.ode_log_density).")
flags.DEFINE_float("atol", 1e-6, "ODE absolute tolerance.")
flags.DEFINE_integer("max_steps", 4096, "ODE step limit per solve.")


@logging_utils.one_line_errors
def main(argv):
  del argv
  if FLAGS.toy and FLAGS.compare_dtype:
    raise app.UsageError("--compare_dtype needs a trained model: drop --toy.")
  if FLAGS.toy and FLAGS.num_images < 1:
    raise app.UsageError(f"--num_images={FLAGS.num_images}: --toy draws that many images; 0 (the "
                         "whole split) needs a trained model's data.")
  for name in ("batch_size", "ode_batch_size", "num_time_samples"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value} must be >= 1.")
  if FLAGS.importance and FLAGS.is_fit_batches < 1:
    raise app.UsageError(f"--is_fit_batches={FLAGS.is_fit_batches} must be >= 1 (or "
                         "--noimportance).")
  try:
    timesteps = [int(t) for t in FLAGS.timesteps]
  except ValueError:
    timesteps = [-1]
  if min(timesteps, default=0) < 0:
    raise ValueError(f"--timesteps={','.join(FLAGS.timesteps)} must be integers >= 0 "
                     "(0 = continuous time), e.g. --timesteps=0,100,1000.")
  unknown = [d for d in FLAGS.dequantization if d not in ode_likelihood.DEQUANTIZATIONS]
  if unknown:
    raise ValueError(f"--dequantization={','.join(FLAGS.dequantization)}: use some of "
                     f"{', '.join(ode_likelihood.DEQUANTIZATIONS)}.")
  common.prepare_output("likelihood")
  rng = jax.random.PRNGKey(FLAGS.seed)
  timings = {}
  if FLAGS.toy:
    data = toy.FactorizedDiscrete.random(0, dims=4, vocab_size=4)
    eps_fn, gamma_fn, vocab_size = data.eps_fn(), schedules.fixed_linear(), data.vocab_size
    test = np.asarray(data.sample(jax.random.PRNGKey(1), FLAGS.num_images))
    fit = np.asarray(data.sample(jax.random.PRNGKey(2), FLAGS.is_fit_batches * FLAGS.batch_size))
    info = {"toy": "FactorizedDiscrete(seed 0, D=4, V=4)", "entropy_bpd": data.entropy_bits_per_dim()}
    decoder, num_timesteps = "vdm", 0
  else:
    config = FLAGS.config
    model, params, info = common.load_trained()
    eps_fn, gamma_fn = traced_fns(model, params)
    vocab_size, decoder = config.data.vocab_size, config.model.decoder
    num_timesteps = config.model.num_timesteps
    info.update(num_timesteps=num_timesteps, decoder=decoder, schedule=config.model.schedule)
    if num_timesteps:
      logging.warning("model.num_timesteps=%d: the ELBO adds T=%d, the model's own bound, and "
                      "--compare_dtype uses it; the importance and ODE sections treat the network "
                      "as a continuous-time model.", num_timesteps, num_timesteps)
    test = common.load_images(config, config.data.eval_split, FLAGS.num_images)
    fit = common.load_images(config, config.data.train_split, FLAGS.is_fit_batches * FLAGS.batch_size)
  results = {"info": info, "flags": {k: FLAGS[k].value for k in (
      "seed", "batch_size", "num_images", "num_time_samples", "timesteps", "compare_dtype",
      "is_bins", "is_fit_batches", "is_uniform_mix", "is_spread", "variance_repeats",
      "ode_num_images", "ode_batch_size", "ode_num_draws", "dequantization", "divergence",
      "num_probes", "solver", "rtol", "atol", "max_steps")},
             **logging_utils.provenance(), "timings": timings}
  # Written after every section: a run stopped part-way keeps what it finished.
  save = lambda: common.write_results(results, "likelihood")

  proposals = {}
  if FLAGS.importance:
    t0 = time.time()
    moments = importance.loss_moments(eps_fn, gamma_fn, common.image_batches(fit, FLAGS.batch_size),
                                      jax.random.fold_in(rng, 1), vocab_size=vocab_size,
                                      num_bins=FLAGS.is_bins)
    proposal_params = importance.proposal_from_second_moment(
        moments["second_moment"], FLAGS.is_uniform_mix, FLAGS.is_spread)
    proposals["importance"] = importance.time_proposal(proposal_params)
    variance = importance.estimator_variance(eps_fn, gamma_fn, jnp.asarray(test[:FLAGS.batch_size]),
                                             jax.random.fold_in(rng, 2), proposals["importance"],
                                             vocab_size=vocab_size, repeats=FLAGS.variance_repeats)
    results["importance"] = {"proposal_probs": np.asarray(proposal_params["probs"]).tolist(),
                             "loss_mean_per_bin": moments["mean"].tolist(),
                             "loss_second_moment_per_bin": moments["second_moment"].tolist(),
                             "fit_images": moments["num_images"], "variance": variance}
    timings["importance_s"] = time.time() - t0
    save()
    logging.info("variance ratios: %s", variance["ratios"])

  if FLAGS.timesteps or proposals:  # --timesteps= --noimportance: no ELBO section
    if num_timesteps not in timesteps:
      timesteps.append(num_timesteps)
    t0 = time.time()
    results["elbo"] = likelihood.evaluate_elbo(
        eps_fn, gamma_fn, common.image_batches(test, FLAGS.batch_size), jax.random.fold_in(rng, 3),
        vocab_size=vocab_size, timesteps=timesteps,
        num_samples=FLAGS.num_time_samples, decoder=decoder, time_proposals=proposals)
    timings["elbo_s"] = time.time() - t0
    save()
    for name, stats in results["elbo"].items():
      logging.info("ELBO %-22s %.4f ± %.4f bits/dim", name, stats["bpd"], stats["bpd_se"])

  if FLAGS.compare_dtype:
    t0 = time.time()
    keep = lambda res: (results.update(dtype_comparison=res), save())  # noqa: E731
    res = common.compare_dtype(
        model, params, FLAGS.compare_dtype, test, jax.random.fold_in(rng, 5),
        batch_size=FLAGS.batch_size, num_samples=FLAGS.num_time_samples, vocab_size=vocab_size,
        decoder=decoder, num_timesteps=num_timesteps, save=keep)
    timings["dtype_comparison_s"] = time.time() - t0
    keep(res)
    logging.info("model.dtype %s − %s: %+.5f ± %.5f bits/dim (max |difference| per image %.5f)",
                 FLAGS.compare_dtype, config.model.dtype, res["difference_bpd"],
                 res["difference_se"], res["max_abs_difference_bpd"])

  if FLAGS.ode_num_images > 0:
    results["ode"] = {}
    ode_images = test[:FLAGS.ode_num_images]
    # The ODE's jax.linearize needs forward-mode derivatives (Pallas norms have none).
    ode_eps_fn = eps_fn if FLAGS.toy else traced_fns(forward_differentiable(model), params)[0]
    for deq in FLAGS.dequantization:
      t0 = time.time()
      results["ode"][deq] = ode_likelihood.evaluate_ode_likelihood(
          ode_eps_fn, gamma_fn, common.image_batches(ode_images, FLAGS.ode_batch_size),
          jax.random.fold_in(rng, 4),
          vocab_size=vocab_size, num_draws=FLAGS.ode_num_draws, dequantization=deq, decoder=decoder,
          divergence=FLAGS.divergence, num_probes=FLAGS.num_probes, solver=FLAGS.solver,
          rtol=FLAGS.rtol, atol=FLAGS.atol, max_steps=FLAGS.max_steps)
      timings[f"ode_{deq}_s"] = time.time() - t0
      save()
      r = results["ode"][deq]
      logging.info("ODE (%s) %.4f ± %.4f bits/dim, NFE %.0f, converged %s", deq, r["bpd"], r["bpd_se"],
                   r["nfe_mean"], r["all_converged"])
      if not r["all_converged"]:
        logging.warning("ODE (%s): %d of %d solves ran out of --max_steps=%d before t=1, so the "
                        "bound is nan; raise --max_steps or loosen --rtol/--atol.", deq,
                        r["num_unconverged"], r["num_solves"], FLAGS.max_steps)
  logging.info("wrote %s", save())

if __name__ == "__main__":
  app.run(main, flags_parser=logging_utils.parse_flags)
