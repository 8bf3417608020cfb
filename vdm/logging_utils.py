"""Output of a run: TensorBoard event files (tensorboardX), console lines, PNG grids, JSON, and
the one-line error that ends a script on bad input.

The Writer acts only on process 0 (elsewhere it is a no-op) and the error line is written on every
process; ``write_json`` and ``save_png`` write wherever they are called, so their callers call
them on process 0 only.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator, NoReturn, Optional

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2


def is_main_process() -> bool:
  return jax.process_index() == 0


def from_every_process(values: list) -> np.ndarray:
  """``values`` (as many on each process) from every process, [processes, len(values)] int32; a
  collective where there are several processes."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values))


def image_grid(images: np.ndarray, vocab_size: int = 256, ncol: Optional[int] = None,
               pad: int = 1) -> np.ndarray:
  """Integer images [N, H, W, C] in [0, vocab) → one RGB uint8 grid [rows·(H+pad)+pad, ..., 3]:
  RGB images as they are, any other number of channels as grey, the channels side by side."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  scaled = np.clip(np.round(images.astype(np.float64) * 255.0 / max(vocab_size - 1, 1)), 0, 255)
  if c != 3:
    scaled = np.repeat(scaled.transpose(0, 1, 3, 2).reshape(n, h, c * w, 1), 3, axis=-1)
    w = c * w
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = scaled[i]
  return grid


def save_png(path: str, grid: np.ndarray, upscale: int = 1) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(np.asarray(grid, np.uint8))
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  img.save(path)


def json_safe(o):
  """``o`` with NaN and ±inf → None (JSON has neither) and NumPy and JAX scalars and arrays →
  Python, recursively."""
  if isinstance(o, dict):
    return {k: json_safe(v) for k, v in o.items()}
  if isinstance(o, (np.ndarray, jax.Array)):
    return json_safe(np.asarray(o).tolist())
  if isinstance(o, (list, tuple)):
    return [json_safe(v) for v in o]
  if isinstance(o, (np.floating, float)):
    return float(o) if math.isfinite(float(o)) else None
  if isinstance(o, (np.integer, np.bool_)):
    return o.item()
  return o


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read at import (one thread): the permission bits a new file gets


def write_json(path: str, obj, sort_keys: bool = True, keep: bool = False) -> None:
  """Write :func:`json_safe` of ``obj`` as strict JSON to ``path`` atomically (a temporary file of
  this writer's own, then a rename; a failed write removes it). With ``keep``, an existing ``path``
  is kept (:func:`keep_previous`) once the new content is on disk: a write that fails (a full disk)
  leaves it in place, and ``path`` itself never goes missing for a reader (the kept copy is a
  second link to it until the rename replaces it)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would have made it: mkstemp's file is private
    with os.fdopen(fd, "w") as f:
      json.dump(json_safe(obj), f, indent=2, sort_keys=sort_keys, allow_nan=False)
      f.write("\n")
    with _directory_locked(path):  # another writer's link and rename come before or after these
      kept = _link_aside(path) if keep else None
      os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  if kept:
    logging.warning("%s exists: kept it as %s.", path, kept)


def read_json(path: str, fix: str) -> dict:
  """The JSON object at ``path``, or a one-line ValueError that names the file and why, then
  ends with ``fix``."""
  try:
    with open(path) as f:
      obj = json.load(f)
    if not isinstance(obj, dict):
      raise ValueError(f"a JSON {type(obj).__name__}, not an object")
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path} ({type(e).__name__}: {e}){fix}") from None
  return obj


@contextlib.contextmanager
def _directory_locked(path: str) -> Iterator[None]:
  """Hold a (blocking) lock on ``path``'s directory, so that two processes keeping and replacing
  records there take turns: one's link and rename could otherwise fall between the other's and
  lose a record. Where the filesystem has no locks, go on without."""
  try:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  except OSError:  # a directory this user may write but not read
    fd = None
  try:
    if fd is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError:
        pass
    yield
  finally:
    if fd is not None:
      os.close(fd)  # which releases the lock


def _link_aside(path: str) -> Optional[str]:
  """Link an existing ``path`` as <path without .json>.<its mtime, UTC>[.n].json, the first such
  name free (a link fails on a taken name, so two keepers never overwrite each other), and return
  that name; None if ``path`` is gone (kept by another writer already). Where the filesystem has
  no hard links, ``path`` is moved there instead."""
  root, ext = os.path.splitext(path)
  try:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(os.path.getmtime(path)))
  except FileNotFoundError:
    return None
  for n in itertools.count():
    dest = f"{root}.{stamp}{f'.{n}' if n else ''}{ext}"
    try:
      os.link(path, dest)
      return dest
    except FileExistsError:
      continue
    except FileNotFoundError:
      return None
    except OSError:  # no hard links here (EPERM, ENOTSUP): the rename of old, if the name is free
      if os.path.exists(dest):
        continue
      os.replace(path, dest)
      return dest


def lock_path(path: str) -> str:
  """The lock file of ``path`` for :func:`exclusive`, in the temporary directory (one per absolute
  path): outside the folder of results it guards, which a run's outputs alone should fill."""
  digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), f"vdm-{os.path.basename(path)}-{digest}.lock")


@contextlib.contextmanager
def exclusive(lock_path: str, busy: str) -> Iterator[None]:
  """Hold an exclusive lock on the file ``lock_path`` (flock: a second open file, even in this
  process, cannot take it; the kernel drops it when its holder exits, however it exits), or raise
  ValueError(``busy``, its ``{holder}`` the process that holds the lock). Where no lock can be
  taken (a filesystem without locks, another user's file) it warns and goes on without one."""
  with contextlib.ExitStack() as stack:
    try:
      f = stack.enter_context(open(lock_path, "a+"))
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise ValueError(busy.format(holder=f.read().strip() or "unknown")) from None
    except OSError as e:  # no locks on this filesystem (ENOLCK), another user's file (EACCES)
      logging.warning("cannot lock %s (%s): a second run there would not be refused.", lock_path, e)
    else:
      f.truncate(0)
      f.write(f"{os.getpid()} on {os.uname().nodename}\n")
      f.flush()
    yield


def keep_previous(path: str) -> None:
  """Move an existing ``path`` to <path without .json>.<its mtime, UTC>[.n].json (the first such
  name free), so that a rerun (which writes ``path`` as it goes) never overwrites the results of an
  earlier one."""
  with _directory_locked(path):
    kept = _link_aside(path)
    if kept and os.path.exists(path):  # a link: the file is at both names
      os.remove(path)
  if kept:
    logging.warning("%s exists: kept it as %s.", path, kept)


def compile_settings() -> dict:
  """What changes how XLA compiles in this process, for a measurement's record: the persistent
  compilation cache, which turns compile times into cache loads, and ``XLA_FLAGS``."""
  return {"compilation_cache_dir": jax.config.jax_compilation_cache_dir or None,
          "xla_flags": os.environ.get("XLA_FLAGS") or None}


def provenance() -> dict:
  """Where and when a result is measured, for its record: the UTC date, the commit (``$VDM_COMMIT``,
  which the GPU runbook sets from the development checkout, since the device's copy of the tree
  has no current git history; else ``git describe --always --dirty`` here; None outside a
  checkout), the first device's kind, the device count and jax's version."""
  commit = os.environ.get("VDM_COMMIT")
  if not commit:
    try:
      commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, timeout=30,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      commit = None
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": commit or None, "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__}


class Writer:
  """Scalars and images to a TensorBoard event file under ``logdir`` (process 0 only), written and
  flushed in the calling thread. A failed write (a full disk) raises OSError at the call, where
  tensorboardX's SummaryWriter loses its writer thread and then blocks the run for good."""

  def __init__(self, logdir: str):
    self._events = None
    if is_main_process():
      os.makedirs(logdir, exist_ok=True)
      self._events = EventsWriter(os.path.join(logdir, "events"))

  def _write(self, step: int, summaries: list) -> None:
    for summary in summaries:
      self._events.write_event(event_pb2.Event(summary=summary, step=step, wall_time=time.time()))
    self._events.flush()

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    if self._events is not None:
      self._write(step, [tb_summary.scalar(f"{prefix}{k}", float(v)) for k, v in values.items()])

  def image(self, step: int, tag: str, grid: np.ndarray) -> None:
    if self._events is not None:
      self._write(step, [tb_summary.image(tag, np.asarray(grid, np.uint8), dataformats="HWC")])

  def close(self) -> None:
    if self._events is not None:
      events, self._events = self._events, None
      events.close()


class Throughput:
  """Steps/s, images/s and the ETA between two console lines, over training time alone: the
  caller restarts the clock after what is not training (compiling, evaluating, checkpointing)."""

  def __init__(self, start_step: int, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.restart(start_step)

  def restart(self, step: int) -> None:
    """Count from ``step``, now."""
    self._t, self._step = time.time(), step

  def update(self, step: int) -> dict:
    now = time.time()
    dt = max(now - self._t, 1e-9)
    rate = (step - self._step) / dt
    self._t, self._step = now, step
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "images_per_sec": rate * self.batch_size, "eta_sec": eta}


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return (f"{d}d" if d else "") + (f"{h:d}:{m:02d}:{s:02d}" if (h or d) else f"{m:d}:{s:02d}")


def console_line(step: int, num_steps: int, metrics: dict, rates: dict) -> str:
  return (f"step {step}/{num_steps}  bpd {metrics['bpd']:.4f} (T {metrics['prior_bpd']:.4f}, "
          f"diff {metrics['diffusion_bpd']:.4f}, rec {metrics['reconstruction_bpd']:.4f})  "
          f"σ²₀ {metrics['sigma2_0']:.2e} σ²₁ {metrics['sigma2_1']:.3f}  lr {metrics['lr']:.2e}  "
          f"|g| {metrics['grad_norm']:.3f}  {rates['steps_per_sec']:.2f} steps/s  "
          f"ETA {format_eta(rates['eta_sec'])}")


def progress(iterable: Iterable, total: int, desc: str) -> Iterator:
  """A progress bar on stderr (process 0, and only when stderr is a terminal or forced)."""
  if not is_main_process():
    yield from iterable
    return
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    logging.info("%s: %d batches", desc, total)
    yield from iterable
    return
  yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False,
                  disable=not sys.stderr.isatty() and not os.environ.get("VDM_PROGRESS"),
                  mininterval=1.0)


def first_line(e: BaseException) -> str:
  """The first line of an exception's message, stripped ('' when it has none): for one-line
  reports of errors whose messages run to many lines (orbax's, TensorStore's, XLA's)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else ""


def fail(message: str, status: int = 2) -> NoReturn:
  """End the program with one line ``vdm: error: message`` on stderr and exit ``status``."""
  print(f"vdm: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def one_line_errors(main: Callable[[list], None]) -> Callable[[list], None]:
  """``main`` with a ValueError (bad flags, config, data or checkpoint: the library's errors name
  the fix) or a usage error ending the script as one line ``vdm: error: ...`` on stderr and exit
  status 2 (absl would print the whole usage text above it)."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, app.UsageError) as e:
      fail(first_line(e) or type(e).__name__)
  return wrapped


def parse_flags(argv: list) -> list:
  """``absl.app.run``'s flags parser for every vdm entry point: a bad flag, a config file that
  does not load or an override of a key the config lacks ends in one line (:func:`fail`), not in
  the traceback or the usage text absl and ml_collections print."""
  config_file = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
  if config_file.endswith(".json"):
    fail(f"--config={config_file} is a JSON record, not a config file: read a run's config.json "
         f"with --config=configs/run.py:{config_file}.")
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
      flags.FLAGS.config.get("data")  # config_flags defers a failed load to the first use
    return rest
  except flags.Error as e:  # config_flags wraps an error of get_config(ARG) with its traceback
    head, _, trace = str(e).partition("Traceback (most recent call last):")
    fail(" ".join((head + (trace.strip().splitlines() or [""])[-1]).split()))
  except (KeyError, AttributeError) as e:
    if "has no attribute 'get_config'" in str(e):
      fail(f"--config={config_file} defines no get_config(): a config file returns its "
           "ml_collections.ConfigDict from get_config(), as configs/*.py do.")
    # An override of a key the config does not have: ml_collections raises KeyError("'key'"),
    # with "\nDid you mean ...?" after it where a key is close, inside an AttributeError.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    key, _, hint = (e.args[0] if e.args and isinstance(e.args[0], str) else str(e)).partition("\n")
    key, hint = key.strip("\"'"), f" ({hint.strip()})" if hint.strip() else ""
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in overrides if key in a.split(".")] or overrides
    fail(f"unknown config key {key!r} in {' '.join(bad) or '--config'}{hint}: check the "
         "--config.SECTION.KEY overrides against configs/default.py.")
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f"--config={config_file} could not be loaded ({lines[-1] if lines else e}): pass an "
         "existing file such as configs/quickstart.py.")
  except (ValueError, TypeError, SyntaxError, ImportError) as e:
    fail(f"bad --config: {' '.join(str(e).split())}")
  except Exception as e:  # pylint: disable=broad-except  # raised by the file's get_config()
    fail(f"--config={config_file} could not be loaded ({type(e).__name__}: "
         f"{' '.join(str(e).split())}): fix the file's get_config().")


def writable_dir(path: str, what: str) -> str:
  """``path`` made absolute, created if missing and probed with a file write, or a ValueError
  naming ``what`` (the flag): checked before a run's work, which a late failure would lose."""
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=path)  # unique among hosts too
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{what}={path} is not a writable directory ({e.strerror}): choose another "
                     "path.") from None
  return path
