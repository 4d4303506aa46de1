"""Segmentation metrics: confusion matrices, IoU / mIoU, FP and FN over union (METHODS §1.2).

Two twins with the same semantics:

* `confusion_matrix` (JAX): pure, jittable, shape-static; works on sharded inputs (the
  counting is a scatter-add that XLA partitions; the result is replicated).
* `confusion_matrix_np` (NumPy, `np.bincount`): for host-side accumulation over a split in
  int64, where an int32 matrix could overflow (COCO has ~10^10 pixels).

Conventions (docs/CONVENTIONS.md): rows = ground truth, columns = prediction; class ids are
0..C-1 with 0 = background; a pixel is counted only if

* `gt` is in [0, C) (so 255 = ignore / void / padding is dropped),
* `pred` is in [0, C) (a prediction of 255, e.g. an "unsure" pseudo-label pixel, is dropped
  too; map it to a class first if it should count as an error), and
* `valid` is True where a mask is given.

IoU rule: IoU_c = TP_c / (TP_c + FP_c + FN_c). A class whose union is empty (it appears
neither in the ground truth nor in the prediction of the accumulated pixels) has an undefined
IoU: it is NaN in the per-class vector and mIoU is the nanmean over the classes that do appear
in the GT or in the prediction. This equals the PSA/PNOC scripts' "+1e-10 in the denominator"
variant whenever every class appears (the usual case on a full split); on a subset of images
it does not count never-seen classes as IoU 0. Background counts like any other class.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _count_mask(gt, pred, num_classes: int, valid):
  keep = (gt >= 0) & (gt < num_classes) & (pred >= 0) & (pred < num_classes)
  if valid is not None:
    keep = keep & valid.astype(bool)
  return keep


def confusion_matrix(gt: jax.Array, pred: jax.Array, num_classes: int,
                     valid: jax.Array | None = None) -> jax.Array:
  """Confusion matrix of one image or a batch (any matching shapes).

  Args:
    gt: int [...] ground-truth class ids; 255 (or anything outside [0, C)) is ignored.
    pred: int [...] predicted class ids, same shape as `gt`; values outside [0, C) are
      ignored.
    num_classes: C (static), background included.
    valid: optional bool [...] (same shape); False pixels are ignored (padding).

  Returns:
    int32 [C, C], rows = GT class, columns = predicted class. Counts are int32: fine for a
    batch; accumulate a split on the host in int64 (`np.asarray(conf, np.int64)`).
  """
  gt = jnp.asarray(gt).astype(jnp.int32)
  pred = jnp.asarray(pred).astype(jnp.int32)
  keep = _count_mask(gt, pred, num_classes, valid)
  # Dropped pixels go to an extra bin C*C that is sliced off (no data-dependent shapes).
  index = jnp.where(keep, gt * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_matrix_np(gt: np.ndarray, pred: np.ndarray, num_classes: int,
                        valid: np.ndarray | None = None) -> np.ndarray:
  """NumPy twin of `confusion_matrix` (same rules); returns int64 [C, C] for accumulation."""
  gt = np.asarray(gt).astype(np.int64)
  pred = np.asarray(pred).astype(np.int64)
  if gt.shape != pred.shape:
    raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ; resize the prediction to "
                     "the original resolution first (METHODS §1.2).")
  keep = _count_mask(gt, pred, num_classes, None if valid is None else np.asarray(valid))
  index = gt[keep] * num_classes + pred[keep]
  counts = np.bincount(index, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def _xp(conf):
  return np if isinstance(conf, np.ndarray) else jnp


def _tp_fp_fn(conf, xp):
  dtype = np.float64 if xp is np else jnp.float32
  conf = xp.asarray(conf).astype(dtype)
  tp = xp.diagonal(conf)
  fp = conf.sum(axis=0) - tp  # predicted c, GT something else
  fn = conf.sum(axis=1) - tp  # GT c, predicted something else
  return tp, fp, fn


def iou_from_confusion(conf) -> tuple[Any, Any]:
  """Per-class IoU and mIoU from a [C, C] confusion matrix.

  Works on jax arrays (float32, jittable) and on NumPy arrays (float64).

  Returns:
    (per_class_iou [C], miou scalar). Classes with an empty union (absent from both GT and
    prediction) are NaN and excluded from the mean (nanmean; see the module docstring).
    mIoU is NaN only if the matrix is all zeros.
  """
  xp = _xp(conf)
  tp, fp, fn = _tp_fp_fn(conf, xp)
  union = tp + fp + fn
  iou = xp.where(union > 0, tp / xp.where(union > 0, union, 1), xp.nan)
  present = union > 0
  miou = xp.where(present.any(), xp.where(present, iou, 0).sum() / xp.maximum(present.sum(), 1),
                  xp.nan)
  return iou, miou


def iou_from_confusion_np(conf: np.ndarray) -> tuple[np.ndarray, float]:
  """NumPy twin of `iou_from_confusion`: (per-class IoU float64 [C], mIoU as a Python float)."""
  iou, miou = iou_from_confusion(np.asarray(conf))
  return iou, float(miou)


def fp_fn_over_union(conf) -> tuple[Any, Any]:
  """False positives and false negatives of each class as fractions of its union.

  FP_c / union_c shows over-activation (class c predicted where it is not), FN_c / union_c
  under-activation; IoU_c + FP_c/U_c + FN_c/U_c = 1. NaN where the union is empty.
  Works on jax and NumPy arrays like `iou_from_confusion`.

  Returns:
    (fp_ratio [C], fn_ratio [C]).
  """
  xp = _xp(conf)
  tp, fp, fn = _tp_fp_fn(conf, xp)
  union = tp + fp + fn
  safe = xp.where(union > 0, union, 1)
  return (xp.where(union > 0, fp / safe, xp.nan), xp.where(union > 0, fn / safe, xp.nan))


def pixel_accuracy(conf) -> Any:
  """Fraction of counted pixels whose prediction equals the GT (NaN for an empty matrix)."""
  xp = _xp(conf)
  dtype = np.float64 if xp is np else jnp.float32
  conf = xp.asarray(conf).astype(dtype)
  total = conf.sum()
  return xp.where(total > 0, xp.trace(conf) / xp.where(total > 0, total, 1), xp.nan)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, list]:
  """mAP over classes with at least one positive; per-class AP (NaN where none).

  Host-side (scikit-learn). Args: scores float [N, K]; labels bool [N, K].
  """
  from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  aps = [float(average_precision_score(labels[:, k], scores[:, k]))
         if labels[:, k].any() else float("nan") for k in range(labels.shape[1])]
  return float(np.nanmean(aps)) if not np.all(np.isnan(aps)) else float("nan"), aps


def confusion_summary(conf: np.ndarray,
                      class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Host-side JSON-ready summary of a confusion matrix (results.json style).

  Returns:
    {'miou', 'pixel_accuracy', 'per_class_iou', 'fp_over_union', 'fn_over_union',
     'class_names' (if given)}: Python floats / lists, NaN → None for JSON.
  """
  conf = np.asarray(conf, np.int64)
  iou, miou = iou_from_confusion_np(conf)
  fp, fn = fp_fn_over_union(conf)

  def clean(values):
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, np.float64)]

  out = {
      "miou": None if np.isnan(miou) else float(miou),
      "pixel_accuracy": clean([pixel_accuracy(conf)])[0],
      "per_class_iou": clean(iou),
      "fp_over_union": clean(fp),
      "fn_over_union": clean(fn),
  }
  if class_names is not None:
    out["class_names"] = list(class_names)
  return out
