"""The synthetic generator (wsss_jax/data/synthetic.py) and its tfds builder."""
import importlib.util
import os
import time

import numpy as np
from PIL import Image
import pytest

from wsss_jax.data import palette
from wsss_jax.data import sources
from wsss_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_config(name, **overrides):
  """configs/common.py:data_config (configs/ is a folder of files, not a package)."""
  spec = importlib.util.spec_from_file_location(
      "_wsss_configs_common", os.path.join(REPO, "configs", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  cfg = common.data_config(name, runlocal=True)
  for k, v in overrides.items():
    if isinstance(v, dict):
      for kk, vv in v.items():
        cfg[k][kk] = vv
    else:
      cfg[k] = v
  return cfg


def _records(n, size=64, seed=0, **kw):
  return list(synthetic.generate(n, size, seed, **kw))


def test_record_format():
  recs = _records(4, size=72)
  for r in recs:
    assert set(r) == {"id", "image", "mask", "labels"}
    assert isinstance(r["id"], str)
    assert r["image"].shape == (72, 72, 3) and r["image"].dtype == np.uint8
    assert r["mask"].shape == (72, 72) and r["mask"].dtype == np.uint8
    assert r["labels"].shape == (10,) and r["labels"].dtype == np.uint8
  assert len({r["id"] for r in recs}) == 4
  assert synthetic.SYNTHETIC_CLASSES[0] == "background"
  assert synthetic.SYNTHETIC_CLASSES[1:] == ("zero", "one", "two", "three", "four", "five",
                                             "six", "seven", "eight", "nine")


def test_deterministic():
  a, b, c = _records(6, seed=3), _records(6, seed=3), _records(6, seed=4)
  for x, y in zip(a, b):
    for k in ("image", "mask", "labels"):
      np.testing.assert_array_equal(x[k], y[k])
  assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
  # Splits: different seeds and disjoint handwriting instances.
  tr = next(synthetic.generate_split("train", 1, 64, 0))
  va = next(synthetic.generate_split("val", 1, 64, 0))
  assert tr["id"] == "train_000000" and va["id"] == "val_000000"
  assert not np.array_equal(tr["image"], va["image"])
  assert synthetic.split_seed(0, "train") != synthetic.split_seed(0, "val")
  for k in range(10):
    assert not set(synthetic._digit_indices("train")[k]) & set(synthetic._digit_indices("val")[k])


def test_masks_are_exact():
  """Mask = visible ink of each pasted object; everything else is the untouched background."""
  for r in synthetic.generate(40, 64, 1, with_info=True):
    info = r["info"]
    expected = np.zeros((64, 64), np.uint8)
    for obj in info["objects"]:  # later objects cover earlier ones
      expected[obj["ink"]] = obj["class_id"]
    np.testing.assert_array_equal(r["mask"], expected)
    # Outside the mask the image is exactly the background crop.
    bg = r["mask"] == 0
    np.testing.assert_array_equal(r["image"][bg], info["background"][bg])
    # Labels are exactly the classes present in the mask.
    present = set(np.unique(r["mask"]).tolist()) - {0}
    assert set((np.flatnonzero(r["labels"]) + 1).tolist()) == present
    assert present, "every image has at least one visible object"
    # Every object keeps >= MIN_VISIBLE of its ink visible (occlusion is partial).
    for obj in info["objects"]:
      vis = np.sum(r["mask"][obj["ink"]] == obj["class_id"])
      assert vis >= synthetic.MIN_VISIBLE * obj["ink"].sum() - 1


def test_statistics_balance_and_cooccurrence():
  n, c = 600, 0.8
  recs = list(synthetic.generate(n, 64, 7, cooccurrence=c, with_info=True))
  labels = np.stack([r["labels"] for r in recs])
  per_class = labels.sum(axis=0)
  assert (per_class > 0).all(), per_class
  # Each class is in an image with p ~ E[#objects]/10 = 0.2, independently across images:
  # binomial std/mean = sqrt((1-p)/(n p)) = 8 %; +-40 % around the mean is ~5 sigma.
  assert (np.abs(per_class / per_class.mean() - 1) < 0.4).all(), per_class
  # Objects per image are uniform in 1..3 (a few drop out when the image is crowded).
  hist = np.bincount(labels.sum(axis=1), minlength=4)
  assert hist[0] == 0 and (hist[1:] > n / 3 * 0.7).all(), hist
  # Co-occurrence: first object's preferred texture with probability c (binomial, 4 sigma).
  hits = np.mean([r["info"]["texture"] == synthetic.preferred_texture(r["info"]["first_class"])
                  for r in recs])
  assert abs(hits - c) < 4 * np.sqrt(c * (1 - c) / n), hits
  # Object sizes: ink extent is a large part of the image (incomplete-activation regime).
  extents = []
  for r in recs[:100]:
    for obj in r["info"]["objects"]:
      ys = np.flatnonzero(obj["ink"].any(axis=1))
      extents.append((ys[-1] - ys[0] + 1) / 64)
  assert 0.25 <= np.median(extents) <= 0.6, np.median(extents)


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_cooccurrence_extremes(c):
  for r in synthetic.generate(30, 48, 2, cooccurrence=c, with_info=True):
    hit = r["info"]["texture"] == synthetic.preferred_texture(r["info"]["first_class"])
    assert hit == (c == 1.0)


def test_preferred_textures_and_arguments():
  prefs = [synthetic.preferred_texture(k) for k in range(1, 11)]
  assert len(set(prefs)) == 10 and all(0 <= t < len(synthetic.TEXTURES) for t in prefs)
  for bad in (0, 11):
    with pytest.raises(ValueError):
      synthetic.preferred_texture(bad)
  with pytest.raises(ValueError, match="max_objects"):
    next(synthetic.generate(1, 64, 0, max_objects=0))
  with pytest.raises(ValueError, match="cooccurrence"):
    next(synthetic.generate(1, 64, 0, cooccurrence=1.5))
  r = _records(50, max_objects=1)
  assert all(x["labels"].sum() == 1 for x in r)


def test_generation_speed():
  next(synthetic.generate(1, 128, 0))  # warm caches (digits, texture pyramid)
  t = time.perf_counter()
  n = sum(1 for _ in synthetic.generate(200, 128, 0))
  dt = time.perf_counter() - t
  # ~1,300 images/s measured on 2 cores; 2,000 images must take well under a minute.
  assert n == 200 and dt < 6.0, f"{n / dt:.0f} images/s"


def test_export_voc_layout(tmp_path):
  root = tmp_path / "synvoc"
  counts = synthetic.export_voc_layout(str(root), 4, 2, 64, seed=5)
  assert counts == {"train": 4, "val": 2}
  assert (root / "classes.txt").read_text().split() == list(synthetic.SYNTHETIC_CLASSES)
  for split, n in counts.items():
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    recs = list(synthetic.generate_split(split, n, 64, 5))
    assert ids == [r["id"] for r in recs]
    for r in recs:
      m = Image.open(root / "SegmentationClass" / f"{r['id']}.png")
      assert m.mode == "P"
      np.testing.assert_array_equal(np.asarray(m.getpalette()[:768], np.uint8).reshape(256, 3),
                                    palette.voc_palette())
      np.testing.assert_array_equal(np.asarray(m), r["mask"])  # masks exact
      img = np.asarray(Image.open(root / "JPEGImages" / f"{r['id']}.jpg"))
      assert img.shape == r["image"].shape
      assert np.abs(img.astype(int) - r["image"]).mean() < 6  # JPEG q95, 4:4:4


def test_builder_roundtrip_and_cache_key(tmp_path):
  syn = dict(num_train=6, num_val=3, image_size=48, seed=11)
  cfg = _data_config("synthetic", cache_dir=str(tmp_path), synthetic=syn)
  meta = sources.prepare(cfg)
  assert meta.name == "synthetic" and meta.num_classes == 11
  assert meta.class_names == synthetic.SYNTHETIC_CLASSES
  assert meta.splits == {"train": 6, "val": 3}
  for split, n in meta.splits.items():
    src = sources.get_source(cfg, split)
    assert len(src) == n
    for r, want in zip((src[i] for i in range(n)),
                       synthetic.generate_split(split, n, 48, 11)):
      assert r["id"] == want["id"]
      for k in ("image", "mask", "labels"):  # lossless storage
        np.testing.assert_array_equal(r[k], want[k])
        assert r[k].dtype == np.uint8
  # Idempotent and fast: same folder, not rebuilt.
  marker = os.path.join(meta.path, "meta.json")
  mtime = os.path.getmtime(marker)
  t = time.perf_counter()
  assert sources.prepare(cfg) == meta
  assert time.perf_counter() - t < 0.5 and os.path.getmtime(marker) == mtime
  assert sources.get_meta(cfg) == meta
  # Different parameters never share a folder.
  other = sources.prepare(_data_config("synthetic", cache_dir=str(tmp_path),
                                       synthetic=dict(syn, cooccurrence=0.5)))
  assert other.path != meta.path
  assert sorted(os.listdir(tmp_path / "synthetic")) == sorted(
      [os.path.basename(meta.path), os.path.basename(other.path)])  # no leftovers
  # Statistics agree with the records.
  st = sources.split_statistics(cfg, "train")
  recs = list(synthetic.generate_split("train", 6, 48, 11))
  assert st["images"] == 6 and st["skipped"] == 0
  assert st["mean_image_size"] == [48.0, 48.0]
  for k, name in enumerate(synthetic.SYNTHETIC_CLASSES[1:]):
    assert st["images_per_class"][name] == sum(int(r["labels"][k]) for r in recs)
  assert sum(st["labels_per_image"].values()) == 6
  fg = np.mean([np.mean(r["mask"] > 0) for r in recs])
  assert abs((1 - st["pixel_fraction"]["background"]) - fg) < 1e-9
  with pytest.raises(ValueError, match="available splits: \\['train', 'val'\\]"):
    sources.get_source(cfg, "test")


def test_synthetic_class_name_override(tmp_path):
  names = ("bg",) + tuple(f"d{i}" for i in range(10))
  syn = dict(num_train=2, num_val=1, image_size=32)
  meta = sources.prepare(_data_config("synthetic", cache_dir=str(tmp_path), synthetic=syn,
                                      class_names=names))
  assert meta.class_names == names
  with pytest.raises(ValueError, match="11 classes"):
    sources.prepare(_data_config("synthetic", cache_dir=str(tmp_path), synthetic=syn,
                                 class_names=("a", "b")))
