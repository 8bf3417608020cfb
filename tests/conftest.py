"""Suite-wide settings, applied before any test module imports jax.

The tests compile many small programs and run each briefly, so XLA's CPU backend skips its
slow optimisation passes (2-3x faster here). Many tests compile the same programs, in-process
and in the `vdm.main` runs they start, so the run keeps one persistent compilation cache, where
a second compile of a program is a load. The xdist workers and the subprocesses that tests start
inherit both through the environment. Two processes compiling one program at once can race on its
entry: one that reads it half-written gets jax's "Error reading persistent compilation cache
entry" warning and compiles the program itself, which costs time, not correctness. jax's locked
cache (any `jax_compilation_cache_max_size`) would rule that out, but it rescans every entry on
each write: 0.3 to 0.4 s a write at the suite's 3,564 entries (experiments/RESULTS.md).
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
_OWN_CACHE = None  # the cache this process made (none in xdist workers, or under a caller's cache)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="vdm-tests-xla-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _as_if_on_an_h100():
  """jax 0.11.2 and later ask which GPU they lower Pallas kernels for; with none here, an
  abstract mesh names the H100 (0.10.2 assumes sm_90 when no GPU is present)."""
  import jax
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                     platform="gpu")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("data",), abstract_device=h100))


@pytest.fixture
def cuda_triton_calls():
  """count(fn, *specs): traces jit(fn) at the given shapes, lowers it for CUDA and counts its
  Triton kernel calls (by either name jaxlib has given them); skips where a jaxlib compiles
  Triton while lowering and has no CUDA plugin to do it with. The arguments sit on this machine's
  device: the kernels' data-parallel partitioning rule needs devices to lower, which an abstract
  mesh alone does not give."""
  import jax

  def count(fn, *specs) -> int:
    here = jax.sharding.make_single_device_sharding(jax.devices()[0])
    try:
      with _as_if_on_an_h100():
        traced = jax.jit(fn, in_shardings=here).trace(*specs)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
      if "Triton compilation handler" in str(e):
        pytest.skip(f"this jaxlib lowers Pallas kernels only with CUDA present: {e}")
      raise
    return text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call")
  return count


def subprocess_env(devices: int = 1, **extra: str) -> dict:
  """The tests' environment for a subprocess, with ``devices`` CPU devices (added to the suite's
  XLA_FLAGS, whose fast compiles would otherwise be lost) and no progress bars."""
  env = dict(os.environ, **extra)
  if devices > 1:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  env.pop("VDM_PROGRESS", None)
  return env


def compiled(fn) -> list[str]:
  """The names of the functions jax compiles (or loads from the cache) while ``fn()`` runs, one
  per program, from jax's log_compiles records."""
  import logging
  import re
  import jax
  names = []

  class Names(logging.Handler):
    def emit(self, record):
      m = re.match(r"Compiling (?:jit\()?(\w+)", record.getMessage())
      if m:
        names.append(m.group(1))

  handler, logger = Names(), logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      fn()
  finally:
    logger.removeHandler(handler)
  return names


def run_script(script: str, *args: str, devices: int = 1) -> dict:
  """Runs a Python script (``python -c script *args``) in the repo root, on ``devices`` CPU
  devices, checks that it exits 0 and returns the JSON its last line prints."""
  r = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, env=subprocess_env(devices))
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def on_two_cpu_devices():
  """run(script): :func:`run_script` with two CPU devices."""
  return lambda script: run_script(script, devices=2)


def pytest_sessionfinish():
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
