"""The `voc` builder on the real MSRC-21 folder and on a miniature VOC 2012 + SBD tree."""
import importlib.util
import os
import pickle
import shutil
import time

import numpy as np
from PIL import Image
import pytest

from wsss_jax.data import palette
from wsss_jax.data import sources
from wsss_jax.data import synthetic
from wsss_jax.data import voc_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common():
  spec = importlib.util.spec_from_file_location(
      "_wsss_configs_common", os.path.join(REPO, "configs", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  return common


def _data_config(name, **overrides):
  cfg = _common().data_config(name, runlocal=True)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _read_split(root, split):
  with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")) as f:
    return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------
# MSRC-21 (real photos), built once per session.

@pytest.fixture(scope="session")
def msrc(msrc_root, tmp_path_factory):
  cfg = _data_config("voc", root=msrc_root, cache_dir=str(tmp_path_factory.mktemp("cache")))
  return cfg, sources.prepare(cfg)


def test_msrc_meta(msrc, msrc_root):
  cfg, meta = msrc
  assert meta.name == "voc"
  assert meta.splits == {"train": 276, "val": 59}
  with open(os.path.join(msrc_root, "classes.txt")) as f:
    names = tuple(line.strip() for line in f if line.strip())
  assert meta.class_names == names and meta.num_classes == 16 == len(names)
  assert names[0] == "background"
  assert sources.get_meta(cfg) == meta
  st = sources.split_statistics(cfg, "train")
  assert st["images"] == 276 and st["no_foreground_images"] == 45
  assert st["labels_per_image"][0] == 45
  assert sum(st["labels_per_image"].values()) == 276
  assert 0 < st["ignore_fraction"] < 1
  assert abs(sum(st["pixel_fraction"].values()) + st["ignore_fraction"] - 1) < 1e-9
  assert sources.split_statistics(cfg, "val")["no_foreground_images"] == 13


def test_msrc_roundtrip(msrc, msrc_root):
  cfg, _ = msrc
  for split in ("train", "val"):
    ids = _read_split(msrc_root, split)
    src = sources.get_source(cfg, split)
    assert len(src) == len(ids)
    for i in (0, len(ids) // 2, len(ids) - 1):
      r = src[i]
      assert r["id"] == ids[i]  # record i is line i of the split file
      img = np.asarray(Image.open(os.path.join(msrc_root, "JPEGImages", ids[i] + ".jpg"))
                       .convert("RGB"))
      mask = np.asarray(Image.open(os.path.join(msrc_root, "SegmentationClass",
                                                ids[i] + ".png")))
      np.testing.assert_array_equal(r["image"], img)
      np.testing.assert_array_equal(r["mask"], mask)
      present = set(np.unique(mask).tolist()) - {0, 255}
      assert set((np.flatnonzero(r["labels"]) + 1).tolist()) == present
      assert r["labels"].shape == (15,)
    assert src[-1]["id"] == ids[-1]
    sizes = src.image_sizes()  # from build-time metadata, used by the eval pipeline
    assert sizes.shape == (len(ids), 2)
    for i in (0, len(ids) - 1):
      assert tuple(sizes[i]) == src[i]["image"].shape[:2]
    with pytest.raises(IndexError):
      src[len(ids)]


def test_msrc_no_foreground_count(msrc):
  cfg, _ = msrc
  src = sources.get_source(cfg, "train")
  recs = src.__getitems__(list(range(len(src))))
  assert sum(int(r["labels"].sum() == 0) for r in recs) == 45


def test_msrc_prepare_is_idempotent_and_fast(msrc):
  cfg, meta = msrc
  marker = os.path.join(meta.path, "meta.json")
  mtime = os.path.getmtime(marker)
  t = time.perf_counter()
  assert sources.prepare(cfg) == meta
  assert time.perf_counter() - t < 1.0
  assert os.path.getmtime(marker) == mtime


def test_source_is_grain_compatible_and_picklable(msrc):
  import grain  # pylint: disable=g-import-not-at-top
  cfg, _ = msrc
  src = sources.get_source(cfg, "val")
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[3]["image"], src[3]["image"])
  ds = grain.MapDataset.source(src).map(lambda r: r["id"])
  assert len(ds) == 59 and ds[2] == src[2]["id"]
  with pytest.raises(ValueError, match=r"available splits: \['train', 'val'\]"):
    sources.get_source(cfg, "train_aug")


# ---------------------------------------------------------------------------------------
# A miniature VOC 2012 + SBD tree.

IDS = [f"2007_00000{i}" for i in range(1, 8)]


def _random_mask(rng, h, w, ids):
  m = np.zeros((h, w), np.uint8)
  for k in ids:
    y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
    m[y:y + 6, x:x + 8] = k
  m[0, :] = 255  # VOC-style void boundary
  return m


def _make_voc_sbd(root, rng):
  """VOC (palette SegmentationClass for ids 1-3) + SBD (grey SegmentationClassAug for 1-7)."""
  for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
            "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  masks = {}
  for n, id_ in enumerate(IDS):
    h, w = 20 + n, 30 - n
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(root, "JPEGImages", id_ + ".jpg"), quality=90)
    voc = _random_mask(rng, h, w, [1 + n, 20 - n])
    sbd = voc.copy() if n >= 3 else _random_mask(rng, h, w, [5])  # 1-3: Aug differs on purpose
    if n < 3:
      palette.save_palette_png(os.path.join(root, "SegmentationClass", id_ + ".png"), voc)
      masks[id_] = voc  # SegmentationClass wins where both exist
    else:
      masks[id_] = sbd
    if n == 6:  # an RGB mask in the VOC colour map
      Image.fromarray(palette.voc_palette()[sbd]).save(
          os.path.join(root, "SegmentationClassAug", id_ + ".png"))
    else:
      Image.fromarray(sbd, mode="L").save(os.path.join(root, "SegmentationClassAug", id_ + ".png"))
  seg = os.path.join(root, "ImageSets", "Segmentation")
  with open(os.path.join(seg, "train.txt"), "w") as f:
    f.write("2007_000001\n2007_000002\n")
  with open(os.path.join(seg, "val.txt"), "w") as f:
    f.write("2007_000003\n\n")
  with open(os.path.join(seg, "trainval.txt"), "w") as f:
    f.write("2007_000001\n2007_000002\n2007_000003\n")
  with open(os.path.join(seg, "train_aug.txt"), "w") as f:  # DeepLab list format
    for id_ in IDS[:2] + IDS[3:]:
      f.write(f"/JPEGImages/{id_}.jpg /SegmentationClassAug/{id_}.png\n")
  return masks


def test_voc_sbd_tree(tmp_path):
  root = str(tmp_path / "VOC2012")
  masks = _make_voc_sbd(root, np.random.default_rng(0))
  cfg = _data_config("voc", root=root, cache_dir=str(tmp_path / "cache"),
                     train_split="train_aug")
  meta = sources.prepare(cfg)
  assert meta.class_names == voc_builder.VOC_CLASSES and meta.num_classes == 21
  assert meta.splits == {"train": 2, "train_aug": 6, "trainval": 3, "val": 1}
  info = sources.builders.read_meta(meta.path)
  assert info["source"]["records"] == 7  # each image stored once
  assert info["source"]["mask_dirs"] == {"SegmentationClass": 3, "SegmentationClassAug": 4}
  for split in meta.splits:
    src = sources.get_source(cfg, split)
    ids = [line.split()[0].split("/")[-1].split(".")[0] for line in _read_split(root, split)]
    assert [src[i]["id"] for i in range(len(src))] == ids
    for i, id_ in enumerate(ids):
      r = src[i]
      np.testing.assert_array_equal(r["mask"], masks[id_])
      np.testing.assert_array_equal(
          r["image"], np.asarray(Image.open(os.path.join(root, "JPEGImages", id_ + ".jpg"))))
      want = np.zeros(20, np.uint8)
      for k in set(np.unique(masks[id_]).tolist()) - {0, 255}:
        want[k - 1] = 1
      np.testing.assert_array_equal(r["labels"], want)
  st = sources.split_statistics(cfg, "train_aug")
  assert st["images"] == 6 and st["labels_per_image"] == {2: 6}

  # A changed folder is rebuilt into a new folder, never silently reused.
  with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "a") as f:
    f.write("2007_000004\n")
  meta2 = sources.prepare(cfg)
  assert meta2.path != meta.path and meta2.splits["train"] == 3
  assert sources.get_source(cfg, "train")[2]["id"] == "2007_000004"
  # New mtimes on every file (a fresh copy at the same root) keep the dataset: the key
  # names the files' content, not their timestamps.
  for folder, _, names in os.walk(root):
    for n in names:
      p = os.path.join(folder, n)
      os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 10**9))
  assert sources.prepare(cfg).path == meta2.path
  # A mask rewritten with other content is another dataset.
  p = os.path.join(root, "SegmentationClassAug", "2007_000005.png")
  with Image.open(p) as im:
    arr = np.asarray(im).copy()
  arr[0, 0] = 255 if arr[0, 0] != 255 else 0
  Image.fromarray(arr).save(p)
  assert sources.prepare(cfg).path not in (meta.path, meta2.path)
  # The same content under another root is another dataset.
  shutil.copytree(root, str(tmp_path / "copy"))
  cfg_copy = _data_config("voc", root=str(tmp_path / "copy"), cache_dir=str(tmp_path / "cache"))
  assert sources.prepare(cfg_copy).path not in (meta.path, meta2.path)


def test_class_names_from_config(tmp_path):
  root = str(tmp_path / "VOC2012")
  _make_voc_sbd(root, np.random.default_rng(1))
  names = ("bg",) + tuple(f"c{i}" for i in range(1, 21))
  cfg = _data_config("voc", root=root, cache_dir=str(tmp_path / "cache"), class_names=names)
  meta = sources.prepare(cfg)
  assert meta.class_names == names and meta.num_classes == 21
  # Fewer classes than the masks use: every example is bad -> clear error.
  cfg.class_names = ("bg", "a", "b")
  with pytest.raises(sources.BadInputError,
                     match=r"num_classes=3 \(classes from data.class_names\)"):
    sources.prepare(cfg)


def test_exported_synthetic_layout_reads_back(tmp_path):
  root = str(tmp_path / "syn")
  synthetic.export_voc_layout(root, 3, 2, 40, seed=2)
  cfg = _data_config("voc", root=root, cache_dir=str(tmp_path / "cache"))
  meta = sources.prepare(cfg)
  assert meta.class_names == synthetic.SYNTHETIC_CLASSES and meta.splits == {"train": 3, "val": 2}
  for split, n in meta.splits.items():
    src = sources.get_source(cfg, split)
    for r, want in zip((src[i] for i in range(n)), synthetic.generate_split(split, n, 40, 2)):
      assert r["id"] == want["id"]
      np.testing.assert_array_equal(r["mask"], want["mask"])
      np.testing.assert_array_equal(r["labels"], want["labels"])
