"""Throughput of the VDM model on the local devices: train, eval and sampling steps.

    python -m vdm.benchmark --config=configs/cifar10.py --batch_size=128 [--dtype=bfloat16]
        [--remat=none|convs|full] [--repeats=10] [--warmup=2] [--sample_steps=10]
        [--json_out=bench.json] [--profile]

Reports, after warm-up and as the median over repeats, each step timed to
``jax.block_until_ready``:
  * train: images/s of the full step (ELBO forward + backward, AdamW, EMA: ``vdm.train``'s step),
    its compile time, and the achieved TFLOP/s from XLA's cost analysis of the step;
  * eval: images/s of the ELBO forward pass (no dropout), of which a bf16 net sends the share
    ``eval_fp32_fraction`` of each batch through the fp32 net, as the bound does;
  * sampling: ms per ancestral sampling step at the batch size;
  * peak device memory (``peak_bytes_in_use``; None where the backend does not report it) and
    the train step's temporary buffers by XLA's buffer assignment (any backend);
  * with --profile, each program's device-kernel time per call, by kind (convolutions and matrix
    products, copies, other fusions) and its top kernels, from a ``jax.profiler`` trace, each with
    the bytes its HLO instruction reads and writes, the GB/s they imply and the layer it came from.

Data are uniform random integers: the step costs do not depend on the pixel values.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import math
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm import config_checks, logging_utils, nets, pallas_conv, pallas_norm, samplers, train
from vdm.nets import REMAT
from vdm.model import eps_fn_for, eval_fp32_share, gamma_fn_for, make_model, with_dtype


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
  """Median wall time of fn() over `repeats` calls after `warmup` calls, each to block_until_ready."""
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1: a median needs at least one timed call.")
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# Device kernels by what they do, matched on lower-cased kernel names in this order: our Pallas
# norms (vdm.pallas_norm.KERNEL_NAME), convolutions and matrix products (cuDNN, cuBLAS/CUTLASS,
# and our fused Pallas norm + convolution vdm.pallas_conv.KERNEL_NAME, which does the
# convolution's matmuls), XLA's data movement, XLA's other generated kernels (elementwise and
# reduction fusions). "convert" must not read as a convolution.
KERNEL_KINDS = (
    ("pallas_norm", (pallas_norm.KERNEL_NAME,)),
    ("conv_matmul", ("xmma", "gemm", "cudnn", "cutlass", "implicit", "fprop", "dgrad", "wgrad",
                     "convolution", "conv2d", "cublas", pallas_conv.KERNEL_NAME)),
    ("copy", ("copy", "memcpy", "memset", "dynamic_update_slice", "dynamic-update-slice",
              "transpose", "concatenate")),
    ("fusion", ("fusion", "reduce", "loop_", "input_", "triton")),
)


def kernel_kind(name: str) -> str:
  """The :data:`KERNEL_KINDS` entry a device kernel's name falls under, else "other"."""
  n = name.lower()
  for kind, keys in KERNEL_KINDS:
    if any(k in n for k in keys):
      return kind
  return "other"


# Bytes per element of the HLO element types a fusion reads or writes.
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
              "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*?)\)(.*)$")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. 'bf16[128,32,32,128]{3,2,1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]", shape):
    total += _HLO_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
  return total


def hlo_kernel_info(hlo_text: str) -> dict[str, dict]:
  """For each instruction of an optimised HLO module, keyed by the name its GPU kernel runs under in
  a trace (the instruction's name with '.' and '-' as '_'): "bytes", its operands' and its result's
  sizes (one launch's memory traffic if every byte moves once; an in-place update counts its whole
  buffer), and "op_name", the layer it came from (its metadata)."""
  shapes, instructions = {}, []
  for line in hlo_text.splitlines():
    m = _HLO_INSTRUCTION.match(line)
    if m:
      name, shape, _, operands, rest = m.groups()
      shapes[name] = shape
      instructions.append((name, shape, re.findall(r"%([\w.-]+)", operands), rest))
  info = {}
  for name, shape, operands, rest in instructions:
    op_name = re.search(r'op_name="([^"]*)"', rest)
    info[re.sub(r"[.-]", "_", name)] = {
        "bytes": shape_bytes(shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands),
        "op_name": op_name.group(1) if op_name else None}
  return info


def kernel_breakdown(events: Iterable[tuple[str, float]], calls: int, top: int = 40,
                     info: Optional[dict[str, dict]] = None) -> dict:
  """Device time per call from (kernel name, duration in ns) events of ``calls`` traced calls:
  "ms_per_call" in all, "kinds" {kind: ms per call}, and the ``top`` kernels by time, each
  {"name", "kind", "ms" per call, "launches" per call}; with ``info`` (:func:`hlo_kernel_info` of
  the program) also the "bytes" of one launch, the "gb_per_s" they imply and the "op_name"."""
  totals: dict[str, list] = {}
  for name, ns in events:
    t = totals.setdefault(name, [0.0, 0])
    t[0] += ns
    t[1] += 1
  kinds: dict[str, float] = {}
  for name, (ns, _) in totals.items():
    kind = kernel_kind(name)
    kinds[kind] = kinds.get(kind, 0.0) + ns / 1e6 / calls
  ranked = []
  for name, (ns, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
    entry = {"name": name, "kind": kernel_kind(name), "ms": ns / 1e6 / calls,
             "launches": count / calls}
    hlo = (info or {}).get(name)
    if hlo:
      entry.update(bytes=hlo["bytes"], gb_per_s=hlo["bytes"] * count / ns, op_name=hlo["op_name"])
    ranked.append(entry)
  return {"ms_per_call": sum(kinds.values()), "kinds": kinds, "top": ranked}


def device_kernel_events(fn: Callable[[], Any], calls: int) -> list[tuple[str, float]]:
  """(kernel name, ns) of every kernel that ``calls`` calls of fn() ran on the accelerators, from a
  ``jax.profiler`` trace: the events on the devices' stream lines. Empty on the CPU, whose trace
  has no device plane."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(fn())
    paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    events = []
    for path in paths:
      for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
          continue
        for line in plane.lines:
          if line.name.startswith("Stream"):
            events += [(ev.name, ev.duration_ns) for ev in line.events]
  return events


def _flops(analysis) -> Optional[float]:
  """'flops' of a cost analysis: a dict, or (older JAX) a list of one dict per program."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def peak_memory_bytes() -> Optional[int]:
  """The largest 'peak_bytes_in_use' over the local devices, or None where it is not reported."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without allocator stats)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def temp_bytes(compiled) -> Optional[int]:
  """The compiled program's temporary buffers (activations and workspace) by XLA's buffer
  assignment, per device; None where the backend gives no memory analysis."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (backends without it)
    return None


def train_step_flops(config, model, batch_size: int) -> Optional[float]:
  """FLOPs of one train step of the global batch by XLA's cost analysis (None where unavailable),
  from lowering alone.

  XLA counts a convolution's multiply-adds over the taps inside the image only (a SAME 3×3
  convolution at 32×32 is 4 % below the dense 2·MACs, at 8×8 16 %), so TFLOP/s from this count
  sit that far below figures quoted from the dense count.

  XLA counts a loop body once, so this lowers the same step with the block scans unrolled
  (same parameters and arithmetic); remat's recomputation is included when the net has it. It
  lowers for the host CPU, whose compiler gives a cost analysis before compiling; on the H100
  (jax 0.11.2) the lowered step's cost analysis came back empty. Pallas norms are counted as the
  same function by autodiff: a GPU process cannot lower them for the CPU (only interpret mode
  runs there), and in interpret mode XLA would count their grid loop once.
  """
  net = model.net.clone(unroll=0)
  if net.norm_impl in ("pallas", "pallas_conv"):
    net = net.clone(norm_impl="autodiff")
  twin = dataclasses.replace(model, net=net)
  state = train.abstract_train_state(config, twin)
  batch = jax.ShapeDtypeStruct((batch_size,) + model.image_shape, jnp.int32)
  cpu_mesh = train.make_mesh(jax.devices("cpu")[:1])
  return _flops(train.make_train_step(config, twin, cpu_mesh).lower(state, batch).cost_analysis())


def vjp_residual_bytes(fn: Callable, primal, *rest) -> int:
  """Bytes that JAX keeps from the forward pass of ``fn(primal, *rest)`` for its backward pass
  (the residuals of its VJP w.r.t. the pytree ``primal``), from tracing alone: the arguments may
  be ShapeDtypeStructs. XLA's fusions may recompute some of them rather than store them."""
  residuals = jax.eval_shape(lambda p, *r: jax.vjp(lambda q: fn(q, *r), p)[1], primal, *rest)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(residuals))


def saved_for_backward_bytes(net, image_shape: Sequence[int], batch_size: int) -> int:
  """:func:`vjp_residual_bytes` of one training call of the network w.r.t. its parameters
  (dropout on, the parameters included) on a batch of ``image_shape`` images."""
  z = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
  g = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  key = jax.random.PRNGKey(0)
  return vjp_residual_bytes(
      lambda p, z, g: net.apply(p, z, g, deterministic=False, rngs={"dropout": key}),
      jax.eval_shape(net.init, key, z, g), z, g)


PROGRAMS = ("eval", "sample")
TOP_REPORTED = 8  # memory-bound kernels listed per program in the report (40 are in the JSON)


def benchmark(config, *, batch_size: Optional[int] = None, dtype: Optional[str] = None,
              remat: Optional[str] = None, repeats: int = 10, warmup: int = 2,
              sample_steps: int = 10, compiler_options: Optional[dict] = None,
              profile: bool = False, programs: Iterable[str] = PROGRAMS,
              count_flops: bool = True, hlo_dir: Optional[str] = None,
              save: Callable[[dict], None] = lambda figures: None) -> dict:
  """Measure train / eval / sampling throughput of the model of `config`; returns the figures.

  batch_size, dtype and remat (a key of :data:`vdm.nets.REMAT`) default (None) to the config's
  (training.batch_size, model.dtype and model.remat). The batch is global: it is split over all
  local devices. compiler_options go to XLA's compile of each timed program (the tests
  turn LLVM optimisation off to compile fast on the CPU). With ``profile``, `repeats` more calls of
  each program are traced and "profile" holds their device-kernel time (:func:`kernel_breakdown`;
  empty on the CPU). ``programs`` (of :data:`PROGRAMS`) are timed after the train step;
  ``count_flops`` lowers the unrolled step for its FLOPs; with ``hlo_dir`` each compiled
  program's optimised HLO is written there (``<program>.hlo.txt.gz``) for reading its fusions.
  ``save(figures)`` runs with the figures so far after each program is timed and at the end, so a
  run stopped part-way (a device call's time limit) keeps what it measured.
  """
  programs = tuple(programs)
  if set(programs) - set(PROGRAMS):
    raise ValueError(f"programs={programs}: use some of {PROGRAMS}.")
  if repeats < 1 or warmup < 0 or sample_steps < 1:
    raise ValueError(f"repeats={repeats} must be >= 1, warmup={warmup} >= 0, "
                     f"sample_steps={sample_steps} >= 1.")
  batch_size = int(config.training.batch_size if batch_size is None else batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1: pass the global batch size (None for "
                     "the config's training.batch_size).")
  # The config as measured, checked and then built: with the dtype and remat given, a float32
  # network entirely in fp32 (with_dtype).
  measured = config.copy_and_resolve_references()
  if dtype:
    measured.model.dtype = dtype
    if dtype == "float32":
      measured.model.residual_dtype = dtype
  if remat:
    measured.model.remat = remat
  config_checks.validate(measured)
  dtype, remat = measured.model.dtype, measured.model.remat
  mesh = train.make_mesh()
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the {n_dev} devices.")

  model = with_dtype(make_model(measured), dtype)
  vocab = config.data.vocab_size
  rng = np.random.default_rng(0)
  batch = jax.device_put(rng.integers(0, vocab, (batch_size,) + model.image_shape, dtype=np.int32),
                         train.batch_sharding(mesh))
  out: dict[str, Any] = {
      **logging_utils.provenance(), "backend": jax.default_backend(), "num_devices": int(n_dev),
      "batch_size": batch_size, "image_shape": list(model.image_shape),
      "dtype": dtype, "residual_dtype": model.net.residual_dtype, "remat": remat,
      "norm_impl": model.net.norm_impl,
      # the share of each eval batch (least noisy first) that a bf16 net's bound computes in fp32
      "eval_fp32_fraction": eval_fp32_share(model),
      # per device, as the temporary buffers and peak memory are
      "net_saved_gib": saved_for_backward_bytes(model.net, model.image_shape,
                                                batch_size // n_dev) / 2**30,
      "repeats": repeats, "warmup": warmup,
      **logging_utils.compile_settings(),
  }

  # ---- train step
  state = train.create_train_state(config, model, mesh)
  out["num_params"] = nets.num_params(state.params["net"])
  step = train.make_train_step(config, model, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile(compiler_options)
  out["train_compile_s"] = time.perf_counter() - t0
  out["train_temp_bytes"] = temp_bytes(compiled)
  out["train_temp_gib"] = None if out["train_temp_bytes"] is None else out["train_temp_bytes"] / 2**30
  flops = train_step_flops(config, model, batch_size) if count_flops else None
  compiled_programs = {"train": compiled}

  holder = {"state": state}

  def train_once():
    holder["state"], metrics = compiled(holder["state"], batch)
    return holder["state"], metrics

  out["train_step_s"] = median_seconds(train_once, repeats, warmup)
  timed = {"train": train_once}
  out["train_images_per_s"] = batch_size / out["train_step_s"]
  out["train_step_tflop"] = None if flops is None else flops / 1e12
  out["train_tflops_per_s"] = None if flops is None else flops / out["train_step_s"] / 1e12
  out["peak_memory_bytes"] = peak_memory_bytes()  # the train step is the largest program
  save(out)
  params = holder["state"].params

  key = jax.random.PRNGKey(1)
  if "eval" in programs:  # the ELBO forward pass, deterministic net
    eval_step = train.make_eval_step(config, model, mesh)
    mask = jax.device_put(np.ones((batch_size,), np.float32), train.batch_sharding(mesh))
    t0 = time.perf_counter()
    eval_compiled = compiled_programs["eval"] = eval_step.lower(params, batch, mask, key).compile(
        compiler_options)
    out["eval_compile_s"] = time.perf_counter() - t0
    timed["eval"] = lambda: eval_compiled(params, batch, mask, key)
    out["eval_step_s"] = median_seconds(timed["eval"], repeats, warmup)
    out["eval_images_per_s"] = batch_size / out["eval_step_s"]
    save(out)

  if "sample" in programs:  # ancestral sampling: `sample_steps` steps, timed per step
    def sample(params, z, key):
      return samplers.ancestral(eps_fn_for(model, params), gamma_fn_for(model, params), z,
                                sample_steps, key)

    z = jax.device_put(rng.standard_normal((batch_size,) + model.image_shape, np.float32),
                       train.batch_sharding(mesh))  # not zeros: they can run faster than real data
    t0 = time.perf_counter()
    sample_compiled = compiled_programs["sample"] = jax.jit(sample).lower(params, z, key).compile(
        compiler_options)
    out["sample_compile_s"] = time.perf_counter() - t0
    timed["sample"] = lambda: sample_compiled(params, z, key)
    seconds = median_seconds(timed["sample"], repeats, warmup)
    out["sample_steps"] = sample_steps
    out["sample_step_ms"] = 1e3 * seconds / sample_steps
    save(out)
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    for name, program in compiled_programs.items():
      with gzip.open(os.path.join(hlo_dir, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(program.as_text())

  peak = peak_memory_bytes()
  out["peak_memory_bytes"] = max(filter(None, [out["peak_memory_bytes"], peak]), default=None)
  out["peak_memory_gib"] = None if out["peak_memory_bytes"] is None else out["peak_memory_bytes"] / 2**30
  if profile:  # diagnostics after the figures: a profiler that fails must not lose them
    try:
      # train last: its calls donate the state whose parameters the other two read
      out["profile"] = {
          name: kernel_breakdown(device_kernel_events(timed[name], repeats), repeats,
                                 info=hlo_kernel_info(compiled_programs[name].as_text()))
          for name in (*programs, "train")}
    except Exception as e:  # pylint: disable=broad-except
      out["profile_error"] = f"{type(e).__name__}: {e}"
  save(out)
  return out


def format_top_kernels(profile: dict, n: int, indent: int = 2) -> list[str]:
  """Lines for the ``n`` costliest kernels of a :func:`kernel_breakdown` that are not convolutions or
  matrix products: ms and launches per call, the GB/s their bytes imply, name and layer (its
  op_name's tail, 'bwd' when it comes from a gradient)."""
  lines = []
  for k in [k for k in profile.get("top", []) if k["kind"] != "conv_matmul"][:n]:
    op_name = k.get("op_name") or ""
    layer = ("bwd " if "transpose(" in op_name else "") + "/".join(op_name.split("/")[-3:])
    lines.append(f"{'':>{indent}}{k['ms']:6.2f} ms {k['launches']:4.0f}x "
                 f"{k.get('gb_per_s', float('nan')):6.0f} GB/s  {k['name']}  {layer}".rstrip())
  return lines


def format_report(figures: dict) -> str:
  def num(key, fmt):
    v = figures.get(key)
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

  return "\n".join([
      f"device: {figures['num_devices']} x {figures['device']} ({figures['backend']}), "
      f"jax {figures['jax']}",
      f"model: {figures['num_params'] / 1e6:.2f} M params, images {tuple(figures['image_shape'])}, "
      f"batch {figures['batch_size']}, dtype {figures['dtype']} (residual stream "
      f"{figures['residual_dtype']}), remat {figures['remat']}, norms "
      f"{figures['norm_impl']}",
      f"train:  {num('train_images_per_s', '.1f')} images/s  ({num('train_step_s', '.4f')} s/step, "
      f"compile {num('train_compile_s', '.1f')} s, {num('train_tflops_per_s', '.2f')} TFLOP/s "
      f"of {num('train_step_tflop', '.3f')} TFLOP/step)",
      f"eval:   {num('eval_images_per_s', '.1f')} images/s  ({num('eval_step_s', '.4f')} s/step, "
      f"compile {num('eval_compile_s', '.1f')} s, eval_fp32_fraction "
      f"{num('eval_fp32_fraction', '.2f')})",
      f"sample: {num('sample_step_ms', '.2f')} ms per ancestral step at batch {figures['batch_size']}",
      f"peak device memory: {num('peak_memory_gib', '.2f')} GiB; train step temporaries "
      f"{num('train_temp_gib', '.2f')} GiB; the net keeps {num('net_saved_gib', '.2f')} GiB "
      "for its backward pass (traced)",
      f"(median of {figures['repeats']} after {figures['warmup']} warm-up)",
  ] + [line for name, prof in figures.get("profile", {}).items() for line in [
      f"kernels, {name}: {prof['ms_per_call']:.2f} ms per call; "
      + ", ".join(f"{kind} {ms:.2f}" for kind, ms in sorted(prof["kinds"].items()))]
      + format_top_kernels(prof, TOP_REPORTED)])


@logging_utils.one_line_errors
def main(argv):
  del argv
  if FLAGS.json_out:  # checked before any work, which a late failure would lose
    logging_utils.writable_dir(os.path.dirname(os.path.abspath(FLAGS.json_out)),
                               "--json_out's directory")
    logging_utils.keep_previous(FLAGS.json_out)  # a rerun into the same folder keeps the first

  save = lambda figures: FLAGS.json_out and logging_utils.write_json(FLAGS.json_out, figures)
  figures = benchmark(FLAGS.config, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
                      remat=FLAGS.remat, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                      sample_steps=FLAGS.sample_steps, profile=FLAGS.profile, save=save)
  print(format_report(figures))
  if FLAGS.json_out:
    print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).",
                                  lock_config=False)
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")
  flags.DEFINE_enum("remat", None, list(REMAT), "What ResNet blocks recompute in the backward "
                    "pass (vdm.nets.REMAT; default: the config's model.remat).")
  flags.DEFINE_integer("repeats", 10, "Timed repeats per figure (the median is reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls before timing.")
  flags.DEFINE_integer("sample_steps", 10, "Ancestral steps per timed sampling call.")
  flags.DEFINE_string("json_out", None, "Write all figures to this JSON file.")
  flags.DEFINE_bool("profile", False, "Also trace each program and report its device-kernel time "
                    "by kind and its top kernels (accelerators only).")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=logging_utils.parse_flags)
