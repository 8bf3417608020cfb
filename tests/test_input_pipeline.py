"""Input pipeline: determinism as a function of (seed, step), sharding, sources and their errors."""
import gc
import os
import sys
import warnings

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import default  # noqa: E402
from vdm import input_pipeline as ip


def data_config(**overrides):
  c = default.get_config().data
  c.update(dict(source="synthetic", image_size=8, channels=3, synthetic_num_train=100,
                synthetic_num_test=30))
  c.update(overrides)
  return c


def test_synthetic_is_deterministic_structured_and_split_specific():
  a = ip.load_split(data_config(), "train", seed=0).get(np.arange(100))
  b = ip.load_split(data_config(), "train", seed=0).get(np.arange(100))
  test = ip.load_split(data_config(), "test", seed=0).get(np.arange(30))
  other_seed = ip.load_split(data_config(), "train", seed=1).get(np.arange(100))
  assert a.shape == (100, 8, 8, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[:30], test) and not np.array_equal(a, other_seed)
  # Splits of any other names differ too (they all drew the same images before).
  parts = [ip.load_split(data_config(train_split="train[:90%]"), s, seed=0).get(np.arange(30))
           for s in ("train[90%:]", "holdout")]
  assert not np.array_equal(*parts) and not np.array_equal(parts[0], test)
  # Structured: neighbouring pixels are close far more often than for uniform noise.
  assert np.mean(np.abs(np.diff(a.astype(int), axis=2)) <= 4) > 0.5


def test_batches_are_a_function_of_seed_and_step():
  split = ip.load_split(data_config(), "train")
  d1 = ip.TrainData(split, 16, seed=3, random_flip=True)
  d2 = ip.TrainData(split, 16, seed=3, random_flip=True)
  for step in (7, 0, 12, 7):  # any order: no iterator state
    np.testing.assert_array_equal(d1.batch(step), d2.batch(step))
  assert not np.array_equal(d1.batch(0), d1.batch(1))
  assert not np.array_equal(d1.indices(0), ip.TrainData(split, 16, seed=4).indices(0))


def test_each_epoch_is_a_permutation():
  split = ip.load_split(data_config(synthetic_num_train=40), "train")
  data = ip.TrainData(split, 8, seed=0)
  epoch0 = np.concatenate([data.indices(k) for k in range(5)])
  epoch1 = np.concatenate([data.indices(k) for k in range(5, 10)])
  assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
  assert not np.array_equal(epoch0, epoch1)
  # A batch that straddles an epoch boundary: 40 = 6·6 + 4.
  straddle = ip.TrainData(split, 6, seed=0)
  assert len(set(np.concatenate([straddle.indices(k) for k in range(7)])[:40])) == 40


def test_flips_mirror_images_and_are_a_function_of_seed_and_step():
  split = ip.load_split(data_config(), "train")
  plain = ip.TrainData(split, 32, seed=0, random_flip=False)
  flipped = ip.TrainData(split, 32, seed=0, random_flip=True)
  mask = flipped.flips(5)
  assert 0 < mask.sum() < 32
  np.testing.assert_array_equal(flipped.batch(5)[mask], plain.batch(5)[mask][:, :, ::-1])
  np.testing.assert_array_equal(flipped.batch(5)[~mask], plain.batch(5)[~mask])
  np.testing.assert_array_equal(mask, flipped.flips(5))
  assert not np.array_equal(mask, flipped.flips(6))
  assert not np.array_equal(mask, ip.TrainData(split, 32, seed=1, random_flip=True).flips(5))


def test_flips_mirror_half_the_examples():
  """Each example is mirrored with probability 1/2: over 200 batches of 32 (6,400 draws, standard
  deviation 0.006) the fraction lies within 0.47..0.53, and at each position of the batch
  within 0.4..0.6."""
  flipped = ip.TrainData(ip.load_split(data_config(), "train"), 32, seed=0, random_flip=True)
  masks = np.stack([flipped.flips(step) for step in range(200)])
  assert 0.47 < masks.mean() < 0.53, masks.mean()
  assert 0.4 < masks.mean(axis=0).min() and masks.mean(axis=0).max() < 0.6  # every position


def test_each_process_reads_its_own_part_of_the_global_batch(monkeypatch):
  split = ip.load_split(data_config(), "train")
  full = ip.TrainData(split, 8, seed=0, random_flip=True).batch(3)
  parts = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for pid in range(2):
    monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
    parts.append(ip.TrainData(split, 8, seed=0, random_flip=True).batch(3))
  assert parts[0].shape[0] == 4
  np.testing.assert_array_equal(np.concatenate(parts), full)


def test_eval_batches_cover_the_split_once_with_a_mask():
  split = ip.load_split(data_config(), "test")  # 30 examples
  batches = list(ip.eval_batches(split, 8))
  assert len(batches) == ip.num_eval_batches(split, 8) == 4
  assert sum(m.sum() for _, m in batches) == 30
  np.testing.assert_array_equal(np.concatenate([x for x, _ in batches])[:30], split.get(np.arange(30)))


def test_eval_batches_split_each_global_batch_over_the_processes(monkeypatch):
  """In global order (process 0's rows, then process 1's, batch by batch) the masked-in rows are
  the split's examples, each once, and the mask is 0 exactly on the padding."""
  split = ip.load_split(data_config(), "test")  # 30 examples
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  per_process = []
  for pid in range(2):
    monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
    per_process.append(list(ip.eval_batches(split, 16)))
  rows = [part for batch in zip(*per_process) for part in batch]
  mask = np.concatenate([m for _, m in rows])
  np.testing.assert_array_equal(mask, np.arange(32) < 30)
  np.testing.assert_array_equal(np.concatenate([x for x, _ in rows])[mask == 1],
                                split.get(np.arange(30)))


def test_synthetic_images_on_fewer_levels_and_split_sizes():
  """vocab_size < 256 keeps the synthetic pictures on fewer levels, floor(x · vocab / 256), with
  no uint8 overflow; the split named by data.train_split (any name) has synthetic_num_train
  examples, every other split synthetic_num_test."""
  full = ip.load_split(data_config(), "train").get(np.arange(100))
  coarse = ip.load_split(data_config(vocab_size=32), "train").get(np.arange(100))
  assert coarse.dtype == np.uint8 and int(coarse.max()) < 32 and int(full.max()) > 200
  np.testing.assert_array_equal(coarse, full.astype(np.int64) * 32 // 256)
  c = data_config(train_split="train[:90%]", synthetic_num_train=50, synthetic_num_test=20)
  assert len(ip.load_split(c, "train[:90%]")) == 50
  assert len(ip.load_split(c, "train[90%:]")) == len(ip.load_split(c, "train")) == 20


def test_host_only_train_data_reads_the_whole_batch_and_names_its_setting(monkeypatch):
  split = ip.load_split(data_config(), "train")
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  host = ip.TrainData(split, 6, seed=0, random_flip=True, setting="--fit_batch_size", sharded=False)
  images = split.get(host.indices(2))
  np.testing.assert_array_equal(
      host.batch(2), np.where(host.flips(2)[:, None, None, None], images[:, :, ::-1], images))
  with pytest.raises(ValueError, match=r"^--fit_batch_size=6 is not divisible by the 4 devices"):
    ip.TrainData(split, 6, seed=0, setting="--fit_batch_size")
  with pytest.raises(ValueError, match=r"^--fit_batch_size=0 must be >= 1\.$"):
    ip.TrainData(split, 0, seed=0, setting="--fit_batch_size", sharded=False)


def test_prefetch_stages_batches_and_reraises_errors():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  split = ip.load_split(data_config(), "train")
  data = ip.TrainData(split, 4, seed=0)
  got = list(ip.train_iterator(data, 2, sharding, size=2, num_steps=5))
  assert len(got) == 3 and isinstance(got[0], jax.Array)
  np.testing.assert_array_equal(np.asarray(got[0]), data.batch(2))

  def broken():
    yield np.zeros((4, 2), np.uint8)
    raise ValueError("boom")

  it = ip.prefetch(broken(), sharding)
  next(it)
  with pytest.raises(ValueError, match="boom"):
    next(it)


# ---------------------------------------------------------------- npz ----------------------------

def _write_npz(path, train=None, test=None, **extra):
  rng = np.random.default_rng(0)
  arrays = {"train_images": rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8) if train is None else train,
            "test_images": rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8) if test is None else test}
  arrays = {k: v for k, v in arrays.items() if v is not False}
  np.savez(path, **arrays, **extra)
  return str(path)


def test_npz_source_loads_both_splits(tmp_path):
  path = _write_npz(tmp_path / "d.npz")
  c = data_config(source="npz", path=path)
  train, test = ip.load_split(c, "train"), ip.load_split(c, "test")
  assert len(train) == 20 and len(test) == 10
  with np.load(path) as f:
    np.testing.assert_array_equal(train.get(np.arange(20)), f["train_images"])


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty_path", "needs a file"),
    ("shape", "has shape"),
    ("dtype",
     r"has dtype float32 with values in \[0, 1\]: .* np.round\(x \* 255\).astype\(np.uint8\)"),
    ("dtype_int", r"has dtype int64 with values in \[-1, 300\]: .* once they lie in that range"),
    ("vocab", "vocab_size"),
    ("no_key", "has no array 'test_images'"),
    ("not_npz", "not a readable .npz"),
    ("truncated", r"not a readable \.npz file \(BadZipFile"),
    ("bad_crc", r"not a readable \.npz file \(BadZipFile: Bad CRC-32"),
    ("objects", r"not a readable \.npz file \(ValueError: Object arrays"),
])
def test_npz_errors_are_one_line_value_errors(tmp_path, case, match):
  path = str(tmp_path / "d.npz")
  overrides = {}
  if case == "missing":
    path = str(tmp_path / "nope.npz")
  elif case == "empty_path":
    path = ""
  elif case == "shape":
    _write_npz(path, test=np.zeros((10, 8, 8), np.uint8))
  elif case == "dtype":  # images in [0, 1]: .astype(np.uint8) alone would leave only 0 and 1
    _write_npz(path, test=np.linspace(0, 1, 1920, dtype=np.float32).reshape(10, 8, 8, 3))
  elif case == "dtype_int":
    _write_npz(path, test=np.linspace(-1, 300, 1920).astype(np.int64).reshape(10, 8, 8, 3))
  elif case == "vocab":
    _write_npz(path)
    overrides["vocab_size"] = 16
  elif case == "no_key":
    _write_npz(path, test=False)
  elif case == "not_npz":
    with open(path, "wb") as f:
      f.write(b"this is not a zip file")
  elif case in ("truncated", "bad_crc"):  # half a copy; one flipped byte in test_images' data
    with open(_write_npz(path), "rb") as f:
      whole = bytearray(f.read())
    if case == "truncated":
      whole = whole[:len(whole) // 2]
    else:
      whole[whole.rfind(b"\x93NUMPY") + 200] ^= 0xFF
    with open(path, "wb") as f:
      f.write(whole)
  elif case == "objects":
    np.savez(path, train_images=np.zeros((2, 8, 8, 3), np.uint8),
             test_images=np.array([None, 1], dtype=object))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ResourceWarning)
    with pytest.raises(ValueError, match=match) as e:
      ip.load_split(data_config(source="npz", path=path, **overrides), "test")
    assert "\n" not in str(e.value)
    del e  # its traceback holds the loader's frames
    gc.collect()
  assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "file left open"


def test_npz_pixel_values_and_dtype_at_the_boundary(tmp_path):
  """Values up to vocab_size − 1 are accepted and vocab_size is refused (not only far larger
  values); only uint8 is accepted, not another unsigned type holding the same values."""
  images = np.zeros((4, 8, 8, 3), np.uint8)
  images[0, 0, 0, 0] = 15
  c = data_config(source="npz", path=_write_npz(tmp_path / "ok.npz", test=images), vocab_size=16)
  np.testing.assert_array_equal(ip.load_split(c, "test").get(np.arange(4)), images)
  images[1, 2, 3, 1] = 16
  c = data_config(source="npz", path=_write_npz(tmp_path / "over.npz", test=images), vocab_size=16)
  with pytest.raises(ValueError, match=r"holds values up to 16, not below data.vocab_size=16"):
    ip.load_split(c, "test")
  wide = images.astype(np.uint16)
  c = data_config(source="npz", path=_write_npz(tmp_path / "u16.npz", test=wide))
  with pytest.raises(ValueError, match=r"has dtype uint16 .*expected uint8"):
    ip.load_split(c, "test")


def test_unknown_source_and_indivisible_batch(monkeypatch):
  with pytest.raises(ValueError, match="unknown data.source 'bogus'"):
    ip.load_split(data_config(source="bogus"), "train")
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  with pytest.raises(ValueError, match="not divisible by the 3 devices"):
    ip.TrainData(ip.load_split(data_config(), "train"), 8, seed=0)


# ---------------------------------------------------------------- tfds (mocked, offline) ---------

def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = data_config(source="tfds", name="cifar10", image_size=32, channels=3, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    train = ip.load_split(c, "train")
    assert len(train) == 12
    data = ip.TrainData(train, 4, seed=0, random_flip=True)
    batch = data.batch(1)
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, data.batch(1))
    source = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path))
    images = np.stack([source[int(i)]["image"] for i in data.indices(1)])
    np.testing.assert_array_equal(
        batch, np.where(data.flips(1)[:, None, None, None], images[:, :, ::-1], images))
    with pytest.raises(ValueError, match="has shape"):
      ip.load_split(data_config(source="tfds", name="cifar10", image_size=16), "test")


def test_tfds_data_set_without_an_image_feature_is_a_one_line_error(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  examples = [{"label": 0, "img": np.zeros((32, 32, 3), np.uint8)}] * 3
  monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: examples)
  with pytest.raises(ValueError, match=r"^tfds data set 'faces' has no 'image' feature \(it has "
                     r"img, label\): save its images as an \.npz and use data.source='npz'\.$"):
    ip.load_split(data_config(source="tfds", name="faces", image_size=32), "train")


@pytest.mark.parametrize("image, match", [
    (np.zeros((16, 16, 3), np.uint8),
     r"has shape \(1, 16, 16, 3\): expected \[N, 32, 32, 3\] \(NHWC\)"),
    (np.zeros((32, 32, 3), np.int64), r"has dtype int64 with values in \[0, 0\]: expected uint8"),
    (np.full((32, 32, 3), 200, np.uint8), r"holds values up to 200, not below data.vocab_size=128"),
])
def test_tfds_checks_each_example_it_reads(monkeypatch, image, match):
  tfds = pytest.importorskip("tensorflow_datasets")
  good = {"image": np.zeros((32, 32, 3), np.uint8)}
  monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: [good, good, {"image": image}])
  split = ip.load_split(data_config(source="tfds", name="faces", image_size=32, vocab_size=128),
                        "train")
  np.testing.assert_array_equal(split.get(np.arange(2)), np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"^tfds faces/train example 2 " + match) as e:
    split.get(np.arange(3))
  assert "\n" not in str(e.value)


def test_an_empty_split_is_refused_alike_by_load_split_and_train_data(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: [])
  message = r"^split tfds/faces/train has no examples: point the config at a split with data\.$"
  with pytest.raises(ValueError, match=message):
    ip.load_split(data_config(source="tfds", name="faces", image_size=32), "train")
  with pytest.raises(ValueError, match=message):
    ip.TrainData(ip.Split("tfds/faces/train", 0, lambda idx: idx), 8, seed=0)


def test_tfds_missing_data_set_is_a_one_line_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  c = data_config(source="tfds", name="cifar10", image_size=32, data_dir=str(tmp_path / "none"))
  with pytest.raises(ValueError, match="could not be opened") as e:
    ip.load_split(c, "train")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "none" / "downloads")


def test_closing_prefetch_joins_its_thread():
  """A thread left inside a JAX call at interpreter exit can abort the process (seen once after a
  SIGTERM save: exit status -6), so closing the stream must stop and join the worker."""
  import itertools
  import threading
  sharding = jax.sharding.make_single_device_sharding(jax.devices()[0])
  stream = ip.prefetch((np.full((2, 3), i, np.float32) for i in itertools.count()), sharding, 2)
  assert float(next(stream)[0, 0]) == 0.0
  workers = [t for t in threading.enumerate() if t.name == "vdm-prefetch"]
  assert workers and any(t.is_alive() for t in workers)
  stream.close()
  assert not any(t.is_alive() for t in workers)
