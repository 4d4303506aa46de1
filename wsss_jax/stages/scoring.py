"""The one scorer of the pipeline: predict -> confusion matrix summed over processes -> IoU.

Every score the stages report goes through it: the threshold sweep (`sweep`), pseudo-label
files (`pseudo`, `spml_labels`, `spml_bootstrap`), the segmentation model (`evaluate`) and
SPML's classifiers and random-walk labels.

- `predicted(config, split, batch_fn, mesh, ...)`: runs a jittable `batch_fn` over the
  split (`inference.predict_split`, each process its own images) and scores its per-image
  `pred` [P, P] against the ground truth; `conf` outputs (per-image confusion matrices,
  e.g. one per sweep threshold) are summed as they are.
- `label_files(config, label_dir, split)`: label PNGs on disk against the ground truth,
  "unsure" (255) pixels counted as background, and separately over the labelled pixels.
- `iou(conf)`: per-class IoU and mIoU as JSON-ready floats.

Collective: every process must call the same functions (the sums cross processes).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections as mlc
import numpy as np

from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import metrics
from wsss_jax.runtime import distributed
from wsss_jax.stages import inference

OnImage = Callable[[dict[str, Any], dict[str, np.ndarray]], None]


def iou(conf: np.ndarray) -> tuple[list[float], float]:
  """(per-class IoU, mIoU) of an int `[C, C]` confusion matrix (rows: ground truth)."""
  per_class, miou = metrics.iou_from_confusion_np(conf)
  return [float(x) for x in per_class], float(miou)


def predicted(config: mlc.ConfigDict, split: str, batch_fn: Callable[..., Any],
              mesh: jax.sharding.Mesh, *, num_classes: int, variables: Any = None,
              add_inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
              | None = None, on_image: OnImage | None = None,
              conf_shape: tuple[int, ...] = (), what: str = "inference") -> np.ndarray:
  """The confusion matrix of `batch_fn`'s predictions over `split`, all processes summed.

  Args:
    batch_fn: `(variables, eval batch) -> {'pred': int [B, P, P]}` (scored here against
      each image's mask, cropped to the image) or `{'conf': int [B, ..., C, C]}`
      (already confusion matrices, summed over the images).
    num_classes: C.
    variables, add_inputs: as `inference.predict_split`.
    on_image: called with `(record, outputs)` for each of this process's images (to write
      files, keep a gallery).
    conf_shape: the leading axes `...` of `conf` outputs (e.g. `(T,)`).
    what: the name of the progress lines (`inference.predict_split`).

  Returns:
    int64 `[..., C, C]`, the same on every process.
  """
  total = None
  for record, out in inference.predict_split(config, split, batch_fn, mesh,
                                             variables=variables, add_inputs=add_inputs,
                                             what=what):
    if on_image is not None:
      on_image(record, out)
    if "conf" in out:
      conf = np.asarray(out["conf"], np.int64)
    else:
      h, w = record["mask"].shape
      conf = metrics.confusion_matrix_np(record["mask"], out["pred"][:h, :w], num_classes)
    total = conf if total is None else total + conf
  if total is None:  # this process had no image; the others' shapes are the same
    total = np.zeros(tuple(conf_shape) + (num_classes, num_classes), np.int64)
  return distributed.sum_over_processes(total)


def label_files(config: mlc.ConfigDict, label_dir: str, split: str) -> dict[str, Any]:
  """Scores of the label PNGs `label_dir/<id>.png` of `split` against its ground truth.

  Returns:
    `miou` and `per_class_iou` with "unsure" (255) pixels counted as background (the label
    map as a complete prediction); `miou_labelled` over the labelled pixels only;
    `labelled_fraction` of the pixels.
  """
  meta = sources.get_meta(config.data)
  source = sources.get_source(config.data, split)
  c = meta.num_classes
  conf_full = np.zeros((c, c), np.int64)
  conf_labelled = np.zeros((c, c), np.int64)
  counts = np.zeros(2, np.int64)   # labelled pixels, all pixels
  for i in distributed.shard_range(len(source)):
    record = source[i]
    label = label_sources.read_label(os.path.join(label_dir, f"{record['id']}.png"))
    unsure = label == IGNORE_INDEX
    conf_full += metrics.confusion_matrix_np(record["mask"], np.where(unsure, 0, label), c)
    conf_labelled += metrics.confusion_matrix_np(record["mask"], label, c, valid=~unsure)
    counts += (int((~unsure).sum()), unsure.size)
  conf_full, conf_labelled, counts = (distributed.sum_over_processes(x) for x in
                                      (conf_full, conf_labelled, counts))
  per_class, miou = iou(conf_full)
  return {"miou": miou, "per_class_iou": per_class, "miou_labelled": iou(conf_labelled)[1],
          "labelled_fraction": int(counts[0]) / max(int(counts[1]), 1)}
