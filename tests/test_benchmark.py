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
from conftest import run_script
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


# ---- exact figures from known timings (mutation testing: each check below failed on a plausible
# slip in vdm/benchmark.py or experiments/speed_sweep.py that the checks above let through)


def test_median_seconds_is_a_median_not_a_mean(monkeypatch):
  """An outlier among the timed calls moves a mean, not the median; the warm-up call is untimed."""
  clock, durations = [0.0], iter([50.0, 3.0, 1.0, 20.0])

  def block_until_ready(x):
    clock[0] += next(durations)
    return x

  monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  monkeypatch.setattr(jax, "block_until_ready", block_until_ready)
  assert benchmark.median_seconds(lambda: None, repeats=3, warmup=1) == 3.0


@pytest.mark.ci_once  # the benchmark's arithmetic; test_benchmark_figures runs its programs
def test_figures_are_exact_from_the_timed_seconds(monkeypatch):
  """With each program's median seconds, the FLOP count, the compile time and the peak memory
  known, every figure derived from them is exact: images/s of the global batch, TFLOP/s, ms per
  sampling step, the larger peak of the two reads, compile times of the compile alone; and the
  report prints those figures, non-finite ones as n/a."""
  clock = [0.0]
  monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  compile_ = jax.stages.Lowered.compile

  def compile_in_100_s(self, *args, **kwargs):
    compiled = compile_(self, *args, **kwargs)
    clock[0] += 100.0
    return compiled

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_in_100_s)
  medians, calls = iter([0.5, 0.125, 0.04]), []  # train, eval, sample

  def median_seconds(fn, repeats, warmup):
    calls.append((repeats, warmup))
    clock[0] += 1000.0  # timing is not compiling
    return next(medians)

  monkeypatch.setattr(benchmark, "median_seconds", median_seconds)
  monkeypatch.setattr(benchmark, "train_step_flops", lambda config, model, batch_size: 3e12)
  peaks = iter([7 * 2**30, 9 * 2**30])  # after the train step; at the end
  monkeypatch.setattr(benchmark, "peak_memory_bytes", lambda: next(peaks))
  traced = []  # each program's kernels: one 2 ms fusion a call

  def device_kernel_events(fn, calls):
    traced.append(calls)
    return [("loop_add_fusion", 2e6)] * calls

  monkeypatch.setattr(benchmark, "device_kernel_events", device_kernel_events)
  saved = []
  figures = benchmark.benchmark(tiny_config(), repeats=3, warmup=2, sample_steps=4, profile=True,
                                compiler_options={"xla_backend_optimization_level": 0},
                                save=lambda f: saved.append(dict(f)))
  assert saved[0]["peak_memory_bytes"] == 7 * 2**30  # kept by a run stopped after the train step
  assert calls == [(3, 2)] * 3 and traced == [3] * 3
  assert list(figures["profile"]) == ["eval", "sample", "train"]  # train last: it donates
  assert all(p["ms_per_call"] == 2.0 and p["kinds"] == {"fusion": 2.0}
             for p in figures["profile"].values())
  want = {"train_compile_s": 100.0, "train_step_s": 0.5, "train_images_per_s": 8.0,
          "train_step_tflop": 3.0, "train_tflops_per_s": 6.0,
          "eval_compile_s": 100.0, "eval_step_s": 0.125, "eval_images_per_s": 32.0,
          "sample_compile_s": 100.0, "sample_steps": 4, "sample_step_ms": 10.0,
          "peak_memory_bytes": 9 * 2**30, "peak_memory_gib": 9.0, "repeats": 3, "warmup": 2,
          "batch_size": 4, "num_devices": 1}
  assert {k: figures[k] for k in want} == want
  lines = benchmark.format_report(figures).splitlines()
  assert lines[2:5] == [
      "train:  8.0 images/s  (0.5000 s/step, compile 100.0 s, 6.00 TFLOP/s of 3.000 TFLOP/step)",
      "eval:   32.0 images/s  (0.1250 s/step, compile 100.0 s, eval_fp32_fraction 0.00)",
      "sample: 10.00 ms per ancestral step at batch 4"]
  assert lines[5].startswith("peak device memory: 9.00 GiB; train step temporaries ")
  assert lines[6] == "(median of 3 after 2 warm-up)"
  lines = benchmark.format_report(dict(figures, train_tflops_per_s=math.inf)).splitlines()
  assert "compile 100.0 s, n/a TFLOP/s of 3.000 TFLOP/step)" in lines[2]


BENCH_ON_TWO_DEVICES = r"""
import json
from configs import default
from vdm import benchmark
from vdm.model import make_model

config = default.get_config()
config.data.image_size, config.model.n_embd, config.model.n_layer = 8, 64, 1
benchmark.median_seconds = lambda fn, repeats, warmup: 0.5
try:
  benchmark.benchmark(config, batch_size=3, programs=(), count_flops=False)
except ValueError as e:
  refused = str(e)
f = benchmark.benchmark(config, batch_size=4, repeats=1, warmup=0, programs=(),
                        count_flops=False, compiler_options={"xla_backend_optimization_level": 0})
per_device = benchmark.saved_for_backward_bytes(make_model(config).net, (8, 8, 3), 2) / 2**30
print(json.dumps({"refused": refused, "per_device_saved_gib": per_device,
                  **{k: f[k] for k in ("num_devices", "batch_size", "train_images_per_s",
                                       "net_saved_gib")}}))
"""


@pytest.mark.ci_once  # the benchmark's arithmetic, a two-device process
def test_images_per_s_count_the_global_batch_on_two_devices(on_two_cpu_devices):
  """Split over two devices, images/s count the whole batch of 4, the traced backward-pass
  memory is one device's share (2 images), and a batch the devices cannot share is refused."""
  out = on_two_cpu_devices(BENCH_ON_TWO_DEVICES)
  assert out["refused"].startswith("batch_size=3 must be a multiple of the 2 devices")
  assert out["num_devices"] == 2 and out["batch_size"] == 4
  assert out["train_images_per_s"] == 8.0
  assert out["net_saved_gib"] == out["per_device_saved_gib"]


def test_flop_count_is_of_the_whole_batch():
  """The train step's FLOPs grow with the batch, nearly in proportion (the optimiser's update of
  the parameters is the only per-step part): a count for one image would stay flat."""
  config = tiny_config()
  model = make_model(config)
  f4, f8 = (benchmark.train_step_flops(config, model, b) for b in (4, 8))
  assert 1.8 * f4 < f8 < 2 * f4


def test_bad_arguments_are_refused_before_any_work():
  for kwargs, message in (({"warmup": -1}, "warmup=-1 >= 0"),
                          ({"sample_steps": 0}, "sample_steps=0 >= 1"),
                          ({"repeats": 0}, "^repeats=0 must be >= 1")):
    with pytest.raises(ValueError, match=message):
      benchmark.benchmark(tiny_config(), **kwargs)


def test_temp_bytes_reads_the_temporaries():
  """The compiled program's temporary buffers, not its arguments or outputs; None without an
  analysis."""
  analysis = types.SimpleNamespace(temp_size_in_bytes=123, argument_size_in_bytes=45,
                                   output_size_in_bytes=6, alias_size_in_bytes=0)
  assert benchmark.temp_bytes(types.SimpleNamespace(memory_analysis=lambda: analysis)) == 123

  def no_analysis():
    raise NotImplementedError

  assert benchmark.temp_bytes(types.SimpleNamespace(memory_analysis=no_analysis)) is None


def test_kernel_gb_per_s_counts_every_launch():
  """GB/s of a kernel launched twice per call: both launches' bytes over their summed time."""
  events = [("a_gemm", 3e6), ("a_gemm", 1e6)]
  info = {"a_gemm": {"bytes": 4_000_000, "op_name": "conv"}}
  [top] = benchmark.kernel_breakdown(events, calls=2, info=info)["top"]
  assert top["gb_per_s"] == pytest.approx(2.0) and top["launches"] == 1.0 and top["ms"] == 2.0


SWEEP_CONTROL = r"""
import json, sys, types
import jax
from experiments import speed_sweep as sw
from vdm import benchmark, logging_utils

out = {"xla": [[n, v, type(v).__name__] for n, v in map(sw.xla_part, (
    "xla:a=TRUE", "xla:b=false", "xla:c=3", "xla:d=2.5", "xla:e=fusion"))]}
v = sw.combine("unroll2+rbg+xla:x=1+base+xla:x=2+remat_none")
out["combine"] = [v.overrides, v.prng_impl, list(v.programs), v.xla]

calls = []
def fake_benchmark(config, **kwargs):  # what each variant asks of vdm.benchmark, and in which PRNG
  calls.append(dict(kwargs, dtype=config.model.dtype, prng=jax.config.jax_default_prng_impl))
  if config.model.unroll == 0:
    raise RuntimeError("boom")
  return {"peak_memory_gib": 1.5, "peak_memory_bytes": 3 * 2**29, "train_images_per_s": 1.0,
          "train_step_s": 1.0, "train_compile_s": 1.0, "train_temp_gib": None, "net_saved_gib": 0.1}

benchmark.benchmark = fake_benchmark
out["default_prng"] = jax.config.jax_default_prng_impl
sys.argv = ["speed_sweep.py", *sys.argv[1:]]
try:
  sw.app.run(sw.main, flags_parser=logging_utils.parse_flags)
except SystemExit as e:
  out["exit"] = e.code
out["calls"] = calls
out["prng_after"] = jax.config.jax_default_prng_impl

# --repeats calls timed after two untimed warm-up calls, each waited for; the median
clock, durations = [0.0], iter([100.0, 200.0, 5.0, 1.0, 3.0])
def block_until_ready(x):
  clock[0] += next(durations)
  return x
benchmark.time = types.SimpleNamespace(perf_counter=lambda: clock[0])
jax.block_until_ready = block_until_ready
out["time"] = sw._time(lambda a: a, 1)
# device ms per call of a profile of --repeats calls, only with --profile
benchmark.device_kernel_events = lambda fn, calls: [("loop_add_fusion", 1.5e6)] * calls
out["device_ms"] = [sw._device_ms(lambda: None)]
sw.FLAGS.profile = True
out["device_ms"].append(sw._device_ms(lambda: None))
print(json.dumps(out))
"""


@pytest.mark.ci_once  # the script's own control flow
def test_sweep_passes_each_variant_its_settings_and_keeps_going(tmp_path):
  """The sweep's own logic with vdm.benchmark replaced: XLA values typed, combined variants
  merged (a later part wins, programs in order once), each variant benchmarked with its config,
  PRNG (restored after), programs and XLA options, the FLOP count and HLO of the first variant
  only; a failing variant recorded and the next run; the process's peak labelled as such; and
  --repeats timed after two untimed warm-up calls."""
  out = tmp_path / "sweep.json"
  unfused = "remat_none+xla:xla_disable_hlo_passes=fusion"
  res = run_script(
      SWEEP_CONTROL, "--config=configs/quickstart.py", "--batch_size=6",
      "--config.model.unroll=1", "--config.model.dropout=0.1", "--repeats=3", "--noprofile",
      f"--variants=rbg+no_dropout,unroll0,unroll2+base,float32,{unfused}",
      f"--hlo_dir={tmp_path / 'hlo'}", f"--output={out}")
  assert res["xla"] == [["a", True, "bool"], ["b", False, "bool"], ["c", 3, "int"],
                        ["d", 2.5, "float"], ["e", "fusion", "str"]]
  assert res["combine"] == [{"model.unroll": 2, "model.remat": "none"}, "rbg", ["sample", "eval"],
                            {"x": 2}]
  assert not res["exit"] and res["time"] == 3.0 and res["device_ms"] == [None, 1.5]
  default_prng = res["default_prng"]
  assert res["prng_after"] == default_prng != "rbg"
  common = {"batch_size": 6, "repeats": 3, "profile": False}
  assert res["calls"] == [
      dict(common, programs=[], compiler_options=None, count_flops=True,
           hlo_dir=str(tmp_path / "hlo"), dtype="bfloat16", prng="rbg"),
      dict(common, programs=["sample"], compiler_options=None, count_flops=False, hlo_dir=None,
           dtype="bfloat16", prng=default_prng),
      dict(common, programs=["sample", "eval"], compiler_options=None, count_flops=False,
           hlo_dir=None, dtype="bfloat16", prng=default_prng),
      dict(common, programs=["sample"], compiler_options=None, count_flops=False, hlo_dir=None,
           dtype="float32", prng=default_prng),
      dict(common, programs=[], compiler_options={"xla_disable_hlo_passes": "fusion"},
           count_flops=False, hlo_dir=None, dtype="bfloat16", prng=default_prng)]
  v = json.loads(out.read_text())["variants"]
  assert list(v) == ["rbg+no_dropout", "unroll0", "unroll2+base", "float32", unfused]
  assert v["unroll0"]["error"] == "RuntimeError: boom" and v["unroll0"]["wall_s"] > 0
  done = [f for f in v.values() if "error" not in f]
  assert [f["compiled_in_warm_process"] for f in done] == [False, True, True, True]
  assert all(f["process_peak_memory_gib"] == 1.5 and "peak_memory_gib" not in f
             and "peak_memory_bytes" not in f for f in done)
  assert v["rbg+no_dropout"]["prng_impl"] == "rbg" and v["rbg+no_dropout"]["dropout"] == 0.0
  assert v["unroll2+base"]["prng_impl"] == default_prng and v["unroll2+base"]["unroll"] == 2
  assert v["unroll2+base"]["overrides"] == {"model.unroll": 2}
  assert v[unfused]["xla_options"] == {"xla_disable_hlo_passes": "fusion"}


SWEEP_ARITHMETIC = r"""
import json, types
import jax, numpy as np
from experiments import speed_sweep as sw

sw.FLAGS(["speed_sweep.py", "--config=configs/quickstart.py", "--output=unused"])
out = {}
# floors: the forward convolution 2 s, with both gradients 4 s, the copy 1 s
def floor_time(fn, *args):
  if len(args) == 1:
    return 1.0
  return 4.0 if isinstance(fn(*args), tuple) else 2.0
sw._time = floor_time
rng = np.random.default_rng(0)
lazy = types.SimpleNamespace(  # the 1 GiB copy's input unwritten (calloc), never computed on
    random=types.SimpleNamespace(default_rng=lambda seed: types.SimpleNamespace(
        standard_normal=lambda shape: (np.zeros(shape, np.float32) if shape == (2**28,)
                                       else rng.standard_normal(shape)))))
real_jnp = sw.jnp
sw.np, sw.jnp = lazy, types.SimpleNamespace(
    bfloat16=real_jnp.bfloat16, float32=real_jnp.float32,
    asarray=lambda a, dtype: a if a.size == 2**28 else real_jnp.asarray(a, dtype))
out["floors"] = sw.floors(1, 8, size=4)
sw.np, sw.jnp = np, real_jnp

# norms and convs: wall 1 ms forward, 4 ms with the backward; device 0.5 ms, 2 ms
sw.STANDALONE_NORMS = ("autodiff", "recompute")
sw.CONV_TILINGS = {}
sw._time = lambda fn, *args: 4e-3 if len(args) == 4 else 1e-3
sw._device_ms = lambda fn, *args: 2.0 if len(args) == 4 else 0.5
out["norms"] = sw.norms(1, 32, size=4)
sw._time = lambda fn, *args: 2e-3
out["convs"] = sw.convs(1, 32, size=4)
print(json.dumps(out))
"""


@pytest.mark.ci_once  # the script's own arithmetic
def test_sweep_floors_norms_and_convs_from_known_times():
  """TFLOP/s and GB/s of the floors, the norms and the convolutions are exact from given times:
  the forward convolution's FLOPs once, with both gradients three times; the copy reads and
  writes its GiB; a norm moves 4 bytes per element forward, 10 with the backward."""
  out = run_script(SWEEP_ARITHMETIC)
  flop = 2 * 16 * 9 * 8 * 8  # batch 1, 4×4, 8 -> 8 channels
  assert out["floors"] == pytest.approx({"conv_fwd_tflops": flop / 2 / 1e12,
                                         "conv_fwd_bwd_tflops": 3 * flop / 4 / 1e12,
                                         "copy_gb_per_s": 2 * 2**30 / 1e9})
  for case, elements in (("norm2", 16 * 32), ("norm2_dropout", 16 * 32), ("up_norm1", 2 * 16 * 32)):
    for impl in ("autodiff", "recompute"):
      f = out["norms"][f"{case}_{impl}"]
      assert {k: v for k, v in f.items() if k != "max_rel_diff_from_autodiff"} == pytest.approx(
          {"fwd_ms": 1.0, "fwd_bwd_ms": 4.0, "fwd_gb_per_s": 4 * elements / 1e-3 / 1e9,
           "fwd_bwd_gb_per_s": 10 * elements / 4e-3 / 1e9, "fwd_device_ms": 0.5,
           "fwd_device_gb_per_s": 4 * elements / 0.5e-3 / 1e9, "fwd_bwd_device_ms": 2.0,
           "fwd_bwd_device_gb_per_s": 10 * elements / 2e-3 / 1e9}), (case, impl)
  assert sorted(out["convs"]) == sorted(f"{c}_{w}" for c in ("conv2", "up_conv1")
                                        for w in ("cudnn_alone", "xla", "pallas_norm"))
  for name, f in out["convs"].items():
    flop = 2 * 16 * 9 * 32 * 32 * (2 if name.startswith("up_conv1") else 1)
    assert f["ms"] == pytest.approx(2.0) and f["tflops"] == pytest.approx(flop / 2e-3 / 1e12)
    assert f["device_ms"] == 0.5 and f["device_tflops"] == pytest.approx(flop / 0.5e-3 / 1e12)


def test_saved_bytes_are_of_a_training_call_with_dropout():
  """The net is traced as in training, dropout on: its masks are kept for the backward pass."""
  net = make_model(tiny_config()).net.clone(remat="none")
  assert net.dropout > 0
  with_masks = benchmark.saved_for_backward_bytes(net, (8, 8, 3), 4)
  assert with_masks > benchmark.saved_for_backward_bytes(net.clone(dropout=0.0), (8, 8, 3), 4)
