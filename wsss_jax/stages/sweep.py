"""`sweep` stage: background-threshold sweep of the CAMs on the sweep split (METHODS §1.1 S3).

For each threshold t a constant background plane of value t is put in front of the CAMs and
the argmax is scored against the ground truth. Writes `workdir/sweep.json`
({threshold: mIoU}, best threshold, per-class IoU at the best) and the threshold curve.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax.data import sources
from wsss_jax.ops import metrics
from wsss_jax.stages import cam_store
from wsss_jax.stages import figures
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import distributed

SWEEP_FILE = "sweep.json"


def threshold_predictions(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Labels for every threshold at once.

  Args:
    scores: float32 [K, H, W] CAMs over the fg classes (class id = channel + 1).
    thresholds: float [T].
  Returns:
    int32 [T, H, W]: class id argmax+1 where the best CAM beats t (strictly), else 0. Equal
    to argmax over [t, cams...] with ties going to background, as `np.argmax` does.
  """
  # Compare in the scores' precision: float32(0.4) > float64(0.4).
  thresholds = np.asarray(thresholds, scores.dtype)
  if scores.shape[0] == 0:
    return np.zeros((len(thresholds),) + scores.shape[1:], np.int32)
  best = scores.max(axis=0)
  arg = scores.argmax(axis=0).astype(np.int32) + 1
  return np.where(best[None] > thresholds[:, None, None], arg[None], 0).astype(np.int32)


def sweep_confusions(workdir: str, config: mlc.ConfigDict, split: str,
                     thresholds: np.ndarray) -> np.ndarray:
  """Accumulates int64 [T, C, C] confusion matrices over the split.

  Collective: each process reads every process_count-th image; the sums are merged.
  """
  meta = sources.get_meta(config.data)
  source = sources.get_source(config.data, split)
  directory = cam_store.split_dir(workdir, split)
  conf = np.zeros((len(thresholds), meta.num_classes, meta.num_classes), np.int64)
  for i in distributed.shard_range(len(source)):
    record = source[i]
    scores = cam_store.dense_scores(cam_store.load(directory, record["id"]),
                                    meta.num_classes - 1)
    preds = threshold_predictions(scores, thresholds)
    for t in range(len(thresholds)):
      conf[t] += metrics.confusion_matrix_np(record["mask"], preds[t], meta.num_classes)
  return distributed.sum_over_processes(conf)


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, SWEEP_FILE)
  thresholds = np.asarray(config.sweep.thresholds, np.float32)
  if fs.exists(path):
    done = wd.read_json(path)
    if done.get("thresholds") == [float(t) for t in thresholds]:
      return _headline(done)
  split = config.data.sweep_split
  conf = sweep_confusions(workdir, config, split, thresholds)
  ious = [metrics.iou_from_confusion_np(c) for c in conf]
  mious = [float(m) for _, m in ious]
  best = int(np.argmax(mious))
  meta = sources.get_meta(config.data)
  result = {
      "split": split,
      "thresholds": [float(t) for t in thresholds],
      "miou": mious,
      "best_threshold": float(thresholds[best]),
      "best_miou": mious[best],
      "per_class_iou": [float(x) for x in ious[best][0]],
      "class_names": list(meta.class_names),
  }
  if distributed.is_chief():
    wd.write_json(path, result)
    figures.threshold_curve(os.path.join(workdir, "figures", "threshold_curve.png"), result)
  distributed.barrier("sweep:done")
  return _headline(result)


def _headline(result: dict[str, Any]) -> dict[str, Any]:
  return {"cam_miou": result["best_miou"], "cam_threshold": result["best_threshold"],
          "cam_per_class_iou": result["per_class_iou"]}
