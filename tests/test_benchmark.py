"""vdm.benchmark on a tiny model on the CPU: every figure present, positive and finite.

Compile time dominates on the CPU, so the timed programs are compiled without LLVM optimisation
(the figures are only checked for sanity); the command-line run is marked slow."""
import gzip
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from configs import default
from vdm import benchmark, pallas_conv
from vdm.model import make_model
from vdm.nets import NORM_IMPL

ROOT = pathlib.Path(__file__).resolve().parents[1]

TIMES = ("train_compile_s", "train_step_s", "train_images_per_s", "eval_compile_s", "eval_step_s",
         "eval_images_per_s", "sample_compile_s", "sample_step_ms")


def tiny_config():
  config = default.get_config()
  config.data.image_size = 8
  config.model.n_embd = 64
  config.model.n_layer = 1
  config.training.batch_size = 4
  return config


def test_benchmark_figures():
  """Every figure present, positive and finite; with ``profile`` on the CPU, whose trace has no
  device plane, the kernel breakdown is empty rather than an error. The figures so far are saved
  after each program, so a time limit that stops the run keeps them."""
  saved = []
  figures = benchmark.benchmark(tiny_config(), repeats=2, warmup=1, sample_steps=2, profile=True,
                                compiler_options={"xla_backend_optimization_level": 0},
                                save=lambda f: saved.append(json.loads(json.dumps(f))))
  assert [[k in f for k in ("train_images_per_s", "eval_images_per_s", "sample_step_ms", "profile")]
          for f in saved] == [[True, False, False, False], [True, True, False, False],
                              [True, True, True, False], [True, True, True, True]]
  assert saved[-1] == json.loads(json.dumps(figures))  # serialisable as it is
  assert figures["commit"] and figures["date"] and figures["jax"] == jax.__version__, figures
  for key in TIMES + ("train_step_tflop", "train_tflops_per_s"):
    assert isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0, key
  assert figures["batch_size"] == 4 and figures["dtype"] == "float32" and figures["remat"] == "convs"
  assert figures["num_params"] > 0 and figures["train_temp_bytes"] > 0
  assert figures["train_images_per_s"] == pytest.approx(4 / figures["train_step_s"])
  # peak_bytes_in_use is not reported on the CPU (test_peak_memory_is_the_largest_reported).
  assert jax.local_devices()[0].memory_stats() is None
  assert figures["peak_memory_bytes"] is None and figures["peak_memory_gib"] is None
  # a float32 net evaluates every example in fp32: no share sent through a second, fp32 net
  assert figures["eval_fp32_fraction"] == 0.0
  assert figures["norm_impl"] == "autodiff" and figures["net_saved_gib"] > 0
  # what changed the compiles: a persistent cache if one is set, and the tests' XLA_FLAGS
  assert figures["compilation_cache_dir"] == (jax.config.jax_compilation_cache_dir or None)
  assert figures["xla_flags"] == os.environ["XLA_FLAGS"]
  assert "--xla_backend_optimization_level=0" in figures["xla_flags"]
  assert "profile_error" not in figures, figures.get("profile_error")
  assert set(figures["profile"]) == {"train", "eval", "sample"}
  assert all(p["ms_per_call"] == 0 and p["top"] == [] for p in figures["profile"].values())
  report = benchmark.format_report(figures)
  assert "images/s" in report and "kernels, train" in report
  assert [line.endswith("eval_fp32_fraction 0.00)") for line in report.splitlines()
          if line.startswith("eval:")] == [True], report


def test_batch_size_below_one_is_refused():
  """Before any work: 0 measured the config's batch and recorded 0; a negative failed in numpy."""
  for batch_size in (-2, 0):
    with pytest.raises(ValueError, match=f"^batch_size={batch_size} must be >= 1"):
      benchmark.benchmark(tiny_config(), batch_size=batch_size)


class _Device:
  """A device whose memory_stats() returns ``stats``, or raises it if it is an exception."""

  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    if isinstance(self.stats, Exception):
      raise self.stats
    return self.stats


def test_peak_memory_is_the_largest_reported(monkeypatch):
  """The largest peak_bytes_in_use over the devices that report it; None where none does."""
  devices = [_Device({"bytes_in_use": 1, "peak_bytes_in_use": 9}), _Device(None),
             _Device({"bytes_in_use": 5}), _Device(RuntimeError("no allocator stats")),
             _Device({"bytes_in_use": 2, "peak_bytes_in_use": 12})]
  monkeypatch.setattr(jax, "local_devices", lambda: devices)
  assert benchmark.peak_memory_bytes() == 12
  devices[-1:] = []
  assert benchmark.peak_memory_bytes() == 9
  devices[:1] = []
  assert benchmark.peak_memory_bytes() is None


def test_median_seconds_times_only_the_repeats(monkeypatch):
  """Warm-up calls are not timed, the median of the timed calls is returned, and each call's whole
  output is waited for before the clock is read: here the work happens in the wait, as a device's
  does after an asynchronous dispatch."""
  clock, outputs, blocked = [0.0], [], []
  durations = iter([100.0, 200.0, 3.0, 1.0, 2.0])  # two warm-up calls, then three timed

  def fn():
    outputs.append(({"state": len(outputs)}, [len(outputs)]))
    return outputs[-1]

  def block_until_ready(x):
    blocked.append(x)
    clock[0] += next(durations)
    return x

  monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  monkeypatch.setattr(jax, "block_until_ready", block_until_ready)
  assert benchmark.median_seconds(fn, repeats=3, warmup=2) == 2.0
  assert len(blocked) == len(outputs) == 5 and all(b is o for b, o in zip(blocked, outputs))
  with pytest.raises(ValueError, match="^repeats=0 must be >= 1"):
    benchmark.median_seconds(fn, repeats=0, warmup=0)


def test_saved_bytes_follow_the_remat_policy():
  """What the net keeps for its backward pass (traced): its parameters and the network input at
  the least, shrinking with remat none > convs > full, and proportional to the batch in the
  activations."""
  net = make_model(tiny_config()).net
  saved = {r: benchmark.saved_for_backward_bytes(net.clone(remat=r), (8, 8, 3), 4)
           for r in ("none", "convs", "full")}
  assert saved["none"] > saved["convs"] > saved["full"] > 4 * 8 * 8 * 3 * 4
  twice = benchmark.saved_for_backward_bytes(net.clone(remat="none"), (8, 8, 3), 8)
  assert saved["none"] < twice < 2 * saved["none"]


def test_flop_count_sees_every_scanned_block():
  """XLA counts a loop body once; the FLOPs come from the unrolled step and grow with n_layer."""
  flops = []
  for n_layer in (2, 4):
    config = tiny_config()
    config.model.n_layer = n_layer
    flops.append(benchmark.train_step_flops(config, make_model(config), 4))
  assert flops[1] > 1.4 * flops[0] > 0  # 7 -> 11 ResNet blocks; scanned, XLA would count 4 -> 4
  # A Pallas norm computes the same function: counted as such (its interpreted grid, a loop,
  # missed a quarter of the FLOPs with pallas_conv; on a GPU it could not lower for the CPU).
  config.model.norm_impl = "pallas_conv"
  assert benchmark.train_step_flops(config, make_model(config), 4) == flops[1]


@pytest.mark.slow
def test_command_line_writes_json(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(
      "from configs import default\n\n"
      "def get_config():\n"
      "  c = default.get_config()\n"
      "  c.data.image_size, c.model.n_embd, c.model.n_layer = 8, 64, 1\n"
      "  return c\n")
  out = tmp_path / "bench.json"
  out.write_text('{"an earlier run": 1}\n')
  subprocess.run([sys.executable, "-m", "vdm.benchmark", f"--config={config}", "--batch_size=2",
                  "--dtype=bfloat16", "--remat=convs", "--repeats=1", "--warmup=0", "--sample_steps=1",
                  f"--json_out={out}"], check=True, capture_output=True, text=True, cwd=ROOT)
  figures = json.loads(out.read_text())
  assert figures["dtype"] == "bfloat16" and figures["remat"] == "convs" and figures["batch_size"] == 2
  assert all(figures[k] > 0 for k in TIMES)
  kept = list(tmp_path.glob("bench.*.json"))  # the earlier file, renamed, not overwritten
  assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"an earlier run": 1}


@pytest.mark.parametrize("args, message", [
    (["--config.model.norm_impl=recompute", "--remat=convs"],
     "model.norm_impl='recompute' with model.remat='convs'"),
    (["--config.model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),  # config_checks
    # a file where the folder would be; the small run bounds the test's time if it is not checked
    (["--json_out=/dev/null/bench.json", "--batch_size=1", "--repeats=1", "--warmup=0",
      "--sample_steps=1"], "--json_out's directory=/dev/null is not a writable directory")])
def test_command_line_bad_input_is_one_line(args, message):
  """A setting the network or the config's checks refuse, or an output that cannot be written,
  ends the command with one line (after JAX's start-up log) and exit status 2 before any work,
  not a traceback or a benchmark of another network."""
  proc = subprocess.run([sys.executable, "-m", "vdm.benchmark", "--config=configs/quickstart.py",
                         *args], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"vdm: error: {message}"), last


def test_kernel_kinds_and_breakdown():
  """Kernel names as the H100 trace names them; 'convert' is not a convolution."""
  kinds = {"sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv_matmul",
           "cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8": "conv_matmul",
           "loop_convert_fusion_3": "fusion", "input_reduce_fusion": "fusion",
           "loop_dynamic_update_slice_fusion": "copy", "copy_transpose_3": "copy",
           "Memcpy DtoD": "copy", "rng_bit_generator": "other",
           "vdm_norm_swish_backward": "pallas_norm",
           pallas_conv.KERNEL_NAME: "conv_matmul"}  # the fused norm + convolution
  for name, kind in kinds.items():
    assert benchmark.kernel_kind(name) == kind, name
  events = [("a_gemm", 3e6), ("loop_add_fusion", 1e6), ("a_gemm", 3e6), ("copy_1", 2e6)]
  res = benchmark.kernel_breakdown(events, calls=2, top=2)
  assert res["ms_per_call"] == pytest.approx(4.5)
  assert res["kinds"] == pytest.approx({"conv_matmul": 3.0, "fusion": 0.5, "copy": 1.0})
  assert res["top"] == [{"name": "a_gemm", "kind": "conv_matmul", "ms": 3.0, "launches": 1.0},
                        {"name": "copy_1", "kind": "copy", "ms": 1.0, "launches": 0.5}]
  info = {"copy_1": {"bytes": 4_000_000, "op_name": "jit(f)/concatenate"}}
  top = benchmark.kernel_breakdown(events, calls=2, top=2, info=info)["top"]
  assert "bytes" not in top[0]  # no HLO instruction of that name: left as it is
  assert top[1]["gb_per_s"] == pytest.approx(2.0) and top[1]["op_name"] == "jit(f)/concatenate"


# Lines as a compiled module prints them (jax 0.10, XLA:GPU names): a multi-output fusion, an
# instruction named with '-', and a parameter without metadata.
HLO = """
ENTRY %main.9 (p.1: bf16[8,4]) -> (f32[8], bf16[8,4]) {
  %p.1 = bf16[8,4]{1,0} parameter(0), metadata={op_name="x"}
  %constant.2 = f32[] constant(0)
  %input_add_reduce_fusion.13 = (f32[8]{0}, bf16[8,4]{1,0}) fusion(%p.1, %constant.2), kind=kInput, calls=%fused_computation.3, metadata={op_name="jit(step)/transpose(jvp(ScoreUNet))/up_0_1/norm1/reduce_sum" stack_frame_id=7}
  ROOT %copy-start.1 = bf16[8,4]{1,0} copy(%p.1)
}
"""


def test_hlo_kernel_info_reads_bytes_and_layers():
  """Bytes a launch reads and writes, by the kernel names a trace gives, from compiled HLO text."""
  info = benchmark.hlo_kernel_info(HLO)
  fusion = info["input_add_reduce_fusion_13"]
  assert fusion["bytes"] == (8 * 4 + 8 * 4 * 2) + (8 * 4 * 2 + 4)  # writes a tuple; reads p, c
  assert fusion["op_name"].endswith("up_0_1/norm1/reduce_sum")
  assert info["copy_start_1"] == {"bytes": 2 * 8 * 4 * 2, "op_name": None}
  assert benchmark.shape_bytes("(f32[2,3]{1,0}, pred[], f8e4m3fn[10])") == 24 + 1 + 10
  # A real program's text: the loop fusion that reads bf16 x and writes sin(x) in fp32, or all
  # of it fused with the row sums (XLA's choice).
  f = jax.jit(lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32)), axis=1))
  text = f.lower(jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)).compile().as_text()
  sizes = {v["bytes"] for v in benchmark.hlo_kernel_info(text).values()}
  assert sizes & {64 * 128 * (2 + 4), 64 * 128 * 2 + 64 * 4}, sizes


def test_report_lists_the_costliest_memory_bound_kernels():
  """Convolutions and matrix products are left out; a gradient's kernel is marked 'bwd'."""
  top = [{"name": "sm90_xmma_fprop", "kind": "conv_matmul", "ms": 9.0, "launches": 2.0},
         {"name": "wrapped_concatenate_36", "kind": "copy", "ms": 3.0, "launches": 66.0,
          "bytes": 10**8, "gb_per_s": 2200.0,
          "op_name": "jit(train_step)/transpose(jvp(ScoreUNet))/ScoreUNet._blocks/up_0_3/concatenate"},
         {"name": "loop_add_fusion", "kind": "fusion", "ms": 1.0, "launches": 33.0}]
  lines = benchmark.format_top_kernels({"top": top}, n=8)
  assert len(lines) == 2 and "xmma" not in "".join(lines)
  assert lines[0].split() == ["3.00", "ms", "66x", "2200", "GB/s", "wrapped_concatenate_36", "bwd",
                              "ScoreUNet._blocks/up_0_3/concatenate"]
  assert lines[1].split() == ["1.00", "ms", "33x", "nan", "GB/s", "loop_add_fusion"]
  assert benchmark.format_top_kernels({"top": top}, n=1) == lines[:1]


def test_chosen_programs_no_flops_and_hlo(tmp_path):
  """Only the named programs are timed (and profiled); no FLOP count when not asked; each compiled
  program's optimised HLO is written; an unknown program is refused."""
  figures = benchmark.benchmark(tiny_config(), repeats=1, warmup=0, sample_steps=1,
                                programs=("sample",), count_flops=False, hlo_dir=str(tmp_path),
                                compiler_options={"xla_backend_optimization_level": 0})
  assert figures["sample_step_ms"] > 0 and "eval_step_s" not in figures
  assert figures["train_step_tflop"] is None and figures["train_images_per_s"] > 0
  for name in ("train", "sample"):
    with gzip.open(tmp_path / f"{name}.hlo.txt.gz", "rt") as f:
      assert f.read().startswith("HloModule")
  assert not (tmp_path / "eval.hlo.txt.gz").exists()
  with pytest.raises(ValueError, match="programs="):
    benchmark.benchmark(tiny_config(), programs=("train",))


@pytest.mark.ci_once  # the benchmark's config handling; test_benchmark_figures times the programs
@pytest.mark.parametrize("overrides, dtype, remat, residual", [
    # the runbook's bench specs: the config's float32 network, measured in bf16 with a bf16 stream
    ({"model.residual_dtype": "bfloat16"}, "bfloat16", None, "bfloat16"),
    # a bf16 config measured in float32 is entirely fp32 (vdm.model.with_dtype)
    ({"model.dtype": "bfloat16", "model.residual_dtype": "bfloat16"}, "float32", None, "float32"),
    # 'recompute' needs remat='none', which the argument supplies
    ({"model.norm_impl": "recompute"}, None, "none", "float32")])
def test_config_is_checked_as_measured(overrides, dtype, remat, residual):
  """The config checks see dtype and remat as the benchmark applies them: a config that the
  arguments make consistent runs, and the same config without them is refused."""
  config = tiny_config()
  config.update_from_flattened_dict(overrides)
  figures = benchmark.benchmark(config, dtype=dtype, remat=remat, repeats=1, warmup=0,
                                programs=(), count_flops=False,
                                compiler_options={"xla_backend_optimization_level": 0})
  assert figures["residual_dtype"] == residual and figures["train_images_per_s"] > 0
  # a bf16 net's bound sends the config's share of each eval batch through the fp32 net
  assert figures["eval_fp32_fraction"] == (config.model.eval_fp32_fraction
                                           if figures["dtype"] == "bfloat16" else 0.0)
  if dtype != "float32":
    with pytest.raises(ValueError, match="residual stream|norm_impl='recompute'"):
      benchmark.benchmark(config, programs=())


SWEEP_TINY = ["--config=configs/quickstart.py", "--config.model.n_layer=2",
              "--config.model.dropout=0.1", "--config.model.unroll=1", "--batch_size=2",
              "--repeats=1", "--noprofile", "--nocount_flops"]


def _sweep(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "speed_sweep.py"), *args],
                        capture_output=True, text=True, cwd=ROOT)


@pytest.mark.ci_once  # the script's own checks, many processes
def test_sweep_refuses_unknown_variants(tmp_path):
  """Unknown variants, an XLA option this jaxlib does not know and an XLA part without a value
  are refused before anything is compiled or written."""
  r = _sweep(*SWEEP_TINY, "--variants=base,unroll0+fastest", f"--output={tmp_path / 's.json'}")
  assert r.returncode != 0 and "unknown variants ['unroll0+fastest']" in r.stderr
  r = _sweep(*SWEEP_TINY, "--config.model.dtype=float32", f"--output={tmp_path / 's.json'}")
  assert r.returncode != 0 and "--config.model.dtype has no effect here" in r.stderr
  r = _sweep(*SWEEP_TINY, "--variants=base,base+xla:xla_gpu_enable_pfl=true",
             f"--output={tmp_path / 's.json'}")
  assert r.returncode != 0 and "XLA option xla_gpu_enable_pfl=True refused" in r.stderr
  assert "No such compile option" in r.stderr
  r = _sweep(*SWEEP_TINY, "--variants=base+xla:xla_gpu_enable_pdl",
             f"--output={tmp_path / 's.json'}")
  assert r.returncode != 0 and "write xla:NAME=VALUE" in r.stderr
  assert not (tmp_path / "s.json").exists()


STOPPED_AFTER_ONE_CASE = r"""
import sys
sys.path.insert(0, ".")
from experiments import speed_sweep
calls, per_case = [], 2 * len(speed_sweep.STANDALONE_NORMS)  # fwd and fwd + bwd of each way
timed = speed_sweep._time

def time_until_the_second_case(*args):  # a time limit striking in the second case
  calls.append(1)
  if len(calls) > per_case:
    raise KeyboardInterrupt
  return timed(*args)

speed_sweep._time = time_until_the_second_case
sys.argv = ["speed_sweep.py", *sys.argv[1:]]
try:
  speed_sweep.app.run(speed_sweep.main)
except KeyboardInterrupt:
  print("stopped")
"""


@pytest.mark.ci_once  # the script's own checks, a process each
@pytest.mark.parametrize("arg, message", [
    ("--repeats=0", "--repeats=0 must be >= 1"),
    ("--config.model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),  # config_checks
    ("--batch_size=0", "--batch_size=0 must be >= 1")])
def test_sweep_refuses_bad_settings_once(tmp_path, arg, message):
  """A setting every variant would fail on ends the sweep with one line and exit status 2 before
  anything compiles, not with a traceback per variant and status 0."""
  r = _sweep(*SWEEP_TINY, "--variants=base,no_dropout", arg,
             f"--output={tmp_path / 's.json'}")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith(f"vdm: error: {message}"), r.stderr[-2000:]
  assert not (tmp_path / "s.json").exists()


SUMMARY_AND_FLOPS = r"""
import jax
import jax.numpy as jnp
from experiments.speed_sweep import conv3x3_flop, summary
for temp in (None, 2.0):
  print(summary("base", {"train_images_per_s": 100.0, "train_step_s": 0.01,
                         "train_compile_s": 1.0, "train_temp_gib": temp, "net_saved_gib": 0.5}))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
print(conv3x3_flop(2, 8, 3, 5), jax.jit(conv).lower(x, w).cost_analysis()["flops"])
"""


def test_sweep_summary_and_its_dense_conv_flop_count():
  """A variant without temporaries' size reads n/a, not 0.0; the floors' and convs' FLOP count is
  the dense 2·B·H·W·9·C_in·C_out, which XLA's cost analysis (the train step's TFLOP/s) counts
  over the taps inside the image only: (22/24)² of it at 8×8."""
  r = subprocess.run([sys.executable, "-c", SUMMARY_AND_FLOPS], capture_output=True, text=True,
                     cwd=ROOT)  # its own process: absl's flags
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  want = ("base 100.0 img/s 10.0 ms/step compile 1.0 s temp {} GiB saved 0.5 GiB sample nan ms "
          "kernels nan ms ()")
  assert [line.split() for line in lines[:2]] == [want.format(t).split() for t in ("n/a", "2.0")]
  dense, xla = map(float, lines[2].split())
  assert dense == 2 * 2 * 8 * 8 * 9 * 3 * 5 and xla == pytest.approx(dense * (22 / 24) ** 2)


@pytest.mark.ci_once  # the script's own control flow
def test_sweep_saves_the_norms_of_each_case_as_it_goes(tmp_path):
  """A time limit during --norms (the lease gives it 90 s) keeps the cases timed so far, and no
  fastest_norm, so the runbook trains with autodiff: they were all saved at the end or lost."""
  out = tmp_path / "norms.json"
  r = subprocess.run([sys.executable, "-c", STOPPED_AFTER_ONE_CASE,
                      "--config=configs/quickstart.py", "--batch_size=2", "--repeats=1", "--norms",
                      "--variants=", f"--output={out}"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0 and "stopped" in r.stdout, r.stderr[-2000:]
  res = json.loads(out.read_text())
  impls = [i for i in NORM_IMPL if i != "pallas_conv"]
  assert sorted(res["norms"]) == sorted(f"norm2_{impl}" for impl in impls), res["norms"]
  assert "fastest_norm" not in res


@pytest.mark.ci_once  # the script's control flow; test_pallas_norm checks the kernels
def test_sweep_times_each_norm_alone_and_compares_them(tmp_path):
  """--norms alone (no variants): every way of computing the net's norm, both cases, timed, and
  the same function as autodiff up to bf16 rounding (the check a GPU run makes of Triton)."""
  out = tmp_path / "norms.json"
  r = _sweep("--config=configs/quickstart.py", "--batch_size=2", "--repeats=1", "--norms",
             "--variants=", f"--output={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(out.read_text())
  assert res["variants"] == {}
  cases = ("norm2", "norm2_dropout", "up_norm1")
  impls = [i for i in NORM_IMPL if i != "pallas_conv"]  # a norm inside a convolution: --convs
  assert sorted(res["norms"]) == sorted(f"{c}_{impl}" for c in cases for impl in impls)
  for name, f in res["norms"].items():
    assert f["fwd_ms"] > 0 and f["fwd_bwd_gb_per_s"] > 0, name
    compared = "dropout" not in name and "autodiff" not in name
    assert ("max_rel_diff_from_autodiff" in f) == compared, name
    assert f.get("max_rel_diff_from_autodiff", 0.0) < 0.02, (name, f)
  # The way the runbook's lease phase trains with: here, where no way failed, the least summed
  # forward + backward wall time of the ranked cases.
  ranked = lambda impl: sum(res["norms"][f"{c}_{impl}"]["fwd_bwd_ms"]  # noqa: E731
                            for c in ("norm2_dropout", "up_norm1"))
  assert res["fastest_norm"] == min(impls, key=ranked), res["norms"]


def _norm_figures(impl, wall_ms, device_ms, diff=None):
  """:func:`speed_sweep.norms`'s figures for one way, the same in each case."""
  f = {"fwd_bwd_ms": wall_ms, "fwd_bwd_device_ms": device_ms}
  return {f"{case}_{impl}": dict(f, **({} if diff is None or "dropout" in case
                                       else {"max_rel_diff_from_autodiff": diff}))
          for case in ("norm2", "norm2_dropout", "up_norm1")}


def test_fastest_norm_ranks_only_the_ways_that_ran_and_matched():
  """Pallas is fastest by device time, recompute by wall time: each change below rules a way out
  of the ranking, or the ranking out of device time."""
  norms = {**_norm_figures("autodiff", 3.0, 2.0), **_norm_figures("recompute", 1.0, 1.5, 0.004),
           **_norm_figures("pallas", 2.0, 1.0, 0.005)}
  cases = [  # (change to the figures, the way expected)
      ({}, "pallas"),
      ({"up_norm1_pallas": {"error": "Triton failed"}}, "recompute"),
      ({"norm2_pallas": {"fwd_bwd_ms": 2.0, "fwd_bwd_device_ms": 1.0,
                         "max_rel_diff_from_autodiff": 0.03}}, "recompute"),  # another function
      ({"norm2_dropout_pallas": {"fwd_bwd_ms": 2.0}}, "recompute"),  # no device time: wall ranks
      ({"norm2_autodiff": {"error": "out of memory"},  # then norms() checks none in that case
        **{f"norm2_{impl}": {"fwd_bwd_ms": 1.0} for impl in ("recompute", "pallas")}}, "autodiff"),
      (None, "autodiff"),  # the norms did not run
  ]
  inputs = [{} if change is None else {**norms, **change} for change, _ in cases]
  code = ("import json, sys; from experiments.speed_sweep import fastest_norm; "
          "print(*map(fastest_norm, json.loads(sys.argv[1])))")  # its own process: absl's flags
  r = subprocess.run([sys.executable, "-c", code, json.dumps(inputs)], capture_output=True,
                     text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == [want for _, want in cases]


@pytest.mark.ci_once  # the script's control flow; test_pallas_conv checks the kernel
def test_sweep_times_the_norm_in_the_convolutions_load_against_cudnn(tmp_path):
  """--convs: every way and tiling, both cases, timed, and the fused Pallas convolution the same
  function as XLA's norm and convolution up to bf16 rounding (the check a GPU run makes of
  Triton's code)."""
  out = tmp_path / "convs.json"
  r = _sweep("--config=configs/quickstart.py", "--config.data.image_size=16",
             "--config.model.n_embd=64", "--batch_size=2", "--repeats=1", "--convs",
             "--variants=", f"--output={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(out.read_text())
  tilings = [n[len("conv2_fused_kernel_"):] for n in res["convs"]
             if n.startswith("conv2_fused_kernel_")]
  assert len(tilings) >= 2, list(res["convs"])
  ways = ["cudnn_alone", "xla", "pallas_norm"] + [
      f"{kind}_{t}" for t in tilings for kind in ("fused", "fused_kernel")]
  assert list(res["convs"]) == [f"{c}_{w}" for c in ("conv2", "up_conv1") for w in ways]
  for name, f in res["convs"].items():
    assert f["ms"] > 0 and f["tflops"] > 0, (name, f)
    compared = not name.endswith(("cudnn_alone", "_xla"))
    assert ("max_rel_diff_from_xla" in f) == compared, name
    assert f.get("max_rel_diff_from_xla", 0.0) < 0.01, (name, f)


@pytest.mark.slow
def test_sweep_times_each_variant(tmp_path):
  out = tmp_path / "sweep.json"
  unfused = "no_dropout+xla:xla_disable_hlo_passes=fusion"
  r = _sweep(*SWEEP_TINY, "--variants=no_dropout,unroll2+remat_none,norm_recompute,norm_pallas,"
             f"norm_pallas_conv,{unfused}", f"--output={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(out.read_text())
  v = res["variants"]
  both = "unroll2+remat_none"
  assert list(v) == ["no_dropout", both, "norm_recompute", "norm_pallas", "norm_pallas_conv",
                     unfused]
  # The XLA option reached the compile: without XLA's fusion pass the step keeps more buffers.
  assert v[unfused]["xla_options"] == {"xla_disable_hlo_passes": "fusion"}
  assert v[unfused]["overrides"] == v["no_dropout"]["overrides"] and v[both]["xla_options"] == {}
  assert v[unfused]["train_temp_bytes"] > 2 * v["no_dropout"]["train_temp_bytes"]
  assert res["batch_size"] == 2
  assert all("error" not in f for f in v.values()), v
  assert v["norm_recompute"]["norm_impl"] == "recompute" and v["norm_recompute"]["remat"] == "none"
  for impl in ("pallas", "pallas_conv"):
    assert v[f"norm_{impl}"]["norm_impl"] == impl and v[f"norm_{impl}"]["sample_step_ms"] > 0
  # one process: its running peak is labelled as such, not as a variant's own
  assert all("peak_memory_gib" not in f and "process_peak_memory_gib" in f for f in v.values())
  assert v["no_dropout"]["dropout"] == 0.0 and v[both]["unroll"] == 2
  assert v[both]["overrides"] == {"model.unroll": 2, "model.remat": "none"}
  assert v[both]["remat"] == "none"
  assert all(f["train_images_per_s"] > 0 for f in v.values())
  # The first variant compiled in a fresh process; the others after it, with XLA's autotuning kept.
  assert [f["compiled_in_warm_process"] for f in v.values()] == [False] + [True] * 5
  assert "sample_step_ms" in v[both] and "sample_step_ms" not in v["no_dropout"]
