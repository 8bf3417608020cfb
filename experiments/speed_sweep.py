"""Variants of the training step timed side by side in one process, with where their time goes.

    python experiments/speed_sweep.py --config=configs/cifar10.py --variants=base,no_dropout \
        --output=/tmp/sweep.json [--hlo_dir=/tmp/hlo] [--floors] [--norms] [--convs]

Each variant is a set of config overrides (and optionally the default PRNG implementation) on
top of ``--config`` with ``--dtype`` and ``--batch_size``; ``a+b`` applies the overrides of
variants a and b together (e.g. ``unroll0+remat_none``). A part ``xla:NAME=VALUE`` compiles the
variant's programs with that option of XLA's (a field of its DebugOptions, e.g.
``unroll0+xla:xla_gpu_enable_pdl=true``; VALUE holds no comma, on which ``--variants`` splits;
every option is checked against this jaxlib before anything runs), so compiler options are timed
side by side like the network's.
:func:`vdm.benchmark.benchmark` times its train step (and the programs the variant names) and,
with ``--profile``, splits its device time by kernel kind. ``--floors`` first measures the two
ceilings the step is held to on this device: a bf16 3×3 convolution of the net's shape
(forward, and forward plus both gradients) and a large copy; ``--norms`` and ``--convs`` time
the net's norms alone and each with the convolution that reads it (:func:`norms`,
:func:`convs`); with ``--norms`` the JSON names the fastest way that computes autodiff's function
(:func:`fastest_norm`: the runbook's lease phase trains with it). The JSON is rewritten after
every variant, so a time limit keeps what finished.
Peak device memory is the process's running maximum (``process_peak_memory_gib``); a
variant's own memory is its train step's temporaries (``train_temp_gib``), or a bench run.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vdm import (benchmark, config_checks, logging_utils, nets, pallas_conv,  # noqa: E402
                 pallas_norm)

XLA_PREFIX = "xla:"


class Variant(NamedTuple):
  """Config overrides, the default PRNG implementation (None: the process's), the programs timed
  after training (of ``vdm.benchmark.PROGRAMS``) and, for a combined variant, the XLA options
  its ``xla:`` parts set for compiling each of them."""
  overrides: dict
  prng_impl: Optional[str] = None
  programs: tuple[str, ...] = ()
  xla: Optional[dict] = None


VARIANTS = {
    "base": Variant({}, programs=benchmark.PROGRAMS),
    "residual_bf16": Variant({"model.residual_dtype": "bfloat16"}, programs=("sample",)),
    "no_dropout": Variant({"model.dropout": 0.0}),
    "rbg": Variant({}, prng_impl="rbg"),
    "unroll0": Variant({"model.unroll": 0}, programs=("sample",)),
    "unroll1": Variant({"model.unroll": 1}, programs=("sample",)),
    "unroll2": Variant({"model.unroll": 2}, programs=("sample",)),
    "remat_none": Variant({"model.remat": "none"}),
    "remat_full": Variant({"model.remat": "full"}),
    "norm_recompute": Variant({"model.norm_impl": "recompute", "model.remat": "none"}),
    "norm_pallas": Variant({"model.norm_impl": "pallas"}, programs=("sample",)),
    "norm_pallas_conv": Variant({"model.norm_impl": "pallas_conv"}, programs=("sample",)),
    "float32": Variant({"model.dtype": "float32"}, programs=("sample",)),
}


def xla_part(part: str) -> tuple[str, Any]:
  """(name, value) of a variant part ``xla:NAME=VALUE``; VALUE as a bool ('true' / 'false'),
  an int or a float where it reads as one, else as a string."""
  name, sep, text = part[len(XLA_PREFIX):].partition("=")
  if not name or not sep:
    raise app.UsageError(f"variant part {part!r}: write xla:NAME=VALUE, e.g. "
                         "xla:xla_gpu_enable_pdl=true.")
  if text.lower() in ("true", "false"):
    return name, text.lower() == "true"
  for kind in (int, float):
    try:
      return name, kind(text)
    except ValueError:
      pass
  return name, text


def check_xla_options(options: dict) -> None:
  """Refuses an option this jaxlib's XLA does not know, or a value of the wrong type, by
  compiling a one-line program with it (every backend's compiler reads all of XLA's options, the
  CPU's those of the GPU too)."""
  for name, value in options.items():
    try:
      jax.jit(lambda x: x + 1).lower(np.float32(0)).compile({name: value})
    except Exception as e:  # pylint: disable=broad-except  (XLA reports it as a runtime error)
      raise app.UsageError(f"XLA option {name}={value!r} refused by jax {jax.__version__}'s XLA "
                           f"({logging_utils.first_line(e) or type(e).__name__}): check the name and type against its DebugOptions.")


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).",
                                lock_config=False)
flags.DEFINE_list("variants", ["base"], f"Variants to time, in order: {', '.join(VARIANTS)}, "
                  f"or several joined by '+'; a part {XLA_PREFIX}NAME=VALUE sets an XLA option.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype of every variant "
                  "(a variant's model.dtype override wins).")
flags.DEFINE_integer("repeats", 10, "Timed repeats per figure (the median is reported).")
flags.DEFINE_bool("profile", True, "Split each program's device time by kernel kind.")
flags.DEFINE_bool("floors", False, "First time a convolution of the net's shape and a copy.")
flags.DEFINE_bool("norms", False, "First time each way of computing the net's GroupNorm + swish "
                  "alone, and compare their results.")
flags.DEFINE_bool("convs", False, "First time a norm and the convolution that reads it, forward: "
                  "cuDNN after the XLA or Pallas norm, and the Pallas convolution that applies "
                  "the norm as it loads.")
flags.DEFINE_bool("count_flops", True, "Count the first variant's FLOPs (lowering it unrolled).")
flags.DEFINE_string("hlo_dir", None, "Write the first variant's optimised HLO here.")
flags.DEFINE_string("output", None, "JSON file for all figures.")
flags.mark_flags_as_required(["config", "output"])


def _time(fn, *args) -> float:
  """Median seconds of fn(*args) over --repeats calls after two warm-up calls, each to
  block_until_ready."""
  return benchmark.median_seconds(lambda: fn(*args), FLAGS.repeats, 2)


def _device_ms(fn, *args) -> Optional[float]:
  """Device-kernel ms per call of fn(*args) from a profile of --repeats calls, without the launch
  and synchronisation that the wall time of one short call includes; None without --profile
  and on the CPU, whose trace has no device plane."""
  if not FLAGS.profile:
    return None
  events = benchmark.device_kernel_events(lambda: fn(*args), FLAGS.repeats)
  return benchmark.kernel_breakdown(events, FLAGS.repeats)["ms_per_call"] or None


def conv3x3_flop(batch: int, size: int, c_in: int, c_out: int) -> float:
  """FLOPs of a SAME 3×3 convolution [batch, size, size, c_in] -> c_out counted dense, 2·MACs of
  all 9 taps at every pixel (the zero padding's too): the count of quoted peak figures. XLA's cost
  analysis (``vdm.benchmark.train_step_flops``, hence ``train_tflops_per_s``) counts only the taps
  inside the image, (3·size − 2)² / (3·size)² of this: 4 % less at 32×32, 16 % at 8×8."""
  return 2.0 * batch * size * size * 9 * c_in * c_out


def floors(batch: int, width: int, size: int = 32) -> dict:
  """TFLOP/s of a bf16 3×3 convolution [batch, size, size, width] -> width (forward, and forward
  with the input and kernel gradients; FLOPs of :func:`conv3x3_flop`), and the GB/s of a 1 GiB
  fp32 copy (read + write)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, width)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, width, width)) / (3 * width ** 0.5), jnp.bfloat16)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fwd = jax.jit(conv)
  fwd_bwd = jax.jit(lambda x, w: jax.vjp(conv, x, w)[1](conv(x, w)))
  flop = conv3x3_flop(batch, size, width, width)
  big = jnp.asarray(rng.standard_normal((2**28,)), jnp.float32)
  copy = jax.jit(lambda a: a * 1.0001)
  return {"conv_fwd_tflops": flop / _time(fwd, x, w) / 1e12,
          "conv_fwd_bwd_tflops": 3 * flop / _time(fwd_bwd, x, w) / 1e12,
          "copy_gb_per_s": 2 * big.nbytes / _time(copy, big) / 1e9}


STANDALONE_NORMS = tuple(i for i in nets.NORM_IMPL if i != "pallas_conv")


class _NormSwish(nn.Module):
  """One GroupNorm + swish of the net (``vdm.nets.norm_swish``) in bf16, computed as ``impl``,
  then dropout at rate ``dropout``."""
  impl: str
  dropout: float

  @nn.compact
  def __call__(self, parts, shift):
    return nets.norm_swish(parts, shift, jnp.bfloat16, self.impl, "norm", dropout=self.dropout)


def _output_and_vjp(fn: Callable, args: tuple, ct: jax.Array) -> tuple:
  """(fn(*args), the gradients of ⟨ct, fn(*args)⟩ with respect to args): what a training step asks
  of a layer. The output is returned so that XLA cannot drop its write, which a Pallas kernel must
  always make: timing the gradients alone would favour the XLA ways."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(ct)


def norms(batch: int, width: int, size: int = 32, dropout: float = 0.1,
          record: Callable[[dict], None] = lambda out: None) -> dict:
  """Each way of computing the net's GroupNorm + swish alone (``vdm.nets.NORM_IMPL`` but
  'pallas_conv', which computes it inside a convolution: ``--convs``), for a
  block's second norm (bf16 [batch, size, size, width] plus the fp32 γ shift; without dropout,
  and with it as in training) and an up block's first (two bf16 parts of ``width`` channels): ms
  forward and forward + backward (wall time, and with --profile on a GPU device-kernel time),
  the GB/s of the least traffic they need (forward: read the input and write the output, 4
  bytes per element; with the backward, which returns the output too as a training step needs
  it, also read the input and the cotangent and write the input's gradient, 10), and, without
  dropout (whose masks differ),
  the largest difference from autodiff of the output and of all gradients, relative to each's
  largest magnitude (rounding to bf16 is 0.4 %): on a GPU, the check that Triton compiled the
  Pallas kernels to the same function. ``record`` gets the figures so far after each case."""
  rng = np.random.default_rng(0)
  image = lambda: jnp.asarray(rng.standard_normal((batch, size, size, width)), jnp.bfloat16)
  shift = jnp.asarray(rng.standard_normal((batch, width)), jnp.float32)
  norm2 = (image(),)
  cases = {"norm2": (norm2, shift, 0.0), "norm2_dropout": (norm2, shift, dropout),
           "up_norm1": ((image(), image()), None, 0.0)}
  key = {"dropout": jax.random.PRNGKey(1)}
  out = {}
  for case, (parts, shift, rate) in cases.items():
    elements = sum(p.size for p in parts)
    ct = jnp.asarray(rng.standard_normal(parts[0].shape[:3] + (elements // batch // size ** 2,)),
                     jnp.bfloat16)
    results = {}
    for impl in STANDALONE_NORMS:
      module = _NormSwish(impl, rate)
      apply = lambda *a, module=module: module.apply(*a, rngs=key)  # noqa: E731
      fwd = jax.jit(apply)
      fwd_bwd = jax.jit(lambda params, parts, shift, ct, apply=apply: _output_and_vjp(
          apply, (params, parts, shift), ct))
      try:  # one failing way (a kernel Triton cannot compile) keeps the others
        params = module.init(jax.random.PRNGKey(0), parts, shift)
        results[impl] = (fwd(params, parts, shift), fwd_bwd(params, parts, shift, ct))
        fwd_s = _time(fwd, params, parts, shift)
        fwd_bwd_s = _time(fwd_bwd, params, parts, shift, ct)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        out[f"{case}_{impl}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        continue
      out[f"{case}_{impl}"] = {"fwd_ms": 1e3 * fwd_s, "fwd_bwd_ms": 1e3 * fwd_bwd_s,
                               "fwd_gb_per_s": 4 * elements / fwd_s / 1e9,
                               "fwd_bwd_gb_per_s": 10 * elements / fwd_bwd_s / 1e9}
      for name, fn, args, least in (("fwd", fwd, (params, parts, shift), 4),
                                    ("fwd_bwd", fwd_bwd, (params, parts, shift, ct), 10)):
        device_ms = _device_ms(fn, *args)
        if device_ms:
          out[f"{case}_{impl}"].update({f"{name}_device_ms": device_ms,
                                        f"{name}_device_gb_per_s": least * elements / device_ms / 1e6})
    if not rate and "autodiff" in results:
      want = [np.asarray(b, np.float32) for b in jax.tree_util.tree_leaves(results["autodiff"])]
      # Each array's error relative to its largest magnitude, floored at 1e-3 of the largest of
      # all (with one channel per group the shift's gradient is 0 up to rounding).
      floor = 1e-3 * max(np.abs(b).max() for b in want)
      for impl in (i for i in STANDALONE_NORMS[1:] if i in results):
        got = [np.asarray(a, np.float32) for a in jax.tree_util.tree_leaves(results[impl])]
        out[f"{case}_{impl}"]["max_rel_diff_from_autodiff"] = max(
            float(np.abs(a - b).max() / max(np.abs(b).max(), floor)) for a, b in zip(got, want))
    record(out)
  return out


# The cases of :func:`norms` that rank the ways of computing the norm by forward + backward time
# (a training step's block norms run with dropout; an up block's first norm reads two parts), and
# those whose results must match autodiff's (dropout's masks differ between the ways).
RANKED_NORM_CASES = ("norm2_dropout", "up_norm1")
CHECKED_NORM_CASES = ("norm2", "up_norm1")


def fastest_norm(timed: dict, tolerance: float = 0.02) -> str:
  """The way of computing the norm (of :data:`STANDALONE_NORMS`) whose forward + backward time,
  summed over :data:`RANKED_NORM_CASES` of ``timed`` (what :func:`norms` returns), is least, of
  the ways that ran in every case and matched autodiff's results within ``tolerance`` (relative,
  as :func:`norms` measures it; bf16 rounding is 0.4 %). Device-kernel ms rank the ways where
  every candidate has them, else wall ms. 'autodiff' (the config default) where no way
  qualifies, e.g. when the norms did not run."""
  def qualifies(impl: str) -> bool:
    figures = [timed.get(f"{case}_{impl}", {"error": "not run"})
               for case in set(RANKED_NORM_CASES + CHECKED_NORM_CASES)]
    return all("error" not in f for f in figures) and (impl == "autodiff" or all(
        timed[f"{case}_{impl}"].get("max_rel_diff_from_autodiff", np.inf) <= tolerance
        for case in CHECKED_NORM_CASES))

  candidates = [impl for impl in STANDALONE_NORMS if qualifies(impl)]
  if not candidates:
    return "autodiff"
  ranked = lambda impl: [timed[f"{case}_{impl}"] for case in RANKED_NORM_CASES]  # noqa: E731
  key = ("fwd_bwd_device_ms" if all(f.get("fwd_bwd_device_ms") for impl in candidates
                                    for f in ranked(impl)) else "fwd_bwd_ms")
  return min(candidates, key=lambda impl: sum(f[key] for f in ranked(impl)))


# (rows, block, num_warps, num_stages) of vdm.pallas_conv.norm_swish_conv that --convs times.
# Compiled offline for sm_90 (Triton 3.9, experiments/RESULTS.md), the 4-warp tiles of 128 rows
# spilled registers; these did not.
CONV_TILINGS = {"r128_b64_w8_s2": (128, 64, 8, 2), "r128_b64_w8_s3": (128, 64, 8, 3),
                "r128_b32_w8_s3": (128, 32, 8, 3), "r64_b64_w8_s3": (64, 64, 8, 3)}


def _conv(h, kernel, bias, residual):
  """The net's bf16 3×3 convolution (``nn.Conv``: bias added in its dtype), plus a residual."""
  y = jax.lax.conv_general_dilated(h, kernel.astype(h.dtype), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y + bias.astype(h.dtype)
  return y if residual is None else y + residual


def convs(batch: int, width: int, size: int = 32, groups: int = 32, epsilon: float = 1e-6,
          record: Callable[[dict], None] = lambda out: None) -> dict:
  """A ResNet block's GroupNorm + swish and the 3×3 convolution that reads it, forward only
  (what a sampling step does 134 times), in bf16, for a block's conv2 (the γ shift and the
  residual sum) and an up block's conv1 (two parts of ``width`` channels): ms, the TFLOP/s of
  the convolution's FLOPs (:func:`conv3x3_flop`; of the wall time, and with --profile on a GPU of
  the device-kernel time), and each output's largest difference from xla's, relative to xla's
  largest magnitude, computed as
    cudnn_alone: the convolution of a given norm output (the floor of the unfused ways);
    xla: the net's XLA norm (``vdm.nets.group_norm_swish``), then the convolution;
    pallas_norm: the Pallas norm kernel (``vdm.pallas_norm``), then the convolution;
    fused_T: the statistics by an XLA reduction, then ``vdm.pallas_conv.norm_swish_conv``
      tiled as T of :data:`CONV_TILINGS`;
    fused_kernel_T: that kernel alone from given statistics, also returning its output's sums
      (as inside a net where each convolution supplies the next norm's statistics).
  A way that fails (a tiling Triton cannot compile) is recorded and the others still run;
  ``record`` gets the figures so far after each case."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  image = lambda: normal(batch, size, size, width).astype(jnp.bfloat16)  # noqa: E731
  cases = {"conv2": ((image(),), normal(batch, width), image()),
           "up_conv1": ((image(), image()), None, None)}
  out = {}
  for case, (parts, shift, residual) in cases.items():
    channels = sum(p.shape[-1] for p in parts)
    norm = dict(parts=parts, shift=shift, scale=1.0 + 0.1 * normal(channels),
                bias=0.1 * normal(channels))
    conv = dict(kernel=normal(3, 3, channels, width) / (3 * channels ** 0.5),
                bias=0.1 * normal(width), residual=residual)
    xla_norm = lambda parts, shift, scale, bias: nets.group_norm_swish(  # noqa: E731
        groups, epsilon, jnp.bfloat16, parts, shift, scale, bias)

    def affine(parts, shift, scale, bias):
      return pallas_conv.norm_affine(*nets.group_statistics(parts, shift, groups, epsilon),
                                     scale, bias, shift)
    ways = {"cudnn_alone": (lambda h, c: _conv(h, **c), (xla_norm(**norm), conv)),
            "xla": (lambda n, c: _conv(xla_norm(**n), **c), (norm, conv)),
            "pallas_norm": (lambda n, c: _conv(pallas_norm.group_norm_swish(
                groups, epsilon, jnp.bfloat16, **n), **c), (norm, conv))}
    for name, (rows, block, warps, stages) in CONV_TILINGS.items():
      tiling = dict(rows=rows, block=block, num_warps=warps, num_stages=stages)
      ways[f"fused_{name}"] = (lambda n, c, tiling=tiling: pallas_conv.norm_swish_conv(
          n["parts"], *affine(**n), **c, **tiling), (norm, conv))
      ways[f"fused_kernel_{name}"] = (lambda parts, ac, c, tiling=tiling: pallas_conv.norm_swish_conv(
          parts, *ac, **c, sums=True, **tiling)[0], (parts, affine(**norm), conv))
    flop = conv3x3_flop(batch, size, channels, width)
    want = None
    for way, (fn, args) in ways.items():
      try:  # one failing way keeps the others
        fn = jax.jit(fn)
        got = np.asarray(fn(*args), np.float32)
        seconds = _time(fn, *args)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        out[f"{case}_{way}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        continue
      out[f"{case}_{way}"] = {"ms": 1e3 * seconds, "tflops": flop / seconds / 1e12}
      device_ms = _device_ms(fn, *args)
      if device_ms:
        out[f"{case}_{way}"].update(device_ms=device_ms, device_tflops=flop / device_ms / 1e9)
      if way == "xla":
        want = got
      elif want is not None:
        out[f"{case}_{way}"]["max_rel_diff_from_xla"] = float(
            np.abs(got - want).max() / np.abs(want).max())
    record(out)
  return out


def combine(name: str) -> Variant:
  """The variant ``a+b+...``: the named parts' overrides and the ``xla:`` parts' options together
  (a later part wins), the last PRNG named, and the programs of all parts."""
  overrides, prng_impl, programs, xla = {}, None, (), {}
  for part in name.split("+"):
    if part.startswith(XLA_PREFIX):
      xla.update([xla_part(part)])
      continue
    v = VARIANTS[part]
    overrides.update(v.overrides)
    prng_impl = v.prng_impl or prng_impl
    programs += tuple(q for q in v.programs if q not in programs)
  return Variant(overrides, prng_impl, programs, xla or None)


def variant_config(overrides: dict):
  """--config at --dtype with a variant's overrides."""
  config = FLAGS.config.copy_and_resolve_references()
  config.model.dtype = FLAGS.dtype
  config.update_from_flattened_dict(overrides)
  return config


def run_variant(name: str) -> dict:
  overrides, prng_impl, programs, xla = combine(name)
  config = variant_config(overrides)
  previous = jax.config.jax_default_prng_impl
  if prng_impl:
    jax.config.update("jax_default_prng_impl", prng_impl)
  try:
    figures = benchmark.benchmark(config, batch_size=FLAGS.batch_size, repeats=FLAGS.repeats,
                                  profile=FLAGS.profile, programs=programs, compiler_options=xla,
                                  count_flops=FLAGS.count_flops and name == FLAGS.variants[0],
                                  hlo_dir=FLAGS.hlo_dir if name == FLAGS.variants[0] else None)
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  figures.update(variant=name, overrides=overrides, prng_impl=prng_impl or previous,
                 xla_options=xla or {}, unroll=config.model.unroll, dropout=config.model.dropout)
  # The device's peak is the process's running maximum, which includes the variants before
  # this one: only the train step's temporaries are this variant's own.
  figures["process_peak_memory_gib"] = figures.pop("peak_memory_gib")
  del figures["peak_memory_bytes"]
  return figures


def summary(name: str, f: dict) -> str:
  if "error" in f:
    return f"{name:>14}  error: {f['error']}"
  prof = f.get("profile", {}).get("train", {})
  busy = prof.get("ms_per_call")
  split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(prof.get("kinds", {}).items()))
  sample = f.get("sample_step_ms")
  temp = "n/a" if f["train_temp_gib"] is None else f"{f['train_temp_gib']:.1f}"
  line = (f"{name:>14}  {f['train_images_per_s']:8.1f} img/s  {1e3 * f['train_step_s']:7.1f} ms/step"
          f"  compile {f['train_compile_s']:5.1f} s  temp {temp:>5} GiB"
          f"  saved {f['net_saved_gib']:5.1f} GiB"
          f"  sample {sample if sample is not None else float('nan'):6.2f} ms"
          f"  kernels {busy if busy is not None else float('nan'):6.1f} ms ({split})")
  return "\n".join([line] + benchmark.format_top_kernels(prof, benchmark.TOP_REPORTED,
                                                             indent=16))


@logging_utils.one_line_errors
def main(argv):
  del argv
  unknown = [v for v in FLAGS.variants if any(
      p not in VARIANTS and not p.startswith(XLA_PREFIX) for p in v.split("+"))]
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}: use some of {', '.join(VARIANTS)}, "
                         f"or {XLA_PREFIX}NAME=VALUE.")
  # Checked once, before anything compiles: each variant would fail the same way, one by one.
  for flag in ("repeats", "batch_size"):
    if FLAGS[flag].value < 1:
      raise app.UsageError(f"--{flag}={FLAGS[flag].value} must be >= 1.")
  for name in FLAGS.variants:
    config_checks.validate(variant_config(combine(name).overrides))
  for name in FLAGS.variants:
    check_xla_options(combine(name).xla or {})
  for key, flag in (("model.dtype", "dtype"), ("training.batch_size", "batch_size")):
    if any(a.startswith(f"--config.{key}") for a in sys.argv):
      raise app.UsageError(f"--config.{key} has no effect here: every variant runs at --{flag}.")
  if FLAGS.output:
    logging_utils.keep_previous(FLAGS.output)
  results: dict = {**logging_utils.provenance(), "batch_size": FLAGS.batch_size,
                   "dtype": FLAGS.dtype, "variants": {}}

  def save():
    if FLAGS.output:
      logging_utils.write_json(FLAGS.output, results, sort_keys=False)  # in the order measured

  if FLAGS.floors:
    results["floors"] = floors(FLAGS.batch_size, FLAGS.config.model.n_embd,
                               FLAGS.config.data.image_size)
    print("floors:", results["floors"], flush=True)
    save()
  for key, measure in (("norms", norms), ("convs", convs)):
    if FLAGS[key].value:
      # Saved after each case: a time limit (the lease gives the norms 90 s) keeps those done.
      results[key] = measure(FLAGS.batch_size, FLAGS.config.model.n_embd,
                             FLAGS.config.data.image_size,
                             record=lambda out, key=key: (results.update({key: out}), save()))
      for name, f in results[key].items():
        print(f"{key} {name:>36}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()),
            flush=True)
      if key == "norms":
        results["fastest_norm"] = fastest_norm(results["norms"])
        print("fastest norm:", results["fastest_norm"], flush=True)
      save()
  # XLA keeps what it autotuned (convolution algorithms) for the process: a variant compiled after
  # anything else here compiled is not a cold compile; vdm.benchmark in a fresh process is.
  warm = bool(FLAGS.floors or FLAGS.norms or FLAGS.convs)
  for name in FLAGS.variants:
    t0 = time.perf_counter()
    try:
      results["variants"][name] = {**run_variant(name), "compiled_in_warm_process": warm}
    except Exception as e:  # pylint: disable=broad-except  (one failing variant keeps the others)
      traceback.print_exc()
      results["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    results["variants"][name]["wall_s"] = time.perf_counter() - t0
    warm = True
    print(summary(name, results["variants"][name]), flush=True)
    save()
  print("\n".join(summary(n, f) for n, f in results["variants"].items()))


if __name__ == "__main__":
  app.run(main, flags_parser=logging_utils.parse_flags)
