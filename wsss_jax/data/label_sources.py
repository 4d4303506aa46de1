"""Record sources whose `mask` is a label other than the ground truth, and label PNGs.

- `read_label(path)`, `write_label(directory, id, label)`: label PNGs (palette indices =
  class ids, 255 = unsure), `<directory>/<id>.png`.
- `PseudoLabelSource`: `mask` = the pseudo-label PNG of the same id (the segmentation
  stage, SPML's bootstrapped classifiers).
- `SPMLTrainSource`: SPML's training records: `mask` = its training label, plus
  `superpixels`.
- `train_source(config, workdir, base)`: the source a method trains on; a method that needs
  more than the dataset's records supplies it here (`TRAIN_SOURCES`, keyed by
  `config.method`; SPML).

All sources are picklable (grain workers): they hold a base source and folder paths.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections as mlc
import numpy as np
from PIL import Image

from wsss_jax import fs
from wsss_jax.data import palette
from wsss_jax.data import superpixels
from wsss_jax.data import weak_labels
from wsss_jax.ops import IGNORE_INDEX


def read_label(path: str) -> np.ndarray:
  """uint8 [H, W] class ids of a label PNG (palette indices)."""
  try:
    with fs.open_file(path, "rb") as f:
      return np.asarray(Image.open(f), np.uint8)
  except OSError as e:
    raise ValueError(f"{path}: unreadable pseudo-label ({e}); delete it to recompute") from e


def label_path(directory: str, image_id: str) -> str:
  return os.path.join(directory, f"{image_id}.png")


def write_label(directory: str, image_id: str, label: np.ndarray) -> None:
  """Writes `label` [H, W] (class ids) to `directory/<id>.png` (VOC palette), atomically."""
  with fs.atomic_path(label_path(directory, image_id)) as tmp:
    palette.save_palette_png(tmp, label.astype(np.uint8))


class PseudoLabelSource:
  """A record source whose `mask` is the label PNG of the same id in `directory`.

  Picklable (grain workers): holds the base source and a folder path only.
  """

  def __init__(self, base: Any, workdir: str, directory: str | None = None):
    self.base = base
    self.workdir = workdir
    self.directory = directory or os.path.join(workdir, "pseudo")  # the pseudo stage's

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.base[index])
    path = label_path(self.directory, record["id"])
    if not fs.exists(path):
      raise FileNotFoundError(f"{path}: pseudo-label missing; run the pseudo stage first")
    label = read_label(path)
    if label.shape != record["mask"].shape:
      raise ValueError(f"{path}: pseudo-label is {label.shape}, image {record['id']} is "
                       f"{record['mask'].shape}")
    record["mask"] = label
    return record


class SPMLTrainSource:
  """Records whose `mask` is SPML's training label and that carry `superpixels`.

  `mask`: for tags, the CAM pseudo-label PNG with its "unsure" 255 pixels mapped to the
  SPML "unlabeled" id C; otherwise the weak label derived from the GT mask
  (`data/weak_labels.py`). `superpixels`: uint16 [H, W] (when `sp_dir`). Picklable.
  """

  def __init__(self, base: Any, num_classes: int, weak_label: str, label_dir: str | None,
               sp_dir: str | None):
    self.base, self.num_classes, self.weak_label = base, num_classes, weak_label
    self.label_dir, self.sp_dir = label_dir, sp_dir

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.base[index])
    shape = record["mask"].shape
    if self.weak_label == "tags":
      path = label_path(self.label_dir, record["id"])
      if not fs.exists(path):
        raise FileNotFoundError(f"{path}: CAM pseudo-label missing; run the pseudo stage "
                                "(on the baseline's CAMs) before training SPML")
      label = read_label(path)
      label = np.where(label == IGNORE_INDEX, self.num_classes, label)
    else:
      label = weak_labels.weak_label(record["mask"], self.weak_label, self.num_classes)
    if label.shape != shape:
      raise ValueError(f"label of {record['id']} is {label.shape}, image is {shape}")
    record["mask"] = label.astype(np.uint8)
    if self.sp_dir is not None:
      sp = superpixels.read(self.sp_dir, record["id"])
      if sp.shape != shape:
        raise ValueError(f"superpixels of {record['id']} are {sp.shape}, image is {shape}")
      record["superpixels"] = sp
    return record


def spml_train_source(config: mlc.ConfigDict, workdir: str, base: Any) -> SPMLTrainSource:
  """SPML's training source (computes the superpixels of the train split once if needed):
  labels from `workdir/<spml_labels.train_labels>` for tags, else from the GT masks."""
  from wsss_jax.data import sources  # pylint: disable=import-outside-toplevel
  meta = sources.get_meta(config.data)
  weak = config.data.get("weak_label", "tags")  # checked by methods.spml.loss_weights
  sp_cfg = config.spml.superpixels
  sp_dir = (None if sp_cfg.method == "none" else
            superpixels.ensure(config.data, sp_cfg, config.data.train_split))
  label_dir = os.path.join(workdir, config.spml_labels.train_labels)
  return SPMLTrainSource(base, meta.num_classes, weak, label_dir, sp_dir)


# config.method -> (config, workdir, base source) -> the source the method trains on.
TRAIN_SOURCES: dict[str, Callable[[mlc.ConfigDict, str, Any], Any]] = {
    "spml": spml_train_source,
}


def train_source(config: mlc.ConfigDict, workdir: str, base: Any) -> Any:
  """The records `config.method` trains on: `base` (the train split), or the method's own
  source built on it (`TRAIN_SOURCES`)."""
  make = TRAIN_SOURCES.get(config.method)
  return base if make is None else make(config, workdir, base)
