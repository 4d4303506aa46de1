"""The COCO builder on a miniature COCO-format dataset generated here: the 80 real
categories (81 classes), polygons, compressed and uncompressed RLE, crowd regions as
ignore, an image without annotations, bad inputs, and the coco configs."""
import copy
import glob
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from wsss_jax.data import coco_builder, sources  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 40, 48
CLASS_OF = {cid: k + 1 for k, (cid, _) in enumerate(coco_builder.COCO_CATEGORIES)}


def _rle_uncompressed(m: np.ndarray) -> dict:
  """COCO's uncompressed RLE, written independently of pycocotools: run lengths of the
  column-major pixels, starting with a run of zeros."""
  counts, prev, run = [], 0, 0
  for v in m.flatten(order="F"):
    if v != prev:
      counts.append(run)
      run, prev = 0, v
    run += 1
  counts.append(run)
  return {"size": list(m.shape), "counts": counts}


def _rle_compressed(m: np.ndarray) -> dict:
  rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode()}


def _box(r0, r1, c0, c1) -> np.ndarray:
  m = np.zeros((H, W), np.uint8)
  m[r0:r1, c0:c1] = 1
  return m


# Regions (rows, cols) of the annotations below.
DOG = _box(10, 20, 25, 40)
CROWD = _box(24, 38, 0, 48)           # overlaps the person polygon (rows 4..30)
SMALL = _box(15, 19, 15, 21)          # toothbrush on the car
KITE_CROWD = _box(5, 15, 5, 15)


def _annotations():
  cats = [{"id": cid, "name": name, "supercategory": "x"}
          for cid, name in coco_builder.COCO_CATEGORIES]
  poly = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]
  train = {
      "images": [{"id": 3, "file_name": "COCO_train2014_3.jpg", "height": H, "width": W},
                 {"id": 1, "file_name": "COCO_train2014_1.jpg", "height": H, "width": W},
                 {"id": 2, "file_name": "COCO_train2014_2.jpg", "height": H, "width": W}],
      "annotations": [
          {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
           "segmentation": poly(4, 4, 20, 30)},
          {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 0,
           "segmentation": _rle_compressed(DOG)},
          {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1,
           "segmentation": _rle_uncompressed(CROWD)},
          {"id": 13, "image_id": 3, "category_id": 90, "iscrowd": 0,
           "segmentation": _rle_compressed(SMALL)},
          {"id": 14, "image_id": 3, "category_id": 3, "iscrowd": 0,
           "segmentation": poly(2, 2, 46, 38)}],
      "categories": cats}
  val = {
      "images": [{"id": 7, "file_name": "COCO_val2014_7.jpg", "height": H, "width": W},
                 {"id": 8, "file_name": "COCO_val2014_8.jpg", "height": H, "width": W}],
      "annotations": [
          {"id": 20, "image_id": 7, "category_id": 6, "iscrowd": 0,
           "segmentation": poly(10, 10, 40, 30)},
          {"id": 21, "image_id": 8, "category_id": 38, "iscrowd": 1,
           "segmentation": _rle_uncompressed(KITE_CROWD)}],
      "categories": cats}
  return {"train2014": train, "val2014": val}


def _write(root, anns) -> str:
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  rng = np.random.default_rng(0)
  for split, data in anns.items():
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for img in data["images"]:
      path = os.path.join(root, split, img["file_name"])
      if not os.path.exists(path):
        Image.fromarray(rng.integers(0, 256, (img["height"], img["width"], 3),
                                     np.uint8)).save(path, quality=95)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
      json.dump(data, f)
  return str(root)


def _cfg(root, cache, **kw):
  spec = importlib.util.spec_from_file_location(
      "_wsss_configs_common", os.path.join(REPO, "configs", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  cfg = common.data_config("coco", runlocal=True)
  cfg.root, cfg.cache_dir = root, cache
  cfg.train_split, cfg.sweep_split, cfg.val_split = "train2014", "train2014", "val2014"
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_builds_semantic_masks_and_labels(tmp_path):
  root = _write(tmp_path / "coco", _annotations())
  cfg = _cfg(root, str(tmp_path / "cache"))
  meta = sources.prepare(cfg)
  assert meta.num_classes == 81 and meta.class_names[0] == "background"
  assert meta.class_names[1] == "person" and meta.class_names[80] == "toothbrush"
  assert meta.splits == {"train2014": 3, "val2014": 2}
  train = sources.get_source(cfg, "train2014")
  recs = [train[i] for i in range(3)]
  assert [r["id"] for r in recs] == ["COCO_train2014_1", "COCO_train2014_2",
                                     "COCO_train2014_3"]  # image-id order
  m = recs[0]["mask"]
  assert m.shape == (H, W) and recs[0]["image"].shape == (H, W, 3)
  assert (m[6:28, 6:18] == CLASS_OF[1]).all()              # polygon interior: person
  assert (m[DOG == 1] == CLASS_OF[18]).all() and CLASS_OF[18] == 17   # compressed RLE
  crowd_only = (CROWD == 1) & (m != CLASS_OF[1])
  assert crowd_only.sum() > 100 and (m[crowd_only] == 255).all()      # crowd -> ignore
  assert (m[26:29, 8:16] == CLASS_OF[1]).all()  # the object wins over the crowd region
  assert (m[0:2] == 0).all()
  labels = np.flatnonzero(recs[0]["labels"]) + 1
  assert labels.tolist() == [CLASS_OF[1], CLASS_OF[18]]
  assert not recs[1]["labels"].any() and (recs[1]["mask"] == 0).all()  # no annotations
  m3 = recs[2]["mask"]
  assert (m3[SMALL == 1] == 80).all()         # small object painted over the larger car
  assert (m3[25:35, 5:40] == CLASS_OF[3]).all()
  val = sources.get_source(cfg, "val2014")
  assert (val[0]["mask"][12:28, 12:38] == CLASS_OF[6]).all()
  kite = val[1]
  assert (kite["mask"][KITE_CROWD == 1] == 255).all() and not kite["labels"].any()
  stats = sources.split_statistics(cfg, "train2014")
  assert stats["images"] == 3 and stats["no_foreground_images"] == 1
  assert stats["ignore_fraction"] > 0
  # pycocotools agrees on the polygon (it is the decoder; this pins the call).
  ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
      [[4, 4, 20, 4, 20, 30, 4, 30]], H, W))).astype(bool)
  assert (m[ref & (CROWD == 0)] == CLASS_OF[1]).all()


def test_bad_inputs_name_file_and_key(tmp_path):
  anns = _annotations()
  root = _write(tmp_path / "coco", anns)
  cache = str(tmp_path / "cache")
  ann_file = os.path.join(root, "annotations", "instances_train2014.json")

  def build(data, **kw):
    with open(ann_file, "w") as f:
      json.dump(data, f)
    return sources.prepare(_cfg(root, cache, **kw))

  bad = copy.deepcopy(anns["train2014"])
  del bad["annotations"]
  with pytest.raises(sources.BadInputError, match=r"instances_train2014.json: missing key\(s\) "
                                                  r"\['annotations'\]"):
    build(bad)
  bad = copy.deepcopy(anns["train2014"])
  del bad["annotations"][1]["segmentation"]
  with pytest.raises(sources.BadInputError, match=r"annotations\[1\] \(id 11\): missing key"):
    build(bad)
  bad = copy.deepcopy(anns["train2014"])
  bad["annotations"][0]["category_id"] = 999
  with pytest.raises(sources.BadInputError, match="annotation id 10: category_id 999"):
    build(bad)
  bad = copy.deepcopy(anns["train2014"])
  bad["images"][0]["height"] = H + 1
  with pytest.raises(sources.BadInputError, match=r"COCO_train2014_3.jpg: image is 40x48"):
    build(bad)
  bad = copy.deepcopy(anns["train2014"])
  bad["images"].append({"id": 9, "file_name": "gone.jpg", "height": H, "width": W})
  with pytest.raises(sources.BadInputError, match="gone.jpg: image missing"):
    build(bad)
  meta = build(bad, on_bad_input="skip")  # the other images still build
  assert meta.splits["train2014"] == 3
  assert any("gone.jpg" in s for s in sources.builders.read_meta(meta.path)["skipped"])
  assert not glob.glob(os.path.join(cache, "coco", ".tmp-*"))


def test_coco_configs_build():
  configs = sorted(glob.glob(os.path.join(REPO, "configs", "coco", "*.py")))
  assert any(p.endswith("cam.py") for p in configs)
  for path in configs:
    spec = importlib.util.spec_from_file_location("_coco_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in (None, "runlocal"):
      c = module.get_config(arg)
      assert c.data.name == "coco", path
      assert (c.data.train_split, c.data.val_split) == ("train2014", "val2014"), path
      assert c.data.batch_size % 8 == 0 or arg, path
