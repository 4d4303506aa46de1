"""`cams` stage: multi-scale + flip CAM inference for the train and sweep splits.

Per image (METHODS.md §1.1 S2, `ops/cam.py`): ReLU of the class maps at each scale plus the
flipped pass, summed over scales, restricted to the image's classes and max-normalised per
class. Saved with `cam_store` at stride 4 and full resolution. Sharded over the devices of
`config.mesh` like training. Resumes image by image; a split is complete once its marker
lists every id.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax import methods
from wsss_jax.data import sources
from wsss_jax.ops import cam as cam_ops
from wsss_jax.stages import cam_store
from wsss_jax.stages import figures
from wsss_jax.stages import inference
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib

OVERLAY_COUNT = 6
# Which trained model's CAMs: the `train` stage's (config.method) or the `baseline` stage's.
CAM_VARIABLES = ("train", "baseline")


def cam_batch_fn(config: mlc.ConfigDict, model: Any):
  """The jittable `(variables, eval batch) → {'high_res', 'stride4'}` CAM function."""
  scales = tuple(float(s) for s in config.cams.scales)

  def batch_fn(variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    high, low = cam_ops.multiscale_cams(
        lambda images: inference.forward(model, variables, images)["cams"],
        batch["image"], batch["valid"],
        batch["labels"], scales=scales, flip=bool(config.cams.flip))
    return {"high_res": high, "stride4": low}

  return batch_fn


def crop_cams(record: dict[str, Any], out: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(keys [K'], stride-4 [K', h4, w4], full [K', H, W]) for the image's own classes."""
  h, w = record["mask"].shape
  keys = np.flatnonzero(np.asarray(record["labels"]) > 0) + 1
  high = out["high_res"][:h, :w, keys - 1].transpose(2, 0, 1)
  low = out["stride4"][:math.ceil(h / 4), :math.ceil(w / 4), keys - 1].transpose(2, 0, 1)
  return keys, low, high


def cam_model(config: mlc.ConfigDict, workdir: str, num_classes: int
              ) -> tuple[Any, dict[str, Any]]:
  """(method, trained variables) of the model whose CAMs are made (`cams.variables`)."""
  which = config.cams.get("variables", "train")
  if which not in CAM_VARIABLES:
    raise ValueError(f"config.cams.variables={which!r}; expected one of {CAM_VARIABLES}")
  # The baseline stage trains the plain CAM model whatever config.method is.
  method = methods.make_method(config, num_classes,
                               name="cam" if which == "baseline" else None)
  variables = inference.load_variables(
      os.path.join(workdir, which, inference.VARIABLES_FILE))
  return method, variables


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  meta = sources.prepare(config.data)
  method, variables = cam_model(config, workdir, meta.num_classes)
  batch_fn = cam_batch_fn(config, method.model)
  mesh = mesh_lib.make_mesh(config.mesh)
  counts = {}
  for split in dict.fromkeys([config.data.train_split, config.data.sweep_split]):
    source = sources.get_source(config.data, split)
    ids = [source[i]["id"] for i in range(len(source))]
    directory = cam_store.split_dir(workdir, split)
    counts[split] = len(ids)
    if cam_store.is_complete(directory, ids):
      continue
    written = fs.names_in(directory)
    exists = lambda i: os.path.basename(cam_store.cam_path(directory, i)) in written
    for record, out in inference.predict_split(config, split, batch_fn, mesh,
                                               variables=variables, skip=exists,
                                               what="cams"):
      cam_store.save(directory, record["id"], *crop_cams(record, out))
    # Each process wrote its own images; the split is complete once all have.
    distributed.barrier(f"cams:{split}")
    if distributed.is_chief():
      cam_store.mark_complete(directory, ids)
    distributed.barrier(f"cams:{split}:marked")
  if distributed.is_chief():
    overlays(config, workdir, config.data.sweep_split)
  return {"cam_images": counts}


def overlays(config: mlc.ConfigDict, workdir: str, split: str) -> None:
  source = sources.get_source(config.data, split)
  directory = cam_store.split_dir(workdir, split)
  records = [source[i] for i in range(min(OVERLAY_COUNT, len(source)))]
  meta = sources.get_meta(config.data)
  cams = [cam_store.load(directory, r["id"]) for r in records]
  figures.cam_overlays(os.path.join(workdir, "figures", "cam_overlays.png"),
                       [r["image"] for r in records], [c["high_res"] for c in cams],
                       [c["keys"] for c in cams], meta.class_names,
                       [f"{r['id']} ({split})" for r in records],
                       masks=[r["mask"] for r in records])
