"""What the experiment scripts share: the flags that choose a trained checkpoint (or the toy
distribution), loading it, and writing the results as JSON. Import after the repository root is
on sys.path."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional

from absl import flags
from ml_collections import config_flags

import jax
import numpy as np

from vdm import checkpoint, config_checks, input_pipeline, likelihood, logging_utils
from vdm.model import Model, eval_fp32_share, traced_fns, with_dtype

FLAGS = flags.FLAGS


def define_model_flags(name: str) -> None:
  """--config, --workdir, --checkpoint, --ema, --toy, --seed and --output (default
  WORKDIR/<name>.json)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Training workdir; the JSON is written here.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint step directory or workdir (default: --workdir).")
  flags.DEFINE_bool("ema", True, "Use the EMA parameters (else the raw parameters).")
  flags.DEFINE_bool("toy", False, "Use a toy FactorizedDiscrete with its Bayes-optimal denoiser.")
  flags.DEFINE_integer("seed", 0, "Seed of every random draw.")
  flags.DEFINE_string("output", None, f"Output JSON path (default WORKDIR/{name}.json).")


def load_trained() -> tuple[Model, dict, dict]:
  """(model, params, info) of the checkpoint that --config, --workdir / --checkpoint and --ema
  name (:func:`vdm.checkpoint.load_params`); :func:`vdm.model.traced_fns` gives its ε̂ and γ."""
  if FLAGS.config is None or FLAGS.workdir is None:
    raise ValueError("--config and --workdir are required: pass them, or use --toy.")
  config_checks.validate(FLAGS.config)
  return checkpoint.load_params(FLAGS.config, FLAGS.checkpoint or FLAGS.workdir, FLAGS.ema)


def load_images(config, split: str, num: int) -> np.ndarray:
  """The first ``num`` images of ``split`` of the config's data (all of them for num <= 0)."""
  data = input_pipeline.load_split(config.data, split, seed=config.seed)
  return data.get(np.arange(len(data) if num <= 0 else min(num, len(data))))


def image_batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """``images`` in consecutive batches of ``batch_size`` (the last one may be shorter): views,
  so the list can be read more than once at no cost."""
  return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def compare_dtype(model: Model, params: dict, dtype: str, images: np.ndarray, rng: jax.Array, *,
                  batch_size: int, num_samples: int, vocab_size: int, decoder: str,
                  num_timesteps: int, save: Optional[Callable[[dict], Any]] = None) -> dict:
  """The bound (continuous time, or ``num_timesteps`` steps: pass the model's own) of ``params``
  on ``images`` at the model's compute dtype (a) and at ``dtype`` (b; 'float32' is the network
  entirely in fp32), a bf16 side with the model's ``eval_fp32_fraction``, with shared draws:
  :func:`vdm.likelihood.paired_difference`, the two dtypes, T, its draws per image and batch size,
  and under "by_time" where in t their continuous-time losses differ
  (:func:`vdm.likelihood.difference_by_time`; its batches hold one bin of t each, so with an
  ``eval_fp32_fraction`` a bf16 side's fp32 share is the least noisy share of every bin, not the
  low-t bins). ``save`` receives the result without "by_time" first, so a run stopped during that
  diagnostic keeps the difference."""
  model_b = with_dtype(model, dtype)
  eps_a, gamma_fn = traced_fns(model, params)
  eps_b, _ = traced_fns(model_b, params)
  batches = image_batches(images, batch_size)
  res = likelihood.paired_difference(eps_a, eps_b, gamma_fn, batches, rng, vocab_size=vocab_size,
                                     num_timesteps=num_timesteps, num_samples=num_samples,
                                     decoder=decoder)
  res = {"a": model.net.dtype, "a_eval_fp32_fraction": eval_fp32_share(model), "b": dtype,
         "b_eval_fp32_fraction": eval_fp32_share(model_b), "num_timesteps": num_timesteps,
         "num_samples": num_samples, "batch_size": batch_size, **res}
  if save is not None:
    save(res)
  res["by_time"] = likelihood.difference_by_time(eps_a, eps_b, gamma_fn, batches,
                                                 jax.random.fold_in(rng, 1), vocab_size=vocab_size)
  return res


def output_path(name: str) -> str:
  """--output, or WORKDIR/<name>.json."""
  return FLAGS.output or os.path.join(FLAGS.workdir or ".", f"{name}.json")


_WRITING = contextlib.ExitStack()  # the locks of the outputs this process writes, until it exits


def prepare_output(name: str) -> str:
  """:func:`output_path`, its directory checked writable before any work (a late failure would
  lose it), an earlier file there kept (:func:`vdm.logging_utils.keep_previous`), and the
  output locked (:func:`vdm.logging_utils.lock_path`) against a second run writing it at the same
  time, which overwrote the first one's results silently."""
  out = output_path(name)
  logging_utils.writable_dir(os.path.dirname(os.path.abspath(out)), "--output's directory")
  _WRITING.enter_context(logging_utils.exclusive(
      logging_utils.lock_path(out), f"{out} is being written by another run (process {{holder}}): wait for it "
      "to end, or pass another --output."))
  logging_utils.keep_previous(out)
  return out


def write_results(results: dict, name: str) -> str:
  """Write ``results`` (NaN → null) to :func:`output_path`; returns the path."""
  out = output_path(name)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  logging_utils.write_json(out, results)
  return out
