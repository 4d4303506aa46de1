"""grain pipelines: batch shapes, per-process shards, exact resume, exact-once eval,
global arrays on the 8-device mesh."""
import importlib.util
import os

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO_ROOT
from wsss_jax.data import pipeline as pl
from wsss_jax.data import transforms as T
from wsss_jax.runtime import mesh as mesh_lib

NUM_CLASSES = 6


def _data_config(**overrides):
  spec = importlib.util.spec_from_file_location(
      "_common_cfg", os.path.join(REPO_ROOT, "configs", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  cfg = common.data_config("synthetic", runlocal=True)
  cfg.update(dict(crop_size=24, batch_size=8, eval_batch_size=8, num_workers=0))
  cfg.update(overrides)
  return cfg


class ListSource:
  """In-memory random-access source; records of random sizes; counts reads."""

  def __init__(self, n, *, min_side=12, max_side=40, seed=0):
    self.records = pl.synthetic_records(n, min_side=min_side, max_side=max_side,
                                        num_classes=NUM_CLASSES, seed=seed)
    self.reads = 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads += 1
    return self.records[i]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_shapes_and_dtypes():
  cfg = _data_config()
  src = ListSource(20)
  batch = next(iter(pl.train_dataset(src, cfg, seed=0, process_index=0, process_count=1)))
  assert set(batch) == {"image", "mask", "valid", "labels"}
  assert batch["valid"].shape == (8, 24, 24) and batch["valid"].dtype == bool
  assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (8, 24, 24) and batch["mask"].dtype == np.int32
  assert batch["labels"].shape == (8, NUM_CLASSES - 1)
  assert batch["labels"].dtype == np.float32
  pad = batch["mask"] == 255  # synthetic masks hold 0..5, so 255 is padding
  assert pad.any() and (batch["image"][pad] == 0).all()
  np.testing.assert_array_equal(batch["valid"], ~pad)


def test_train_shards_are_disjoint_and_cover_each_epoch():
  cfg = _data_config(batch_size=8)
  n, pcount = 48, 4
  src = ListSource(n)
  b = 8 // pcount
  steps = n // 8  # global steps per epoch
  epochs = {}
  for pidx in range(pcount):
    it = iter(pl.train_dataset(src, cfg, seed=3, process_index=pidx, process_count=pcount,
                               with_index=True))
    idx = np.concatenate([x["index"] for x in _take(it, 2 * steps)])
    assert idx.dtype == np.int32 and len(idx) == 2 * steps * b
    epochs[pidx] = idx.reshape(2, -1)
  for e in range(2):
    per_proc = [set(epochs[p][e].tolist()) for p in range(pcount)]
    assert sum(map(len, per_proc)) == n                   # no duplicates
    assert set().union(*per_proc) == set(range(n))        # full coverage
  # A new permutation each epoch.
  order = [np.stack([epochs[p][e] for p in range(pcount)], 1).ravel() for e in range(2)]
  assert not np.array_equal(order[0], order[1])


def test_train_stream_does_not_depend_on_process_count():
  """Augmentation is drawn per global position, so 2 processes see the same examples as
  one process (interleaved)."""
  cfg = _data_config(batch_size=4)
  src = ListSource(10)
  one = next(iter(pl.train_dataset(src, cfg, seed=1, process_index=0, process_count=1,
                                   with_index=True)))
  two = [next(iter(pl.train_dataset(src, cfg, seed=1, process_index=p, process_count=2,
                                    with_index=True))) for p in range(2)]
  for key in ("image", "mask", "index"):
    np.testing.assert_array_equal(one[key][0::2], two[0][key])
    np.testing.assert_array_equal(one[key][1::2], two[1][key])


def test_train_resume_from_iterator_state():
  cfg = _data_config()
  src = ListSource(13)
  make = lambda: iter(pl.train_dataset(src, cfg, seed=5, process_index=1, process_count=2,
                                       with_index=True))
  it = make()
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = make()
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 4)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # Rewinding the same iterator works too.
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["image"], expected[0]["image"])


def test_train_seed_changes_the_stream():
  cfg = _data_config()
  src = ListSource(16)
  a = next(iter(pl.train_dataset(src, cfg, seed=0, process_index=0, process_count=1)))
  b = next(iter(pl.train_dataset(src, cfg, seed=1, process_index=0, process_count=1)))
  assert not np.array_equal(a["image"], b["image"])


def test_batch_size_errors():
  cfg = _data_config(batch_size=6)
  with pytest.raises(ValueError, match=r"data.batch_size=6 must be divisible by the number "
                                       r"of processes \(4\)"):
    pl.train_dataset(ListSource(8), cfg, seed=0, process_index=0, process_count=4)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match=r"'data' axis size \(8\)"):
    pl.train_dataset(ListSource(8), cfg, seed=0, process_index=0, process_count=1, mesh=mesh)
  with pytest.raises(ValueError, match="eval batch size=6 .* processes"):
    pl.eval_dataset(ListSource(8), cfg, pad_size=32, batch_size=6, process_index=0,
                    process_count=4)


@pytest.mark.parametrize("pcount", [1, 4])
def test_eval_covers_every_record_once(pcount):
  n, global_b = 23, 8
  cfg = _data_config(eval_batch_size=global_b)
  src = ListSource(n, max_side=40)
  num = pl.num_batches_eval(n, global_b)
  assert num == 3
  per_proc = []
  for pidx in range(pcount):
    batches = list(pl.eval_dataset(src, cfg, pad_size=40, process_index=pidx,
                                   process_count=pcount))
    assert len(batches) == num
    for x in batches:  # static shapes, padding included
      b = global_b // pcount
      assert x["image"].shape == (b, 40, 40, 3) and x["image"].dtype == np.float32
      assert x["mask"].shape == (b, 40, 40) and x["mask"].dtype == np.int32
      assert x["valid"].shape == (b, 40, 40) and x["valid"].dtype == bool
      assert x["size"].shape == (b, 2) and x["size"].dtype == np.int32
      assert x["labels"].shape == (b, NUM_CLASSES - 1) and x["index"].dtype == np.int32
    per_proc.append(batches)
  # Global batch t = concatenation over processes = records [8t, 8t + 8) in order.
  glob = np.concatenate([np.concatenate([per_proc[p][t]["index"] for p in range(pcount)])
                         for t in range(num)])
  np.testing.assert_array_equal(glob, list(range(n)) + [-1] * (num * global_b - n))
  for batches in per_proc:
    for x in batches:
      for j, i in enumerate(x["index"]):
        if i < 0:  # batch padding
          assert not x["valid"][j].any() and (x["mask"][j] == 255).all()
          assert (x["image"][j] == 0).all() and x["id"][j] == "" and (x["size"][j] == 0).all()
          continue
        rec = src.records[i]
        h, w = rec["mask"].shape
        assert x["id"][j] == rec["id"]
        np.testing.assert_array_equal(x["size"][j], [h, w])
        np.testing.assert_allclose(x["image"][j, :h, :w], T.normalize(rec["image"]),
                                   atol=1e-6)
        np.testing.assert_array_equal(x["mask"][j, :h, :w], rec["mask"])
        assert x["valid"][j].sum() == h * w and (x["mask"][j][~x["valid"][j]] == 255).all()
        np.testing.assert_array_equal(x["labels"][j], rec["labels"])


def test_eval_oversize_is_a_clear_error():
  cfg = _data_config()
  src = ListSource(4, min_side=30, max_side=40)
  it = iter(pl.eval_dataset(src, cfg, pad_size=16, process_index=0, process_count=1))
  with pytest.raises(ValueError, match=r"img0000\d.*larger than the eval pad size 16x16"):
    next(it)


def test_eval_pad_size():
  src = ListSource(9, min_side=20, max_side=70)
  longest = max(max(r["mask"].shape) for r in src.records)
  assert pl.eval_pad_size(src, _data_config(eval_pad_size=0)) == -(-longest // 32) * 32
  assert pl.eval_pad_size(src, _data_config(eval_pad_size=100)) == 100

  class Sized(ListSource):  # sources that know their sizes are not read
    def image_sizes(self):
      return np.array([r["mask"].shape for r in self.records])

  sized = Sized(9, min_side=20, max_side=70)
  assert pl.eval_pad_size(sized, _data_config()) == -(-longest // 32) * 32
  assert sized.reads == 0


def test_to_global_on_8_devices():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  cfg = _data_config(eval_batch_size=16)
  batch = next(iter(pl.eval_dataset(ListSource(20), cfg, pad_size=40, process_index=0,
                                    process_count=1)))
  out = mesh_lib.to_global(batch, mesh)
  assert "id" not in out  # host-only strings stay behind
  assert set(out) == {"image", "mask", "valid", "size", "labels", "index"}
  want = NamedSharding(mesh, P("data"))
  for key, arr in out.items():
    assert arr.shape == batch[key].shape and arr.dtype == batch[key].dtype
    assert arr.sharding.is_equivalent_to(want, arr.ndim)
    assert len(arr.addressable_shards) == 8
    assert arr.addressable_shards[0].data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(arr), batch[key])
  with pytest.raises(ValueError, match="must divide by 8"):
    mesh_lib.to_global({"x": np.zeros((12, 3), np.float32)}, mesh)
  # A 2-D mesh: the batch splits over 'data' and replicates over 'model'.
  mesh2 = jax.make_mesh((4, 2), ("data", "model"),
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
  arr = mesh_lib.to_global({"x": np.arange(8, dtype=np.float32)}, mesh2)["x"]
  assert arr.shape == (8,) and arr.addressable_shards[0].data.shape == (2,)


def test_multiprocess_workers_and_resume():
  """num_workers > 0 goes through mp_prefetch (absl flags handled) and still resumes."""
  cfg = _data_config(num_workers=1, batch_size=4)
  src = pl.synthetic_records(12, min_side=12, max_side=30, num_classes=NUM_CLASSES)
  ds = pl.train_dataset(src, cfg, seed=2, process_index=0, process_count=1,
                        with_index=True)
  ref = _take(iter(pl.train_dataset(src, _data_config(batch_size=4), seed=2,
                                    process_index=0, process_count=1, with_index=True)), 4)
  it = iter(ds)
  got = _take(it, 2)
  state = it.get_state()
  got += _take(it, 2)
  for want, have in zip(ref, got):  # workers do not change the stream
    np.testing.assert_array_equal(want["image"], have["image"])
  it2 = iter(ds)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["index"], ref[2]["index"])
  assert isinstance(ds, grain.IterDataset)


def test_epoch_shuffle_reshuffles_each_epoch():
  ds = pl.EpochShuffle(grain.MapDataset.range(10), seed=4)
  epochs = np.array([ds[i] for i in range(30)]).reshape(3, 10)
  for e in epochs:
    assert sorted(e.tolist()) == list(range(10))
  assert not np.array_equal(epochs[0], epochs[1])
  again = pl.EpochShuffle(grain.MapDataset.range(10), seed=4)
  assert [again[i] for i in range(25, 30)] == epochs[2, 5:].tolist()  # random access
  assert [pl.EpochShuffle(grain.MapDataset.range(10), seed=5)[i] for i in range(10)] != \
      epochs[0].tolist()
