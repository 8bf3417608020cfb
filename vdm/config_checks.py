"""A config's settings checked before any heavy work: every entry point (``vdm.main``, the
benchmark and the experiment scripts) calls :func:`validate`, so a typo or an out-of-range value
ends in one line that names the key and the fix, not in a traceback after compiling, or in a run
that quietly trains something else."""
from __future__ import annotations

import ml_collections
from absl import logging

from vdm import checkpoint, elbo, input_pipeline, nets, pallas_norm, samplers, schedules, train
from vdm.model import SCHEDULES


def check_seed(seed: int, name: str) -> None:
  """Refuse a seed outside [0, 2^32): ``jax.random.PRNGKey`` keeps its low 32 bits, so a larger or
  negative one would silently repeat another seed's randomness."""
  if not 0 <= seed < 2**32:
    raise ValueError(f"{name}={seed} must be in [0, 2^32): a PRNG key keeps a seed's low 32 bits, "
                     "so another value would repeat another seed's run.")


def check_keys(config) -> None:
  """Refuse a config that is not a ConfigDict with every key of configs/default.py (one written
  before a key was added, say): each would fail later, in a traceback about an attribute."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"the config is a {type(config).__name__}: get_config() must return an "
                     "ml_collections.ConfigDict, e.g. configs/default.py's with changes.")
  try:
    from configs import default  # pylint: disable=g-import-not-at-top  # a checkout's configs
  except ImportError:
    return
  missing = sorted(checkpoint.config_items(default.get_config()).keys()
                   - checkpoint.config_items(config).keys())
  if missing:
    raise ValueError(f"the config lacks {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}: "
                     "start from configs/default.py's get_config(), as configs/*.py do.")


def validate(config) -> None:
  """Raise ValueError with the fix for inconsistent settings, before any heavy work."""
  check_keys(config)
  d, m, t = config.data, config.model, config.training
  input_pipeline.check_source(d.source)
  if d.source == "npz":
    input_pipeline.check_npz_path(d.path)
  if not 2 <= d.vocab_size <= 256:
    raise ValueError(f"data.vocab_size={d.vocab_size} must be in [2, 256] for uint8 images.")
  if d.image_size < 1 or d.channels < 1:
    raise ValueError(f"data.image_size={d.image_size} and data.channels={d.channels} must be >= 1.")
  if d.source == "synthetic" and d.image_size < 3:
    raise ValueError(f"data.source='synthetic' needs data.image_size >= 3 (now {d.image_size}).")
  if d.source == "synthetic" and min(d.synthetic_num_train, d.synthetic_num_test) < 1:
    raise ValueError("data.source='synthetic' needs data.synthetic_num_train, "
                     f"data.synthetic_num_test >= 1 (now {d.synthetic_num_train}, "
                     f"{d.synthetic_num_test}): a split that has no examples would end the run.")
  if d.prefetch < 1:
    raise ValueError(f"data.prefetch={d.prefetch} must be >= 1 (batches staged on the devices "
                     "ahead of the step).")
  schedules.check_endpoints(m.gamma_min, m.gamma_max, "model.")
  if m.schedule not in SCHEDULES:
    raise ValueError(f"unknown model.schedule {m.schedule!r}: use one of {', '.join(SCHEDULES)}.")
  if m.decoder not in elbo.DECODERS:
    raise ValueError(f"unknown model.decoder {m.decoder!r}: use one of {', '.join(elbo.DECODERS)}.")
  if m.num_timesteps < 0:
    raise ValueError(f"model.num_timesteps={m.num_timesteps} must be >= 0 (0 = continuous time).")
  for key in ("dtype", "residual_dtype"):
    if m[key] not in nets.DTYPES:
      raise ValueError(f"unknown model.{key} {m[key]!r}: use one of {', '.join(nets.DTYPES)}.")
  if m.dtype == "float32" and m.residual_dtype != "float32":
    raise ValueError(f"model.residual_dtype={m.residual_dtype!r} would round the residual stream "
                     "of a float32 network: set model.residual_dtype=float32 or model.dtype="
                     f"{m.residual_dtype}.")
  if isinstance(m.unroll, bool) or m.unroll < 0:
    raise ValueError(f"model.unroll={m.unroll!r} must be an integer >= 0 (blocks per loop "
                     "iteration; 0 unrolls the loops entirely).")
  if m.norm_impl not in nets.NORM_IMPL:
    raise ValueError(f"unknown model.norm_impl {m.norm_impl!r}: use one of "
                     f"{', '.join(nets.NORM_IMPL)} (see vdm.nets.NORM_IMPL).")
  if m.norm_impl in ("pallas", "pallas_conv") and pallas_norm.use_interpreter():  # refuses a
    # backend or a jax without the kernels
    logging.warning("model.norm_impl=%r on the CPU runs its kernels in Pallas's interpreter, about "
                    "20x slower than the XLA rule (for tests): use model.norm_impl=autodiff here.",
                    m.norm_impl)
  if m.norm_impl == "recompute" and m.remat != "none":
    raise ValueError(f"model.norm_impl='recompute' with model.remat={m.remat!r}: a "
                     "rematerialised block already recomputes its norms; set model.remat=none "
                     "or model.norm_impl=autodiff.")
  if m.remat not in nets.REMAT:
    raise ValueError(f"unknown model.remat {m.remat!r}: use one of {', '.join(nets.REMAT)} (see "
                     "vdm.nets.REMAT).")
  nets.check_channel_mult(m.channel_mult, "model.")
  nets.check_width(m.n_embd, m.channel_mult, "model.")
  nets.check_resolution(d.image_size, d.image_size, m.channel_mult, "model.")
  if config.loss.weighting not in elbo.WEIGHTINGS:
    raise ValueError(f"unknown loss.weighting {config.loss.weighting!r}: use one of "
                     f"{', '.join(elbo.WEIGHTINGS)}.")
  if config.sampling.sampler not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampling.sampler {config.sampling.sampler!r}: use one of "
                     f"{', '.join(samplers.SAMPLERS)}.")
  for key, seed in (("seed", config.seed), ("eval.seed", config.eval.seed)):
    check_seed(seed, key)
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"model.dropout={m.dropout} must be in [0, 1) (the rate of zeroed activations).")
  if config.eval.num_batches < 0:
    raise ValueError(f"eval.num_batches={config.eval.num_batches} must be >= 0 (0 = the whole split).")
  for key in ("num_steps", "num_samples"):
    if config.sampling[key] < 1:
      raise ValueError(f"sampling.{key}={config.sampling[key]} must be >= 1.")
  if t.num_steps < 0:
    raise ValueError(f"training.num_steps={t.num_steps} must be >= 0 (0 = no training steps).")
  if t.max_nonfinite_steps < 1:
    raise ValueError(f"training.max_nonfinite_steps={t.max_nonfinite_steps} must be >= 1 (the "
                     "non-finite steps in a row that stop the run).")
  for key in ("log_every", "eval_every", "sample_every", "checkpoint_every", "max_to_keep"):
    if t[key] < 1:
      raise ValueError(f"training.{key}={t[key]} must be >= 1.")
  input_pipeline.check_batch_size(t.batch_size, "training.batch_size")
  input_pipeline.check_batch_size(config.eval.batch_size, "eval.batch_size")
  train.check_loss_config(config)
  train.check_optimizer_config(config.optimizer)
  train.check_sampling_steps(m.num_timesteps, config.sampling.num_steps, "sampling.num_steps")
