"""Public entry points of the data layer: prepare a dataset, get grain sources, statistics.

    meta = prepare(config.data)                  # builds once (array_record), then fast
    src = get_source(config.data, "train")       # grain random-access source
    rec = src[0]  # {'id': str, 'image': uint8 [H, W, 3], 'mask': uint8 [H, W],
                  #  'labels': uint8 [C-1]}  (docs/CONVENTIONS.md)

`data_cfg` is the `config.data` block of configs/common.py. Keys read: name, root,
cache_dir, on_bad_input, class_names, synthetic.*, and train_split / sweep_split /
val_split (checked to exist before anything is built).

Prepared datasets live under `data.cache_dir` ('' -> $WSSS_JAX_CACHE or ~/.cache/wsss_jax),
in `synthetic/<parameters+hash>/`, `voc/<root name>-<root hash>-<fingerprint>/` or
`coco/<same>/`; see builders.py, voc_builder.py and coco_builder.py for the layout, the
cache keys and the bad-input rules.
"""
from __future__ import annotations

import dataclasses
import operator
import os
import threading
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from wsss_jax.data import builders
from wsss_jax.data import coco_builder
from wsss_jax.data import voc_builder

BadInputError = builders.BadInputError
DATASETS = ("synthetic", "voc", "coco")
_SPLIT_KEYS = ("train_split", "sweep_split", "val_split")
# Content-digest memos of VOC roots (`content_digests`), under the cache root: a side
# cache, kept out of the prepared-dataset folders.
DIGEST_MEMO_DIR = ".digests"


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What a prepared dataset holds.

  Attributes:
    name: `data.name` (synthetic | voc).
    class_names: background first.
    num_classes: C == len(class_names), background included.
    splits: split name -> number of records.
    path: the prepared folder (for logs; '' when unknown).
  """
  name: str
  class_names: tuple[str, ...]
  num_classes: int
  splits: dict[str, int]
  path: str = ""


def default_cache_dir() -> str:
  """Same rule as configs/common.py:default_cache_dir (configs/ is not an installed package)."""
  return os.environ.get("WSSS_JAX_CACHE", os.path.expanduser("~/.cache/wsss_jax"))


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  try:
    return cfg[key]
  except (KeyError, AttributeError):
    return default


def _configured_class_names(data_cfg: Any) -> tuple[str, ...]:
  """data.class_names as a tuple ('a,b,c' from a command-line override is split)."""
  names = _get(data_cfg, "class_names", ()) or ()
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  return tuple(names)


def _on_bad_input(data_cfg: Any) -> str:
  mode = _get(data_cfg, "on_bad_input", "error")
  if mode not in ("error", "skip"):
    raise ValueError(f"data.on_bad_input must be 'error' or 'skip', got {mode!r}")
  return mode


def _check_configured_splits(data_cfg: Any, available: Sequence[str],
                             where: Callable[[str], str]) -> None:
  for key in _SPLIT_KEYS:
    split = _get(data_cfg, key)
    if split and split not in available:
      raise ValueError(f"data.{key}={split!r}: no such split {where(split)}; available: "
                       f"{sorted(available)}")


def _locate(data_cfg: Any) -> tuple[str, str, Callable[[str], None]]:
  """Where the prepared dataset of `data_cfg` lives and what it is made of, without building.

  Returns `(folder under the cache, identity, build)`: `identity` names the content (the
  synthetic generator's parameters, or a hash of the VOC/COCO root's files; not where the
  root or the cache are), `build(folder)` prepares it. Scans the root (a listing).
  """
  name = _get(data_cfg, "name")
  mode = _on_bad_input(data_cfg)
  if name == "synthetic":
    params = builders.SyntheticParams.from_config(data_cfg.synthetic)
    _check_configured_splits(data_cfg, ("train", "val"), lambda _: "in the synthetic dataset")
    key = builders.synthetic_key(params)
    return (os.path.join("synthetic", key), f"synthetic/{key}",
            lambda folder: builders.build_synthetic(folder, params))
  if name == "voc":
    cache = os.path.expanduser(_get(data_cfg, "cache_dir") or default_cache_dir())
    layout = voc_builder.scan(_get(data_cfg, "root", ""), _configured_class_names(data_cfg),
                              digest_memo_dir=os.path.join(cache, DIGEST_MEMO_DIR, "voc"))
    split_dir = os.path.join(layout.root, voc_builder.SPLIT_DIR)
    _check_configured_splits(data_cfg, layout.splits,
                             lambda s: f"(missing split file {split_dir}/{s}.txt)")
    return (os.path.join("voc", voc_builder.voc_key(layout)),
            f"voc/{layout.fingerprint[:16]}",
            lambda folder: voc_builder.build_voc(folder, layout, mode))
  if name == "coco":
    layout = coco_builder.scan(_get(data_cfg, "root", ""))
    _check_configured_splits(data_cfg, layout.splits, lambda s: (
        f"(no {os.path.join(layout.root, coco_builder.ANNOTATION_DIR)}/instances_{s}.json)"))
    return (os.path.join("coco", coco_builder.coco_key(layout)),
            f"coco/{layout.fingerprint[:16]}",
            lambda folder: coco_builder.build_coco(folder, layout, mode))
  raise ValueError(f"Unknown data.name={name!r}; accepted: {list(DATASETS)}")


def dataset_identity(data_cfg: Any) -> str:
  """The content identity of `data_cfg`'s dataset (see `_locate`), e.g. `voc/3fa2...`.

  The `data` stage's fingerprint (`stages/registry.py`) is built on it, so results made
  from the same files match wherever the root or the cache are.

  Raises:
    BadInputError: a root that is missing or not in the VOC/COCO layout.
    ValueError: unknown dataset, or a configured split that does not exist.
  """
  return _locate(data_cfg)[1]


def _resolve(data_cfg: Any) -> tuple[str, dict[str, Any]]:
  """Builds the prepared dataset if needed; returns (folder, meta.json contents)."""
  mode = _on_bad_input(data_cfg)
  cache = os.path.expanduser(_get(data_cfg, "cache_dir") or default_cache_dir())
  where, _, build = _locate(data_cfg)
  folder = os.path.join(cache, where)
  if not builders.is_complete(folder):
    build(folder)
  meta = builders.read_meta(folder)
  if mode == "error" and meta.get("skipped"):
    shown = "\n  ".join(meta["skipped"][:10])
    raise BadInputError(
        f"The prepared dataset {folder} was built with on_bad_input='skip' and skipped "
        f"{len(meta['skipped'])} bad inputs; with on_bad_input='error' they are errors:\n  "
        f"{shown}")
  logging.log_first_n(logging.INFO, "Using prepared dataset %s", 4, folder)
  return folder, meta


def _class_names(data_cfg: Any, meta: dict[str, Any]) -> tuple[str, ...]:
  names = tuple(meta["class_names"])
  configured = _configured_class_names(data_cfg)
  if meta["name"] == "synthetic" and configured:
    if len(configured) != len(names):
      raise ValueError(f"data.class_names has {len(configured)} names; the synthetic dataset "
                       f"has {len(names)} classes {names}")
    names = configured  # display names only; the data does not depend on them
  return names


def _to_meta(data_cfg: Any, folder: str, meta: dict[str, Any]) -> DatasetMeta:
  names = _class_names(data_cfg, meta)
  return DatasetMeta(name=meta["name"], class_names=names, num_classes=len(names),
                     splits={s: int(v["count"]) for s, v in meta["splits"].items()},
                     path=folder)


def prepare(data_cfg: Any) -> DatasetMeta:
  """Builds the dataset of `data_cfg` if it is not prepared yet and returns its meta.

  Idempotent; when prepared it costs a folder listing (voc) or nothing (synthetic).

  Raises:
    BadInputError: (a ValueError) naming the file and problem, in on_bad_input='error' mode.
    ValueError: unknown dataset, or a configured split that does not exist.
  """
  folder, meta = _resolve(data_cfg)
  return _to_meta(data_cfg, folder, meta)


def get_meta(data_cfg: Any) -> DatasetMeta:
  """The DatasetMeta of `data_cfg` (prepares the dataset first if needed)."""
  return prepare(data_cfg)


def _split_info(folder: str, meta: dict[str, Any], split: str) -> dict[str, Any]:
  if split not in meta["splits"]:
    hint = ""
    if meta["name"] == "voc":
      path = os.path.join(meta["source"]["root"], voc_builder.SPLIT_DIR, f"{split}.txt")
      hint = (f"; {path} was dropped as bad input (see meta.json 'skipped')"
              if os.path.isfile(path) else f"; there is no {path}")
    raise ValueError(f"Unknown split {split!r} for dataset {meta['name']!r} ({folder}); "
                     f"available splits: {sorted(meta['splits'])}{hint}")
  return meta["splits"][split]


_builders: dict[str, tfds.core.DatasetBuilder] = {}
_builders_lock = threading.Lock()


def _builder(builder_dir: str) -> tfds.core.DatasetBuilder:
  """The tfds builder of a prepared folder, read once per process.

  Each read logs "Load dataset info from ..." and parses its JSON files; stages open
  several sources of one dataset (and grain's threads open them at once: hence the
  lock), so without this the log repeats the line a dozen times. Prepared folders never
  change once complete (builders.build_atomically), so the cached builder stays valid.
  """
  with _builders_lock:
    if builder_dir not in _builders:
      _builders[builder_dir] = tfds.builder_from_directory(builder_dir)
    return _builders[builder_dir]


class RecordSource:
  """A grain random-access source (len, __getitem__) over one split of a prepared dataset.

  Items: {'id': str, 'image': uint8 [H, W, 3], 'mask': uint8 [H, W], 'labels': uint8 [C-1]}.
  Item i is the i-th record of the split. Picklable (for grain workers): the tfds reader
  opens lazily in each process.
  """

  def __init__(self, builder_dir: str, tfds_split: str, count: int,
               indices: np.ndarray | None, description: str, sizes: np.ndarray | None = None):
    self._builder_dir = builder_dir
    self._tfds_split = tfds_split
    self._count = int(count)
    self._indices = indices
    self._description = description
    self._sizes = sizes
    self._src = None

  def image_sizes(self) -> np.ndarray:
    """(H, W) of every record in order, int64 [N, 2], from build-time metadata (no reads)."""
    if self._sizes is None:
      return np.array([self[i]["image"].shape[:2] for i in range(self._count)],
                      np.int64).reshape(-1, 2)
    return self._sizes.copy()

  def _source(self):
    if self._src is None:
      self._src = _builder(self._builder_dir).as_data_source(self._tfds_split)
    return self._src

  def __len__(self) -> int:
    return self._count

  def _record_index(self, index: int) -> int:
    i = operator.index(index)
    if i < 0:
      i += self._count
    if not 0 <= i < self._count:
      raise IndexError(f"index {index} out of range for {self._description} "
                       f"({self._count} records)")
    return int(self._indices[i]) if self._indices is not None else i

  @staticmethod
  def _decode(rec: dict[str, Any]) -> dict[str, Any]:
    id_ = rec["id"]
    # Arrays decoded from bytes are read-only; give callers ordinary writable arrays.
    return {"id": id_.decode("utf-8") if isinstance(id_, bytes) else str(id_),
            "image": np.array(rec["image"], np.uint8),
            "mask": np.array(rec["mask"], np.uint8),
            "labels": np.array(rec["labels"], np.uint8)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._decode(self._source()[self._record_index(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    recs = self._source().__getitems__([self._record_index(i) for i in indices])
    return [self._decode(r) for r in recs]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_src"] = None
    return state

  def __repr__(self) -> str:
    return f"RecordSource({self._description}, {self._count} records)"


def get_source(data_cfg: Any, split: str) -> RecordSource:
  """The grain-compatible source of `split` (prepares the dataset first if needed).

  Raises:
    ValueError: for an unknown split, listing the available ones.
  """
  folder, meta = _resolve(data_cfg)
  info = _split_info(folder, meta, split)
  arrays = builders.read_arrays(folder)
  indices = arrays[f"indices__{split}"] if info.get("indexed") else None
  sizes = arrays[f"hw__{info['tfds_split']}"]
  sizes = sizes[indices] if indices is not None else sizes[:info["count"]]
  return RecordSource(os.path.join(folder, meta["tfds_dir"]), info["tfds_split"],
                      info["count"], indices, f"{meta['name']}:{split}", sizes)


def split_statistics(data_cfg: Any, split: str) -> dict[str, Any]:
  """Statistics of one split, from numbers stored at build time (no decoding).

  Returns a JSON-able dict: images, skipped (bad inputs dropped from this split),
  class_names, images_per_class (images containing each class, background included),
  labels_per_image ({number of foreground labels: images}), no_foreground_images,
  mean_image_size / min_image_size / max_image_size ([H, W] pixels), pixel_fraction (per
  class, of all pixels) and ignore_fraction (pixels = 255).
  """
  folder, meta = _resolve(data_cfg)
  info = _split_info(folder, meta, split)
  names = _class_names(data_cfg, meta)
  num_classes = len(names)
  arrays = builders.read_arrays(folder)
  tsplit = info["tfds_split"]
  rows = arrays.get(f"indices__{split}", np.arange(info["count"]))
  hw = arrays[f"hw__{tsplit}"][rows]
  pixels = arrays[f"pixels__{tsplit}"][rows]
  present = pixels[:, :num_classes] > 0
  num_fg = present[:, 1:].sum(axis=1)
  total = max(int(pixels.sum()), 1)
  hist = np.bincount(num_fg, minlength=1)
  return {
      "split": split,
      "images": int(len(rows)),
      "skipped": int(info.get("skipped", 0)),
      "class_names": list(names),
      "images_per_class": {n: int(c) for n, c in zip(names, present.sum(axis=0))},
      "labels_per_image": {int(k): int(c) for k, c in enumerate(hist) if c},
      "no_foreground_images": int(hist[0]),
      "mean_image_size": [float(hw[:, 0].mean()), float(hw[:, 1].mean())],
      "min_image_size": [int(hw[:, 0].min()), int(hw[:, 1].min())],
      "max_image_size": [int(hw[:, 0].max()), int(hw[:, 1].max())],
      "pixel_fraction": {n: float(c) / total
                         for n, c in zip(names, pixels[:, :num_classes].sum(axis=0))},
      "ignore_fraction": float(pixels[:, num_classes].sum()) / total,
  }
