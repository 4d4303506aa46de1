"""`sweep` stage: background-threshold sweep of the CAMs on the sweep split (METHODS §1.1 S3).

For each threshold t a constant background plane of value t is put in front of the CAMs and
the argmax is scored against the ground truth: `ops.cam.threshold_sweep` gives every
threshold's confusion matrix in one pass per batch of CAMs read from disk, summed by the
shared scorer (`scoring.predicted`). Writes `workdir/sweep.json` ({threshold: mIoU}, best
threshold, per-class IoU at the best) and the threshold curve.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax.data import sources
from wsss_jax.ops import cam as cam_ops
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.stages import cam_store
from wsss_jax.stages import figures
from wsss_jax.stages import scoring
from wsss_jax.stages import workdir as wd

SWEEP_FILE = wd.SWEEP_FILE


def sweep_confusions(workdir: str, config: mlc.ConfigDict, split: str,
                     thresholds: np.ndarray) -> np.ndarray:
  """int64 [T, C, C] confusion matrices of every threshold over the split's CAMs.

  Collective: each process scores its share of the images; the sums are merged.
  """
  c = sources.get_meta(config.data).num_classes

  def batch_fn(variables, batch):
    del variables  # the CAMs come from disk
    conf = jax.vmap(lambda cams, labels, gt, valid: cam_ops.threshold_sweep(
        cams, labels, gt, thresholds, c, valid))(batch["cams"], batch["labels"],
                                                 batch["mask"], batch["valid"])
    return {"conf": conf}                                            # [B, T, C, C]

  add = functools.partial(cam_store.dense_cams_batch,
                          cam_dir=cam_store.split_dir(workdir, split), num_fg=c - 1)
  return scoring.predicted(config, split, batch_fn, mesh_lib.make_mesh(config.mesh),
                           num_classes=c, add_inputs=add, conf_shape=(len(thresholds),))


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, SWEEP_FILE)
  thresholds = np.asarray(config.sweep.thresholds, np.float32)
  if fs.exists(path):
    done = wd.read_json(path)
    if done.get("thresholds") == [float(t) for t in thresholds]:
      return _headline(done)
  split = config.data.sweep_split
  conf = sweep_confusions(workdir, config, split, thresholds)
  ious = [scoring.iou(c) for c in conf]
  mious = [m for _, m in ious]
  best = int(np.argmax(mious))
  meta = sources.get_meta(config.data)
  result = {
      "split": split,
      "thresholds": [float(t) for t in thresholds],
      "miou": mious,
      "best_threshold": float(thresholds[best]),
      "best_miou": mious[best],
      "per_class_iou": ious[best][0],
      "class_names": list(meta.class_names),
  }
  if distributed.is_chief():
    wd.write_json(path, result)
    figures.threshold_curve(os.path.join(workdir, "figures", "threshold_curve.png"), result)
  distributed.barrier("sweep:done")
  return _headline(result)


def _headline(result: dict[str, Any]) -> dict[str, Any]:
  return {"cam_miou": result["best_miou"], "cam_threshold": result["best_threshold"],
          "cam_per_class_iou": result["per_class_iou"], "cam_split": result["split"]}
