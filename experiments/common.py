"""What the experiment scripts share: the flags that choose a trained checkpoint (or the toy
distribution), loading it, and writing the results as JSON. Import after the repository root is
on sys.path."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags

from vdm import checkpoint, logging_utils
from vdm.model import Model

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
  return checkpoint.load_params(FLAGS.config, FLAGS.checkpoint or FLAGS.workdir, FLAGS.ema)


def write_results(results: dict, name: str) -> str:
  """Write ``results`` (NaN → null) to --output or WORKDIR/<name>.json; returns the path."""
  out = FLAGS.output or os.path.join(FLAGS.workdir or ".", f"{name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  logging_utils.write_json(out, logging_utils.json_safe(results))
  return out


def one_line_errors(main: Callable[[list], None]) -> Callable[[list], None]:
  """``main`` with a ValueError (bad flags, config, data or checkpoint: the library's errors name
  the fix) ending the script as one line ``vdm: error: ...`` on stderr and exit status 2."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except ValueError as e:
      print(f"vdm: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
            file=sys.stderr, flush=True)
      sys.exit(2)
  return wrapped
