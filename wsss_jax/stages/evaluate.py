"""`evaluate` stage: segmentation inference on the val split → mIoU, per-class IoU,
confusion matrix (`workdir/<seg|seg_gt>_evaluate.json`), per-class IoU bars and a
prediction gallery."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax import methods
from wsss_jax.data import pipeline
from wsss_jax.data import sources
from wsss_jax.ops import image as image_ops
from wsss_jax.ops import seg_inference
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.stages import figures
from wsss_jax.stages import inference
from wsss_jax.stages import registry
from wsss_jax.stages import scoring
from wsss_jax.stages import workdir as wd

EVAL_FILE = "evaluate.json"
GALLERY_SIZE = 6


def inference_settings(config: mlc.ConfigDict) -> dict[str, Any]:
  """How the segmentation model is run: `seg.scales`, `seg.flip`, `seg.crf`."""
  return {"scales": [float(s) for s in config.seg.scales], "flip": bool(config.seg.flip),
          "crf": bool(config.seg.crf)}


def seg_batch_fn(model: Any, settings: dict[str, Any]
                 ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """The jittable `(variables, eval batch) -> {'pred': int32 [B, P, P]}` of the
  segmentation model: mean softmax over `settings['scales']` (and flips), optionally
  refined by the dense CRF, then argmax. Shared by this stage and `wsss predict`, so a
  prediction on a new image is made exactly as the scored ones."""

  def batch_fn(variables, batch):
    probs = seg_inference.multiscale_probs(
        lambda x: inference.forward(model, variables, x)["seg_logits"],
        batch["image"], settings["scales"], settings["flip"])
    if settings["crf"]:
      images = jnp.clip(image_ops.denormalize(batch["image"], as_uint8=False), 0, 255)
      probs = seg_inference.crf_refine_probs(probs, images, batch["valid"])
    return {"pred": jnp.argmax(probs, axis=-1).astype(jnp.int32)}

  return batch_fn


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  # Headline keys: `seg_miou` for pseudo-labels, `seg_gt_miou` for the upper bound.
  prefix = registry.seg_home(config)
  path = os.path.join(workdir, f"{prefix}_{EVAL_FILE}")
  settings = {**inference_settings(config), "split": config.data.val_split}
  if fs.exists(path) and wd.read_json(path).get("settings") == settings:
    return wd.read_json(path)["headline"]
  meta = sources.prepare(config.data)
  method = methods.make_method(config, meta.num_classes, name="seg")
  variables = inference.load_variables(
      os.path.join(workdir, prefix, inference.VARIABLES_FILE))
  gallery = []

  def keep(record, out):
    if len(gallery) < GALLERY_SIZE:
      h, w = record["mask"].shape
      gallery.append((record, out["pred"][:h, :w]))

  conf = scoring.predicted(config, config.data.val_split,
                           seg_batch_fn(method.model, settings),
                           mesh_lib.make_mesh(config.mesh), num_classes=meta.num_classes,
                           variables=variables, on_image=keep, what="evaluate")
  per_class, miou = scoring.iou(conf)
  headline = {f"{prefix}_miou": miou, f"{prefix}_per_class_iou": per_class,
              "seg_split": config.data.val_split}
  if not distributed.is_chief():
    distributed.barrier("evaluate:done")
    return headline
  figures.label_gallery(
      os.path.join(workdir, "figures", f"{prefix}_gallery.png"), [r["image"] for r, _ in gallery],
      {"ground truth": [r["mask"] for r, _ in gallery], "prediction": [p for _, p in gallery]},
      [f"{r['id']} ({config.data.val_split})" for r, _ in gallery], meta.class_names)
  results = wd.read_results(workdir)
  series = {name: results[key] for name, key in (("cam", "cam_per_class_iou"),
                                                   ("pseudo", "pseudo_per_class_iou"))
            if key in results}
  series[prefix] = headline[f"{prefix}_per_class_iou"]
  # cam and pseudo are scored on the sweep split, the segmentation model on the val split.
  splits = {"cam": config.data.sweep_split, "pseudo": config.data.sweep_split,
            prefix: config.data.val_split}
  figures.per_class_bars(os.path.join(workdir, "figures", "per_class_iou.png"),
                         meta.class_names, series, splits)
  # The canvas the images were padded to (`wsss predict` pads new images alike, so its
  # predictions for these images equal the ones scored here).
  pad_size = pipeline.eval_pad_size(sources.get_source(config.data, config.data.val_split),
                                    config.data)
  # Written last: its presence means every output of the stage exists.
  wd.write_json(path, {"settings": settings, "headline": headline,
                       "confusion": conf.tolist(), "class_names": list(meta.class_names),
                       "pad_size": pad_size})
  distributed.barrier("evaluate:done")
  return headline
