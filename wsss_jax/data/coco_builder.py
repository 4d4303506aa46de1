"""The `coco` builder: COCO instance annotations -> semantic masks and image labels.

Layout read (paths relative to `data.root`; COCO 2014 and 2017 both have it):

    annotations/instances_<split>.json   e.g. instances_train2014.json, instances_val2014.json
    <split>/<file_name>                  e.g. train2014/COCO_train2014_000000000009.jpg

Every `instances_<split>.json` is a split (`data.train_split=train2014`, ...).

Decisions:
- Classes: background (id 0) + the JSON's categories in increasing category id, so COCO's
  80 categories (ids 1..90 with gaps) become class ids 1..80: 81 classes. Every split file
  must list the same categories.
- Masks: annotations are decoded with pycocotools (polygons, uncompressed RLE, compressed
  RLE). Objects are painted largest first, so a small object lying on a larger one stays
  visible (the usual COCO-to-semantic conversion). Crowd regions (`iscrowd=1`) become
  255 (ignore) wherever no single object was painted: their pixels are neither trusted
  positives nor negatives.
- Image-level labels are the foreground ids present in the mask (CONVENTIONS.md), so a
  class seen only as a crowd region is not a label. Images without annotations are kept
  (all background, an all-zero label vector).
- Storage and checks follow voc_builder: images decoded once at build time, one tfds split
  per COCO split, `BadInputError` naming the file (and the JSON key, image or annotation
  id) for a missing key, an unknown category, a missing or unreadable image, an image
  whose size differs from the JSON, or an RLE of the wrong size;
  `data.on_bad_input=skip` drops the image and records why.
- Cache key: real root path + a fingerprint of the annotation files and the image
  folders' listings (name, size, mtime), so a changed folder is rebuilt.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Any, Callable

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from wsss_jax.data import builders
from wsss_jax.data import voc_builder
from wsss_jax.ops import IGNORE_INDEX

ANNOTATION_DIR = "annotations"
_INSTANCES = re.compile(r"^instances_(?P<split>[A-Za-z0-9_]+)\.json$")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("image_id", "category_id", "segmentation")

# The 80 COCO 2014/2017 categories (id, name); the JSON files are authoritative, this is
# for tests and documentation.
COCO_CATEGORIES = tuple(enumerate((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None,
    "backpack", "umbrella", None, None, "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", None,
    "dining table", None, None, "toilet", None, "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"), 1))
COCO_CATEGORIES = tuple((i, n) for i, n in COCO_CATEGORIES if n is not None)


def _mask_api():
  try:
    from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("data.name='coco' needs pycocotools: pip install pycocotools") from e
  return mask_utils


@dataclasses.dataclass(frozen=True)
class CocoLayout:
  """What `scan` found: split -> annotation file and image folder (cheap listing)."""
  root: str
  annotation_files: dict[str, str]
  image_dirs: dict[str, str]
  fingerprint: str

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.annotation_files)


def scan(root: str) -> CocoLayout:
  """Finds `annotations/instances_<split>.json` + `<split>/` pairs and fingerprints them."""
  if not root:
    raise builders.BadInputError(
        "data.root is empty: the coco dataset needs --config.data.root=<COCO folder>")
  real = os.path.realpath(os.path.expanduser(root))
  ann_dir = os.path.join(real, ANNOTATION_DIR)
  if not os.path.isdir(ann_dir):
    raise builders.BadInputError(
        f"{ann_dir}: missing; a COCO root needs {ANNOTATION_DIR}/instances_<split>.json "
        "and <split>/ image folders")
  files, dirs = {}, {}
  h = hashlib.sha256(repr(builders.FORMAT_VERSION).encode())
  for name in sorted(os.listdir(ann_dir)):
    m = _INSTANCES.match(name)
    if not m:
      continue
    split, path = m.group("split"), os.path.join(ann_dir, name)
    image_dir = os.path.join(real, split)
    if not os.path.isdir(image_dir):
      raise builders.BadInputError(f"{image_dir}: missing; {path} needs its images there")
    st = os.stat(path)
    h.update(repr((name, st.st_size, st.st_mtime_ns)).encode())
    with os.scandir(image_dir) as it:
      listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it
                       if e.is_file())
    h.update(repr((split, listing)).encode())
    files[split], dirs[split] = path, image_dir
  if not files:
    raise builders.BadInputError(f"{ann_dir}: no instances_<split>.json files")
  return CocoLayout(root=real, annotation_files=files, image_dirs=dirs,
                    fingerprint=h.hexdigest())


def coco_key(layout: CocoLayout) -> str:
  """Prepared-folder name: root basename + hash of the real root + fingerprint."""
  base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(layout.root))[:40] or "root"
  root_hash = hashlib.sha256(layout.root.encode()).hexdigest()[:8]
  return f"{base}-{root_hash}-{layout.fingerprint[:16]}"


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
  if not isinstance(obj, dict):
    raise builders.BadInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in keys if k not in obj]
  if missing:
    raise builders.BadInputError(f"{where}: missing key(s) {missing}")


def load_annotations(path: str) -> dict[str, Any]:
  """Reads an instances JSON and checks its top-level structure and categories."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise builders.BadInputError(f"{path}: cannot read COCO annotations ({e})") from e
  _require(data, ("images", "annotations", "categories"), path)
  for i, cat in enumerate(data["categories"]):
    _require(cat, ("id", "name"), f"{path}: categories[{i}]")
  if not data["categories"]:
    raise builders.BadInputError(f"{path}: 'categories' is empty")
  return data


def class_names_of(categories: list[dict[str, Any]]) -> tuple[tuple[str, ...], dict[int, int]]:
  """(names with background first, {category id: class id}) in increasing category id."""
  cats = sorted(categories, key=lambda c: int(c["id"]))
  ids = [int(c["id"]) for c in cats]
  if len(set(ids)) != len(ids):
    raise builders.BadInputError(f"duplicate category ids {sorted(ids)}")
  if len(cats) > 254:
    raise builders.BadInputError(f"{len(cats)} categories; at most 254 fit a uint8 mask")
  return ("background",) + tuple(str(c["name"]) for c in cats), {
      cid: k + 1 for k, cid in enumerate(ids)}


def annotation_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
  """uint8 [H, W] 0/1 mask of one annotation (polygons, uncompressed or compressed RLE)."""
  mask_utils = _mask_api()
  try:
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
      polys = [p for p in segmentation if len(p) >= 6]
      if not polys:
        return np.zeros((height, width), np.uint8)
      rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
      size = [int(v) for v in segmentation.get("size", ())]
      if size != [height, width]:
        raise builders.BadInputError(f"{where}: RLE size {size} but the image is "
                                     f"{height}x{width} (HxW)")
      if isinstance(segmentation["counts"], list):  # uncompressed (crowd regions)
        rle = mask_utils.frPyObjects(segmentation, height, width)
      else:
        counts = segmentation["counts"]
        rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
      raise builders.BadInputError(f"{where}: 'segmentation' is neither a polygon list nor "
                                   "an RLE object with 'counts'")
    with warnings.catch_warnings():  # pycocotools' numpy-2 `__array__` notice, harmless
      warnings.simplefilter("ignore", DeprecationWarning)
      decoded = mask_utils.decode(rle)
    return np.asarray(decoded, np.uint8).reshape(height, width)
  except builders.BadInputError:
    raise
  except Exception as e:  # pycocotools raises TypeError/ValueError on malformed input
    raise builders.BadInputError(f"{where}: cannot decode segmentation ({e})") from e


def semantic_mask(annotations: list[dict[str, Any]], height: int, width: int,
                  class_of: dict[int, int], where: str) -> np.ndarray:
  """uint8 [H, W] class ids: objects largest first, crowd = 255 where no object is."""
  mask = np.zeros((height, width), np.uint8)
  crowd = np.zeros((height, width), bool)
  objects = []
  for ann in annotations:
    at = f"{where} annotation id {ann.get('id', '?')}"
    _require(ann, _ANNOTATION_KEYS, at)
    cid = int(ann["category_id"])
    if cid not in class_of:
      raise builders.BadInputError(f"{at}: category_id {cid} is not in 'categories'")
    m = annotation_mask(ann["segmentation"], height, width, at).astype(bool)
    if int(ann.get("iscrowd", 0)):
      crowd |= m
    else:
      objects.append((int(m.sum()), class_of[cid], m))
  for _, class_id, m in sorted(objects, key=lambda o: -o[0]):
    mask[m] = class_id
  painted = np.zeros((height, width), bool)
  for _, _, m in objects:
    painted |= m
  mask[crowd & ~painted] = IGNORE_INDEX
  return mask


class WsssCoco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the checked images of each COCO split as one tfds split, in image-id order."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # see voc_builder.WsssVoc

  def __init__(self, *, num_classes: int, items: dict[str, list[tuple]],
               on_bad: Callable[[str], None], stats: builders.StatsCollector,
               written: dict[str, list[str]], workers: int, **kwargs):
    self._num_classes = num_classes
    self._items = items        # split -> [(id, image path, h, w, annotations, class_of)]
    self._on_bad = on_bad
    self._stats = stats
    self._written = written
    self._workers = workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="COCO instances as semantic masks; see coco_builder.py",
        features=builders.record_features(self._num_classes), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._items}

  def _load(self, item: tuple):
    id_, path, height, width, anns, class_of, where = item
    image = voc_builder.read_image(path)
    if image.shape[:2] != (height, width):
      raise builders.BadInputError(
          f"{path}: image is {image.shape[0]}x{image.shape[1]} (HxW) but {where} says "
          f"{height}x{width}")
    mask = semantic_mask(anns, height, width, class_of, where)
    rec = {"id": id_, "image": image, "mask": mask,
           "labels": builders.labels_from_mask(mask, self._num_classes)}
    return builders.encode_record(rec, self._num_classes)

  def _generate_examples(self, split: str):
    written = self._written.setdefault(split, [])
    for _, result, error in builders.bounded_map(self._load, self._items[split],
                                                 self._workers):
      if error is not None:
        self._on_bad(str(error))
        continue
      rec, row = result
      self._stats.add_row(split, row)
      key = len(written)
      written.append(rec["id"])
      yield key, rec
    if not written:
      raise builders.BadInputError(f"split {split!r}: no usable images")


def _split_items(layout: CocoLayout, split: str, data: dict[str, Any],
                 class_of: dict[int, int], on_bad: Callable[[str], None]) -> list[tuple]:
  """(id, image path, h, w, annotations, class_of, where) per image, in image-id order."""
  path = layout.annotation_files[split]
  by_image: dict[Any, list] = collections.defaultdict(list)
  for i, ann in enumerate(data["annotations"]):
    _require(ann, _ANNOTATION_KEYS, f"{path}: annotations[{i}] (id {ann.get('id', '?')})"
             if isinstance(ann, dict) else f"{path}: annotations[{i}]")
    by_image[ann["image_id"]].append(ann)
  items, seen = [], set()
  for i, img in enumerate(data["images"]):
    where = f"{path}: images[{i}]"
    _require(img, _IMAGE_KEYS, where)
    if img["id"] in seen:
      on_bad(f"{where}: image id {img['id']} is listed again")
      continue
    seen.add(img["id"])
    image_path = os.path.join(layout.image_dirs[split], str(img["file_name"]))
    if not os.path.isfile(image_path):
      on_bad(f"{image_path}: image missing (file_name of image id {img['id']} in {path})")
      continue
    id_ = os.path.splitext(os.path.basename(str(img["file_name"])))[0]
    items.append((img["id"], (id_, image_path, int(img["height"]), int(img["width"]),
                              by_image.get(img["id"], []), class_of,
                              f"{path} (image id {img['id']})")))
  unknown = set(by_image) - seen
  if unknown:
    on_bad(f"{path}: annotations refer to image ids {sorted(unknown)[:5]} not in 'images'")
  return [item for _, item in sorted(items, key=lambda t: t[0])]


def build_coco(folder: str, layout: CocoLayout, on_bad_input: str,
               workers: int | None = None) -> None:
  """Checks and writes every split of `layout` into the prepared folder `folder`."""
  problems: list[str] = []
  on_bad = builders.bad_input_handler(on_bad_input, problems)

  names, class_of, items, first = None, None, {}, None
  for split, path in layout.annotation_files.items():
    data = load_annotations(path)
    split_names, split_class_of = class_names_of(data["categories"])
    if names is None:
      names, class_of, first = split_names, split_class_of, path
    elif (split_names, split_class_of) != (names, class_of):
      raise builders.BadInputError(f"{path}: its categories differ from those of {first}; "
                                   "every split must use the same categories")
    items[split] = _split_items(layout, split, data, class_of, on_bad)
    del data  # the train JSON is large; keep only what the build needs
  num_classes = len(names)
  workers = workers or builders.default_workers()

  def build(tmp: str):
    stats = builders.StatsCollector(num_classes)
    written: dict[str, list[str]] = {}
    builder = WsssCoco(num_classes=num_classes, items=items, on_bad=on_bad, stats=stats,
                       written=written, workers=workers, data_dir=tmp)
    builders.run_tfds_build(builder)
    splits = {s: {"tfds_split": s, "count": len(written[s]),
                  "skipped": len(items[s]) - len(written[s]),
                  "annotation_file": layout.annotation_files[s]} for s in items}
    meta = {"format": builders.FORMAT_VERSION, "name": "coco", "class_names": list(names),
            "class_source": first, "tfds_dir": os.path.relpath(os.fspath(builder.data_path),
                                                               tmp),
            "splits": splits,
            "source": {"root": layout.root, "fingerprint": layout.fingerprint},
            "skipped": problems}
    if problems:
      logging.warning("%s: skipped %d bad inputs (on_bad_input='skip').", layout.root,
                      len(problems))
    return meta, stats.arrays()

  logging.info("Building COCO dataset %s (splits %s, %d classes) into %s", layout.root,
               sorted(items), num_classes, folder)
  builders.build_atomically(folder, build)
