"""`pseudo` stage: pseudo-label PNGs from the CAMs, refined by the on-device dense CRF.

Modes (`config.pseudo.mode`, see `ops/pseudo_labels.py`): `threshold` (argmax at the
sweep's best threshold), `double` (IRN double threshold, 255 between), `crf` (IRN: each
threshold's argmax refined by the label CRF, then combined). `pseudo.fg_threshold < 0`
means "the best threshold of sweep.json".

Writes `workdir/pseudo/<id>.png` (VOC palette, 255 = unsure) for the train and sweep splits
and scores the sweep split: `pseudo_miou` counts unsure pixels as background (the label
map as a complete prediction); `pseudo_miou_labelled` scores only the labelled pixels, and
`pseudo_labelled_fraction` says how many there are.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from PIL import Image

from wsss_jax import fs
from wsss_jax.data import palette
from wsss_jax.data import sources
from wsss_jax.data import transforms
from wsss_jax.ops import crf as crf_lib
from wsss_jax.ops import metrics
from wsss_jax.ops import pseudo_labels
from wsss_jax.stages import cam_store
from wsss_jax.stages import figures
from wsss_jax.stages import inference
from wsss_jax.stages import sweep as sweep_stage
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib

CRF_PRESETS = {"label": crf_lib.LABEL_CRF, "psa": crf_lib.PSA_CRF,
               "deeplab": crf_lib.DEEPLAB_CRF}
GALLERY_SIZE = 6


def pseudo_dir(workdir: str) -> str:
  return os.path.join(workdir, "pseudo")


def label_path(workdir: str, image_id: str) -> str:
  return os.path.join(pseudo_dir(workdir), f"{image_id}.png")


def read_label(path: str) -> np.ndarray:
  """uint8 [H, W] class ids of a pseudo-label PNG (palette indices)."""
  try:
    with fs.open_file(path, "rb") as f:
      return np.asarray(Image.open(f), np.uint8)
  except OSError as e:
    raise ValueError(f"{path}: unreadable pseudo-label ({e}); delete it to recompute") from e


def foreground_threshold(config: mlc.ConfigDict, workdir: str) -> float:
  t = float(config.pseudo.fg_threshold)
  if t >= 0:
    return t
  path = os.path.join(workdir, sweep_stage.SWEEP_FILE)
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} missing: pseudo.fg_threshold<0 takes the sweep's best "
                            "threshold, so run the sweep stage first")
  return float(wd.read_json(path)["best_threshold"])


def dense_cams_batch(batch: dict[str, np.ndarray], cam_dir: str, num_fg: int
                     ) -> dict[str, np.ndarray]:
  """CAMs from disk for the images of an eval batch: float32 [B, P, P, K], zero-padded."""
  b, p = batch["image"].shape[:2]
  out = np.zeros((b, p, p, num_fg), np.float32)
  for k, (image_id, index) in enumerate(zip(batch["id"], batch["index"])):
    if index < 0:
      continue
    dense = cam_store.dense_scores(cam_store.load(cam_dir, str(image_id)), num_fg)
    h, w = dense.shape[1:]
    out[k, :h, :w] = dense.transpose(1, 2, 0)
  return {"cams": out}


def make_labels(config: mlc.ConfigDict, workdir: str, split: str, fg_t: float,
                mesh: Any) -> list[str]:
  """Writes the pseudo-label PNGs of `split` (skipping existing ones); returns the ids."""
  meta = sources.get_meta(config.data)
  pc = config.pseudo
  params = CRF_PRESETS[pc.crf]

  def batch_fn(variables, batch):
    del variables  # pseudo-labels need no model
    images = transforms.denormalize(batch["image"], as_uint8=False)
    return {"pseudo": pseudo_labels.pseudo_labels(
        batch["cams"], batch["labels"], jnp.clip(images, 0, 255), batch["valid"],
        mode=pc.mode, fg_threshold=fg_t, bg_threshold=float(pc.bg_threshold),
        crf_params=params, crf_iters=int(pc.crf_iters))}

  add = functools.partial(dense_cams_batch, cam_dir=cam_store.split_dir(workdir, split),
                          num_fg=meta.num_classes - 1)
  written = fs.names_in(pseudo_dir(workdir))
  exists = lambda i: os.path.basename(label_path(workdir, i)) in written
  for record, out in inference.predict_split(config, split, batch_fn, mesh, skip=exists,
                                             add_inputs=add):
    h, w = record["mask"].shape
    with wd.atomic_path(label_path(workdir, record["id"])) as tmp:
      palette.save_palette_png(tmp, out["pseudo"][:h, :w].astype(np.uint8))
  source = sources.get_source(config.data, split)
  return [source[i]["id"] for i in range(len(source))]


def score(config: mlc.ConfigDict, workdir: str, split: str) -> dict[str, Any]:
  """mIoU of the pseudo-labels of `split` against its ground truth.

  Collective: with several processes each scores every process_count-th image and the
  counts are summed, so every process must call it.
  """
  meta = sources.get_meta(config.data)
  source = sources.get_source(config.data, split)
  c = meta.num_classes
  conf_full = np.zeros((c, c), np.int64)
  conf_labelled = np.zeros((c, c), np.int64)
  labelled = total = 0
  for i in distributed.shard_range(len(source)):
    record = source[i]
    label = read_label(label_path(workdir, record["id"]))
    unsure = label == pseudo_labels.IGNORE
    conf_full += metrics.confusion_matrix_np(record["mask"], np.where(unsure, 0, label), c)
    conf_labelled += metrics.confusion_matrix_np(record["mask"], label, c, valid=~unsure)
    labelled += int((~unsure).sum())
    total += unsure.size
  conf_full, conf_labelled, (labelled, total) = (
      distributed.sum_over_processes(x) for x in
      (conf_full, conf_labelled, np.asarray([labelled, total], np.int64)))
  per_class, miou = metrics.iou_from_confusion_np(conf_full)
  _, miou_labelled = metrics.iou_from_confusion_np(conf_labelled)
  return {"pseudo_miou": float(miou), "pseudo_per_class_iou": [float(x) for x in per_class],
          "pseudo_miou_labelled": float(miou_labelled),
          "pseudo_labelled_fraction": labelled / max(total, 1)}


def gallery(config: mlc.ConfigDict, workdir: str, split: str) -> None:
  source = sources.get_source(config.data, split)
  records = [source[i] for i in range(min(GALLERY_SIZE, len(source)))]
  figures.label_gallery(
      os.path.join(workdir, "figures", "pseudo_gallery.png"),
      [r["image"] for r in records],
      {"ground truth": [r["mask"] for r in records],
       "pseudo": [read_label(label_path(workdir, r["id"])) for r in records]},
      [r["id"] for r in records])


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  if config.pseudo.crf not in CRF_PRESETS:
    raise ValueError(f"config.pseudo.crf={config.pseudo.crf!r}; expected one of "
                     f"{sorted(CRF_PRESETS)}")
  marker = os.path.join(pseudo_dir(workdir), "complete.json")
  fg_t = foreground_threshold(config, workdir)
  settings = {"mode": config.pseudo.mode, "fg_threshold": fg_t,
              "bg_threshold": float(config.pseudo.bg_threshold), "crf": config.pseudo.crf,
              "crf_iters": int(config.pseudo.crf_iters)}
  if fs.exists(marker) and wd.read_json(marker).get("settings") == settings:
    return wd.read_json(marker)["scores"]
  settings_path = os.path.join(pseudo_dir(workdir), "settings.json")
  if distributed.is_chief():
    if fs.exists(settings_path) and wd.read_json(settings_path) != settings:
      # Labels on disk were made with other settings: start over rather than mix them.
      fs.rmtree(pseudo_dir(workdir))
    wd.write_json(settings_path, settings)
  distributed.barrier("pseudo:settings")
  mesh = mesh_lib.make_mesh(config.mesh)
  for split in dict.fromkeys([config.data.train_split, config.data.sweep_split]):
    make_labels(config, workdir, split, fg_t, mesh)
  distributed.barrier("pseudo:labels")  # each process wrote its own images' labels
  scores = score(config, workdir, config.data.sweep_split)
  scores["pseudo_threshold"] = fg_t
  if distributed.is_chief():
    gallery(config, workdir, config.data.sweep_split)
    wd.write_json(marker, {"settings": settings, "scores": scores})
  distributed.barrier("pseudo:done")
  return scores
