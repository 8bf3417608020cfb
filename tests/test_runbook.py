"""experiments/gpu_runbook.sh, every measuring phase, on the CPU with the quickstart net
(8x8 images, 64 channels: the smallest that one of the sweep's convolution tilings fits).

A device call is rare (a lease is 15 minutes at present, a call at most 10): a phase that breaks
on the GPU costs most of a lease. This runs each phase the way a device call does (`sweep`,
`curve`, `model`, `bench` on the fused convolution, then `lease` with importance-sampled t and
`compare` on its run, all into one $OUT) and checks that every command exits 0, writes what the
runbook's readers look for, and leaves no more files than a call brings back. The interpreted
Pallas kernels make it slow."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("sweep", "curve", "model", "bench", "lease", "compare")
LOGS = ("sweep", "curve_bf16", "main_train", "likelihood", "schedule_variance", "bench", "norms",
        "compare")
# The overrides that the next lease's calls add (importance-sampled t), with a warm-up short enough
# for the CPU run's few steps.
LEASE_ARGS = " --config.loss.time_sampling=importance --config.loss.importance_warmup_steps=3"


@pytest.mark.slow
def test_runbook_phases_on_cpu(tmp_path):
  out = tmp_path / "out"
  env = dict(
      os.environ, PYTHON=sys.executable, OUT=str(out), VDM_TMP=str(tmp_path),
      VDM_CONFIG="configs/quickstart.py", VDM_DATA_ARGS="",  # synthetic images, no download
      VDM_ARGS="--config.data.synthetic_num_test=226 --config.model.n_embd=64",
      # Limits well above the phases' CPU times: on slow or busy hosts the model phase's
      # likelihood command (3/8 of the limit) ran out of 300 s, then of 450 s, in its ODE solves
      # (compiling them included; 231 s on a quiet host with them cached).
      VDM_SECONDS="8", VDM_STEPS="10", VDM_LIMIT="1800", VDM_BATCH="8",
      VDM_SPECS="8 bfloat16 none bfloat16 0 pallas_conv")
  files = lambda: {p for p in out.rglob("*") if p.is_file()}  # noqa: E731
  for phase in PHASES:
    before = files()
    lease = phase in ("lease", "compare")
    r = subprocess.run(["bash", "experiments/gpu_runbook.sh", phase], cwd=ROOT, timeout=2400,
                       env=dict(env, VDM_ARGS=env["VDM_ARGS"] + LEASE_ARGS) if lease else env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{phase}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    # A device call brings back at most 8 files from $OUT, no deeper than $OUT/a/b/file.
    written = files() - before | {out / "machine.txt"}
    assert len(written) <= 8, (phase, sorted(map(str, written)))
    assert all(len(p.relative_to(out).parts) <= 3 for p in written), written

  for log in LOGS:
    text = (out / f"{log}.log").read_text()
    exits = re.findall(r"^== exit (\d+)$", text, re.M)
    assert exits and set(exits) == {"0"}, f"{log}.log: exits {exits}\n{text[-3000:]}"

  sweep = json.loads((out / "sweep.json").read_text())
  assert sweep["batch_size"] == 8 and len(sweep["variants"]) == 4, sweep["variants"].keys()
  for name, figures in sweep["variants"].items():
    assert "error" not in figures and figures["train_images_per_s"] > 0, (name, figures)
  assert "unroll0+remat_none+residual_bf16+norm_pallas_conv" in sweep["variants"], sweep["variants"]
  for name, figures in {**sweep["norms"], **sweep["convs"]}.items():
    # Only tiles of 128 rows may fail: more than an 8x8 image's 64, so the kernel refuses them.
    assert "error" not in figures or ("_r128_" in name and "rows=128 must be" in figures["error"]), (
        name, figures)
  diffs = {n: f["max_rel_diff_from_xla"] for n, f in sweep["convs"].items()
           if "max_rel_diff_from_xla" in f}
  assert {"conv2_fused_kernel_r64_b64_w8_s3", "up_conv1_fused_kernel_r64_b64_w8_s3"} <= set(diffs)
  assert max(diffs.values()) < 0.01, diffs
  assert sweep["floors"] and list((out / "hlo").iterdir())

  # The lease's curve (the curve phase's is kept beside it) trained with the norm its first
  # command found fastest, compiled cold, and compared with fp32.
  norm = json.loads((out / "norms.json").read_text())["fastest_norm"]
  curve = json.loads((out / "curve_bf16.json").read_text())
  assert curve["points"] and curve["images_per_second"] > 0 and curve["dtype_comparison"], curve
  assert curve["config"]["model"]["norm_impl"] == norm and norm != "pallas_conv", norm
  assert curve["config"]["loss"]["time_sampling"] == "importance", curve["config"]["loss"]
  assert curve["compilation_cache_dir"] is None, curve
  assert len(list(out.glob("curve_bf16.*.json"))) == 1
  # compare: the same figure again from the run the lease left, with the norm it trained with.
  compare = json.loads((out / "compare.json").read_text())
  assert compare["dtype_comparison"]["num_images"] == curve["dtype_comparison"]["num_images"]
  assert f"--config.model.norm_impl={norm} " in (out / "compare.log").read_text()
  # The model phase evaluates the curve phase's run, and its setup kept the earlier phases' lines.
  machine = (out / "machine.txt").read_text()
  assert f"likelihood model: {tmp_path}/vdm_curve_run" in machine, machine
  assert f"norm_impl for the curve: {norm}\n" in machine, machine
  assert machine.count("jax ") == len(PHASES) and machine.count(" flax==") == len(PHASES), machine
  for name in ("main_train_eval", "likelihood", "schedule_variance"):
    assert json.loads((out / f"{name}.json").read_text()), name
  bench = json.loads((out / "bench_bfloat16_8_none_bfloat16_unroll0_pallas_conv.json").read_text())
  assert bench["train_images_per_s"] > 0 and bench["sample_step_ms"] > 0, bench
  # Compiled cold, although the suite sets a compilation cache (conftest.py).
  assert bench["compilation_cache_dir"] is None, bench

  # A sweep call that times only variants, one of them with an XLA option: no floors, norms or
  # convolutions first (a rerun keeps the first sweep.json beside it).
  variants = "unroll0+remat_none,unroll0+remat_none+xla:xla_gpu_enable_pdl=true"
  r = subprocess.run(["bash", "experiments/gpu_runbook.sh", "sweep"], cwd=ROOT, timeout=900,
                     env=dict(env, VDM_SWEEP_ARGS="", VDM_VARIANTS=variants),
                     capture_output=True, text=True)
  assert r.returncode == 0 and "== exit 0" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
  again = json.loads((out / "sweep.json").read_text())
  assert not {"floors", "norms", "convs"} & set(again), list(again)
  options = [f["xla_options"] for f in again["variants"].values()]
  assert options == [{}, {"xla_gpu_enable_pdl": True}], options


def test_extra_args_on_several_lines_all_reach_the_command(tmp_path):
  """VDM_ARGS pasted across lines (as RESULTS.md wraps the lease's) keeps every flag: the lines
  after the first were dropped in silence. PYTHON=echo prints the commands instead of running."""
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON="echo", OUT=str(out), VDM_TMP=str(tmp_path),
             VDM_ARGS=("--config.loss.time_sampling=importance\n"
                       "    --config.loss.importance_warmup_steps=200"),
             VDM_DATA_ARGS="--config.data.source=npz\n  --config.data.path=d.npz")
  subprocess.run(["bash", "experiments/gpu_runbook.sh", "curve"], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  command = (out / "curve_bf16.log").read_text().splitlines()[0]
  assert ("--config.data.source=npz --config.data.path=d.npz "
          "--config.loss.time_sampling=importance --config.loss.importance_warmup_steps=200 "
          "--config.model.dtype=bfloat16") in command


def _stand_in_python(tmp_path, script: str, **env: str) -> dict:
  """The environment for a runbook phase whose PYTHON is the bash ``script`` (written to
  tmp_path/python; REAL_PYTHON is this interpreter), with a lease's 590 s and ``env``."""
  fake = tmp_path / "python"
  fake.write_text(script)
  fake.chmod(0o755)
  return dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, VDM_LIMIT="590", **env)


# A stand-in for python: json_field's `-c` runs in the real one; the norms pick pallas; a curve
# with pallas fails before its first point where $PALLAS_FAILS is set, as a Triton kernel that
# fails to compile in fp32 at the first evaluation would; any other curve saves a point.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[ "$1" = -c ] && exec "$REAL_PYTHON" "$@"
output=$(printf '%s\n' "$@" | sed -n 's/^--output=//p')
case "$*" in
  *--norms*) echo '{"fastest_norm": "pallas"}' > "$output" ;;
  *norm_impl=pallas*) [ -n "$PALLAS_FAILS" ] && { echo "XlaRuntimeError: Triton failed"; exit 1; }
    echo '{"points": [{"mark_seconds": 8}]}' > "$output" ;;
  *train_curve.py*) echo '{"points": [{"mark_seconds": 8}]}' > "$output" ;;
esac
"""


@pytest.mark.parametrize("fails", [True, False])
def test_lease_trains_the_curve_with_autodiff_where_the_chosen_norm_fails(tmp_path, fails):
  """A curve that fails with the norm the lease chose trains again with autodiff's norm (before,
  the lease's one full call ended there, with no curve); one that saved its points does not."""
  out = tmp_path / "out"
  env = _stand_in_python(tmp_path, FAKE_PYTHON, OUT=str(out), VDM_TMP=str(tmp_path),
                         PALLAS_FAILS="1" if fails else "")
  subprocess.run(["bash", "experiments/gpu_runbook.sh", "lease"], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  commands = [l for l in (out / "curve_bf16.log").read_text().splitlines() if l.startswith("== ")]
  assert "--config.model.norm_impl=pallas " in commands[0], commands[0]
  assert json.loads((out / "curve_bf16.json").read_text())["points"]
  retried = "no curve point with norm_impl=pallas" in (out / "machine.txt").read_text()
  if not fails:
    assert commands[1:] == ["== exit 0"] and not retried, commands
    return
  assert len(commands) == 4 and commands[1::2] == ["== exit 1", "== exit 0"], commands
  assert "--config.model.norm_impl=autodiff " in commands[2] and retried, commands[2]


ECHO_PYTHON = r"""#!/usr/bin/env bash
[ "$1" = -c ] && exec "$REAL_PYTHON" "$@"
exit 0
"""


def _commands(out, log):
  """The commands a phase ran into $OUT/LOG.log, without the interpreter's path."""
  return [l.split(" ", 2)[2] for l in (out / f"{log}.log").read_text().splitlines()
          if l.startswith("== ") and not l.startswith("== exit")]


@pytest.mark.ci_once  # the runbook's own commands
def test_phases_pass_their_settings_to_each_command(tmp_path):
  """curve, model (on its own run, then on the curve's), compare and bench with a python that
  runs nothing: each command gets the settings of the runbook's measurements (issues 3 to 5),
  the curve and model phases start from an empty run, and compare needs the curve's run."""
  out, tmp = tmp_path / "out", tmp_path / "tmp"
  env = _stand_in_python(tmp_path, ECHO_PYTHON, OUT=str(out), VDM_TMP=str(tmp))
  for name in ("VDM_ARGS", "VDM_DATA_ARGS", "VDM_CONFIG", "VDM_SECONDS", "VDM_STEPS", "VDM_SPECS"):
    env.pop(name, None)
  phase = lambda name: subprocess.run(["bash", "experiments/gpu_runbook.sh", name], cwd=ROOT,  # noqa: E731
                                      env=env, capture_output=True, text=True)
  data = "--config=configs/cifar10.py --config.data.source=npz --config.data.path=.data/cifar10_subset.npz"
  for stale in ("vdm_curve_run", "vdm_main_run"):
    os.makedirs(tmp / stale / "checkpoints" / "5")
  assert phase("curve").returncode == 0
  assert _commands(out, "curve_bf16") == [
      f"experiments/train_curve.py {data} --config.model.dtype=bfloat16 --seconds=330 "
      f"--compare_dtype=float32 --compare_batch_size=113 --output={out}/curve_bf16.json "
      f"--workdir={tmp}/vdm_curve_run"]
  assert not (tmp / "vdm_curve_run").exists()  # train_curve.py refuses a run with checkpoints

  assert phase("model").returncode == 0
  assert not (tmp / "vdm_main_run").exists()  # vdm.main would resume it
  main_run = (f"-m vdm.main {data} --workdir={tmp}/vdm_main_run --config.training.num_steps=400 "
              "--config.optimizer.ema_rate=0.99 --config.training.eval_every=400 "
              "--config.training.sample_every=400 --config.training.checkpoint_every=200 "
              "--config.sampling.num_steps=100")
  os.makedirs(tmp / "vdm_curve_run")
  (tmp / "vdm_curve_run" / "config.json").write_text('{"model": {"norm_impl": "pallas"}}')
  assert phase("model").returncode == 0
  assert _commands(out, "main_train") == [main_run] * 2
  for log, args in (("likelihood", "--num_images=0 --batch_size=113 --variance_repeats=50 "
                     "--ode_num_images=16 --ode_batch_size=16 --dequantization=uniform "
                     f"--output={out}/likelihood.json"),
                    ("schedule_variance", f"--fit_steps=300 --draws=128 --output={out}/schedule_variance.json")):
    script = f"experiments/{log}.py {data}"
    assert _commands(out, log) == [f"{script} --workdir={tmp}/vdm_main_run --ema {args}",
                                   f"{script} --workdir={tmp}/vdm_curve_run --noema {args}"], log

  assert phase("compare").returncode == 0
  assert _commands(out, "compare") == [
      f"experiments/likelihood.py {data} --config.model.dtype=bfloat16 "
      f"--config.model.norm_impl=pallas --workdir={tmp}/vdm_curve_run --noema --num_images=0 "
      "--batch_size=113 --timesteps= --compare_dtype=float32 --noimportance --ode_num_images=0 "
      f"--output={out}/compare.json"]
  os.remove(tmp / "vdm_curve_run" / "config.json")
  r = phase("compare")
  assert r.returncode == 2 and "run the lease phase first" in r.stderr, r.stderr

  assert phase("bench").returncode == 0
  bench = "-m vdm.benchmark --config=configs/cifar10.py --config.model.residual_dtype={} " \
          "--config.model.unroll={} --batch_size={} --dtype={} --remat={} --repeats=10 --profile " \
          f"--json_out={out}/bench_{{}}.json"
  assert _commands(out, "bench") == [
      bench.format("bfloat16", 0, 128, "bfloat16", "none", "bfloat16_128_none_bfloat16_unroll0"),
      bench.format("bfloat16", 0, 512, "bfloat16", "none", "bfloat16_512_none_bfloat16_unroll0"),
      bench.format("float32", 4, 512, "bfloat16", "convs", "bfloat16_512_convs_float32_unroll4"),
      bench.format("float32", 4, 128, "float32", "convs", "float32_128_convs_float32_unroll4")]
