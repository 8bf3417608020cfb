"""Input pipeline: uint8 NHWC image batches from tfds, an .npz file or procedurally made images.

The batch for training step k is a pure function of (seed, k): example positions k·B .. k·B + B − 1
of an endless stream that visits the training split in a fresh permutation each epoch
(permutation e = a function of (seed, e)), with horizontal flips drawn from (seed, k). A run
restarted from a checkpoint at step k therefore sees exactly the batches it would have seen.

Each process reads only its own contiguous slice of the global batch; batches are staged on the
devices by a background thread (``prefetch``), sharded over the mesh's 'data' axis.

Sources (``config.data.source``):
  tfds       ``tfds.data_source(name, split)`` (random access to array_record files; no
             TensorFlow needed). The data set must already be prepared in ``data_dir``.
  npz        a file with ``train_images`` and ``test_images``, uint8 [N, H, W, C].
  synthetic  deterministic images (gradients, rectangles and discs) made from the seed: no files.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import zipfile
import zlib
from typing import Callable, Generator, Iterator, Optional

import jax
import numpy as np

from vdm import logging_utils

SOURCES = ("tfds", "npz", "synthetic")
_SYNTHETIC_SPLIT_SEED = {"train": 0, "test": 1, "validation": 2}  # any other name: its CRC-32


class Split:
  """Random access to the images of one split: ``split.get(indices) -> uint8 [k, H, W, C]``."""

  def __init__(self, name: str, num_examples: int, get: Callable[[np.ndarray], np.ndarray]):
    self.name = name
    self.num_examples = num_examples
    self._get = get

  def __len__(self) -> int:
    return self.num_examples

  def get(self, indices: np.ndarray) -> np.ndarray:
    return self._get(np.asarray(indices, np.int64))

  def fingerprint(self, num_images: int = 256) -> str:
    """The split's size, image shape and a SHA-256 of up to ``num_images`` of its images, evenly
    spaced (whatever the source): what a run records of its training data."""
    count = min(self.num_examples, num_images)
    idx = np.unique(np.linspace(0, self.num_examples - 1, count).astype(np.int64))
    images = np.ascontiguousarray(self.get(idx))
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    return f"{self.num_examples} images of {list(images.shape[1:])}, sha256 {digest}"


def check_source(source: str) -> None:
  """Refuse a ``data.source`` that is not one of ``SOURCES``."""
  if source not in SOURCES:
    raise ValueError(f"unknown data.source {source!r}: use one of {', '.join(SOURCES)}.")


def check_not_empty(split: Split) -> None:
  """Refuse a split without examples, which would end a run at its first step or evaluation."""
  if not len(split):
    raise ValueError(f"split {split.name} has no examples: point the config at a split with data.")


def _check_images(images: np.ndarray, what: str, data_config) -> None:
  size, channels, vocab = data_config.image_size, data_config.channels, data_config.vocab_size
  if images.ndim != 4 or images.shape[1:] != (size, size, channels):
    raise ValueError(f"{what} has shape {images.shape}: expected [N, {size}, {size}, {channels}] "
                     "(NHWC); fix the data or set data.image_size / data.channels.")
  if images.dtype != np.uint8:
    span = (f" with values in [{float(images.min()):g}, {float(images.max()):g}]"
            if images.size and images.dtype.kind in "biuf" else "")
    how = ("round them to levels first (floats in [0, 1]: "
           f"np.round(x * {vocab - 1}).astype(np.uint8))" if images.dtype.kind == "f"
           else "cast with .astype(np.uint8) once they lie in that range")
    raise ValueError(f"{what} has dtype {images.dtype}{span}: expected uint8 pixel values in "
                     f"[0, {vocab}); {how}.")
  if images.size and int(images.max()) >= vocab:
    raise ValueError(f"{what} holds values up to {int(images.max())}, not below data.vocab_size="
                     f"{vocab}: raise data.vocab_size or fix the data.")


def _array_split(name: str, images: np.ndarray) -> Split:
  return Split(name, images.shape[0], lambda idx: images[idx])


# ---------------------------------------------------------------- synthetic ----------------------

def synthetic_images(seed: int, num: int, size: int = 8, channels: int = 3) -> np.ndarray:
  """``num`` structured uint8 images [num, size, size, channels], a deterministic function of seed.

  Each image is a linear colour gradient in a random direction with one filled rectangle and one
  filled disc of random colours on top: smooth regions and sharp edges, far from uniform noise.
  """
  rng = np.random.default_rng([seed, 0x5EED])
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  angle = rng.uniform(0, 2 * np.pi, (num, 1, 1))
  ramp = 0.5 + 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy) / np.sqrt(2)  # [num, H, W] in [0, 1]
  c0, c1 = rng.integers(0, 256, (2, num, 1, 1, channels))
  img = c0 + (c1 - c0) * ramp[..., None]

  lo = rng.integers(0, size - 2, (num, 2))
  hi = lo + rng.integers(2, size // 2 + 2, (num, 2))
  rows, cols = np.arange(size)[None, :, None], np.arange(size)[None, None, :]
  rect = ((rows >= lo[:, 0, None, None]) & (rows < hi[:, 0, None, None]) &
          (cols >= lo[:, 1, None, None]) & (cols < hi[:, 1, None, None]))
  img = np.where(rect[..., None], rng.integers(0, 256, (num, 1, 1, channels)), img)

  centre = rng.uniform(-0.6, 0.6, (num, 2, 1, 1))
  radius = rng.uniform(0.2, 0.5, (num, 1, 1))
  disc = (yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2 < radius**2
  img = np.where(disc[..., None], rng.integers(0, 256, (num, 1, 1, channels)), img)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- loading ------------------------

def load_split(data_config, split: str, seed: int = 0) -> Split:
  """The images of ``split`` ('train' or the eval split) from ``data_config.source``; refuses an
  empty split, which would end a run at its first evaluation."""
  loaded = _load_split(data_config, split, seed)
  check_not_empty(loaded)
  return loaded


def _load_split(data_config, split: str, seed: int) -> Split:
  source = data_config.source
  check_source(source)
  if source == "synthetic":
    num = data_config.synthetic_num_train if split == data_config.train_split else data_config.synthetic_num_test
    split_seed = _SYNTHETIC_SPLIT_SEED.get(split, zlib.crc32(split.encode()))
    images = synthetic_images(1_000_003 * seed + split_seed, num, data_config.image_size,
                              data_config.channels)
    if data_config.vocab_size < 256:  # keep the same pictures, on fewer levels
      images = (images.astype(np.int32) * data_config.vocab_size // 256).astype(np.uint8)
    return _array_split(f"synthetic/{split}", images)
  if source == "npz":
    return _load_npz(data_config, split)
  return _load_tfds(data_config, split)


def check_npz_path(path: str) -> None:
  """Refuse an empty or missing ``data.path`` for ``data.source='npz'``."""
  if not path:
    raise ValueError("data.source='npz' needs a file: set --config.data.path=/path/to/data.npz.")
  if not os.path.isfile(path):
    raise ValueError(f"data.path={path!r} does not exist: point --config.data.path at an .npz file "
                     "with train_images and test_images.")


def _load_npz(data_config, split: str) -> Split:
  path = data_config.path
  check_npz_path(path)
  key = f"{split}_images"
  unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile)  # truncated, bad CRC, pickled
  try:  # our own handle: np.load leaks its file when the zip directory is unreadable
    with open(path, "rb") as handle:
      f = np.load(handle)
      if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
      if key not in f.files:
        raise KeyError(key)
      images = f[key]
  except KeyError:
    raise ValueError(f"{path} has no array {key!r} (it has {', '.join(f.files) or 'none'}): "
                     f"save the {split} split as {key}, uint8 [N, H, W, C].") from None
  except unreadable as e:
    raise ValueError(f"data.path={path!r} is not a readable .npz file ({type(e).__name__}: {e}): "
                     "re-create it with np.savez(path, train_images=..., test_images=...)."
                     ) from None
  _check_images(images, f"{path}:{key}", data_config)
  return _array_split(f"npz/{split}", images)


def _load_tfds(data_config, split: str) -> Split:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  kwargs = {"data_dir": data_config.data_dir} if data_config.data_dir else {}
  try:
    source = tfds.data_source(data_config.name, split=split, download=bool(data_config.download),
                              **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    msg = logging_utils.first_line(e) or type(e).__name__
    raise ValueError(f"tfds data set {data_config.name!r} split {split!r} could not be opened ({msg}): "
                     "prepare it (pip install -e '.[data]', then data.download=True or tfds build "
                     "--file_format=array_record) and set data.data_dir, or use "
                     "data.source='npz'.") from None

  def get(idx: np.ndarray) -> np.ndarray:
    images = [np.asarray(source[int(i)]["image"]) for i in idx]
    for i, image in zip(idx, images):  # each example: np.stack's error would not name it
      _check_images(image[None], f"tfds {data_config.name}/{split} example {i}", data_config)
    return np.stack(images)

  if len(source):  # load_split refuses an empty split
    features = source[0]
    if "image" not in features:
      raise ValueError(f"tfds data set {data_config.name!r} has no 'image' feature (it has "
                       f"{', '.join(sorted(features))}): save its images as an .npz and use "
                       "data.source='npz'.")
    get(np.zeros((1,), np.int64))  # a wrong shape or dtype fails now, not at the first batch
  return Split(f"tfds/{data_config.name}/{split}", len(source), get)


# ---------------------------------------------------------------- batching -----------------------

def check_batch_size(batch_size: int, what: str = "training.batch_size",
                     sharded: bool = True) -> None:
  """Raise ValueError unless the global batch is >= 1 and, if ``sharded``, divides evenly over
  devices and processes."""
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size < 1:
    raise ValueError(f"{what}={batch_size} must be >= 1.")
  if sharded and (batch_size % devices or batch_size % processes):
    raise ValueError(f"{what}={batch_size} is not divisible by the {devices} devices: set it to a "
                     f"multiple of {devices}.")


def local_slice(global_batch: int) -> slice:
  """This process's contiguous part of a global batch."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


class TrainData:
  """The training stream: ``batch(step)`` is this process's part of global batch ``step``.

  ``setting`` names the global batch size in errors. ``sharded=False`` is for host-only use: every
  process reads the whole global batch, which need not divide over the devices.
  """

  def __init__(self, split: Split, global_batch: int, seed: int, random_flip: bool = False,
               setting: str = "training.batch_size", sharded: bool = True):
    check_not_empty(split)
    check_batch_size(global_batch, setting, sharded)
    self.split = split
    self.global_batch = global_batch
    self.seed = seed
    self.random_flip = random_flip
    self.sharded = sharded
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) > 2:
          self._perms.pop(min(self._perms))
        self._perms[epoch] = np.random.default_rng([self.seed, 0xDA7A, epoch]).permutation(len(self.split))
      return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Example indices of global batch ``step`` (all processes)."""
    n = len(self.split)
    pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
    epochs, offsets = pos // n, pos % n
    out = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.permutation(int(e))[offsets[sel]]
    return out

  def flips(self, step: int) -> np.ndarray:
    """Whether each example of global batch ``step`` is mirrored (all processes)."""
    if not self.random_flip:
      return np.zeros((self.global_batch,), bool)
    return np.random.default_rng([self.seed, 0xF11B, step]).random(self.global_batch) < 0.5

  def batch(self, step: int) -> np.ndarray:
    """uint8 [B_local, H, W, C]: this process's part of global batch ``step`` (all of it unless
    sharded)."""
    part = local_slice(self.global_batch) if self.sharded else slice(None)
    images = self.split.get(self.indices(step)[part])
    flip = self.flips(step)[part]
    if flip.any():
      images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return images


def eval_batches(split: Split, global_batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The whole split in order: (uint8 [B_local, H, W, C], float mask [B_local]) per global batch.

  The last batch is padded (by repeating example 0) to the full size, with mask 0 on the padding.
  """
  check_batch_size(global_batch, "eval.batch_size")
  n = len(split)
  part = local_slice(global_batch)
  for start in range(0, n, global_batch):
    pos = np.arange(start, start + global_batch)[part]
    mask = (pos < n).astype(np.float32)
    yield split.get(np.where(pos < n, pos, 0)), mask


def num_eval_batches(split: Split, global_batch: int) -> int:
  return -(-len(split) // global_batch)


# ---------------------------------------------------------------- devices ------------------------

def to_global(local: np.ndarray, sharding) -> jax.Array:
  """A global array sharded by ``sharding`` from this process's rows (axis 0)."""
  return jax.make_array_from_process_local_data(sharding, local)


def prefetch(iterator: Iterator, sharding, size: int = 2) -> Generator:
  """Iterate ``iterator`` in a background thread, staging each item (an array or a tuple of
  arrays) on the devices with ``to_global``; up to ``size`` items wait ready. Errors in the
  thread are raised in the consumer. Closing the generator stops and joins the thread: one left
  inside a JAX call when the interpreter exits can abort the process."""
  if size < 1:  # a Queue of maxsize 0 is unbounded: it would stage the whole run on the devices
    raise ValueError(f"prefetch size={size} must be >= 1 (set data.prefetch).")
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def worker():
    try:
      for item in iterator:
        staged = (tuple(to_global(a, sharding) for a in item) if isinstance(item, tuple)
                  else to_global(item, sharding))
        if not put(staged):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-except
      put(e)

  thread = threading.Thread(target=worker, daemon=True, name="vdm-prefetch")
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=30)


def train_iterator(data: TrainData, start_step: int, sharding, size: int = 2,
                   num_steps: Optional[int] = None) -> Generator[jax.Array, None, None]:
  """Device batches for steps start_step, start_step + 1, ... (up to num_steps), prefetched."""
  def host():
    step = start_step
    while num_steps is None or step < num_steps:
      yield data.batch(step)
      step += 1
  return prefetch(host(), sharding, size)
