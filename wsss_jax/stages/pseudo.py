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

from wsss_jax import fs
from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.ops import crf as crf_lib
from wsss_jax.ops import image as image_ops
from wsss_jax.ops import pseudo_labels
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.stages import cam_store
from wsss_jax.stages import figures
from wsss_jax.stages import inference
from wsss_jax.stages import registry
from wsss_jax.stages import scoring
from wsss_jax.stages import workdir as wd

GALLERY_SIZE = 6
OUT_DIR = "pseudo"


def pseudo_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT_DIR)


def make_labels(config: mlc.ConfigDict, workdir: str, split: str,
                settings: dict[str, Any], mesh: Any) -> None:
  """Writes the pseudo-label PNGs of `split` (skipping existing ones) with `settings`
  (`_label_settings`: mode, resolved fg_threshold, bg_threshold, crf, crf_iters)."""
  meta = sources.get_meta(config.data)
  s = settings
  params = crf_lib.PRESETS[s["crf"]]
  # The CRF runs over background + each image's classes: as many channels as the most
  # classes an image of the split has (MSRC: 4 of 16), which sets its cost.
  most = max(sources.split_statistics(config.data, split)["labels_per_image"])
  max_labels = min(meta.num_classes, most + 1)

  def batch_fn(variables, batch):
    del variables  # pseudo-labels need no model
    images = image_ops.denormalize(batch["image"], as_uint8=False)
    return {"pseudo": pseudo_labels.pseudo_labels(
        batch["cams"], batch["labels"], jnp.clip(images, 0, 255), batch["valid"],
        mode=s["mode"], fg_threshold=s["fg_threshold"], bg_threshold=s["bg_threshold"],
        crf_params=params, crf_iters=s["crf_iters"], max_labels=max_labels)}

  add = functools.partial(cam_store.dense_cams_batch,
                          cam_dir=cam_store.split_dir(workdir, split),
                          num_fg=meta.num_classes - 1)
  directory = pseudo_dir(workdir)
  written = fs.names_in(directory)
  exists = lambda i: os.path.basename(label_sources.label_path(directory, i)) in written
  for record, out in inference.predict_split(config, split, batch_fn, mesh, skip=exists,
                                             add_inputs=add, what="pseudo"):
    h, w = record["mask"].shape
    label_sources.write_label(directory, record["id"], out["pseudo"][:h, :w])


def score(config: mlc.ConfigDict, label_dir: str, split: str) -> dict[str, Any]:
  """`pseudo_*` scores of the label PNGs in `label_dir` on `split` (`scoring.label_files`;
  collective: every process must call it)."""
  return {f"pseudo_{k}": v for k, v in scoring.label_files(config, label_dir, split).items()}


def gallery(config: mlc.ConfigDict, workdir: str, split: str) -> None:
  source = sources.get_source(config.data, split)
  records = [source[i] for i in range(min(GALLERY_SIZE, len(source)))]
  figures.label_gallery(
      os.path.join(workdir, "figures", "pseudo_gallery.png"),
      [r["image"] for r in records],
      {"ground truth": [r["mask"] for r in records],
       "pseudo": [label_sources.read_label(
           label_sources.label_path(pseudo_dir(workdir), r["id"])) for r in records]},
      [f"{r['id']} ({split})" for r in records], sources.get_meta(config.data).class_names)


def _label_settings(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """The labels' parameters: the registry's `pseudo.*` settings (the one reading of
  `config.pseudo`), the foreground threshold resolved from sweep.json when < 0."""
  s = registry.stage_settings(config, "pseudo")
  return {"mode": s["pseudo.mode"], "fg_threshold": wd.foreground_threshold(config, workdir),
          "bg_threshold": float(s["pseudo.bg_threshold"]), "crf": s["pseudo.crf"],
          "crf_iters": int(s["pseudo.crf_iters"])}


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  marker = os.path.join(pseudo_dir(workdir), "complete.json")
  settings = _label_settings(config, workdir)
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
  for split in registry.splits(config):
    make_labels(config, workdir, split, settings, mesh)
  distributed.barrier("pseudo:labels")  # each process wrote its own images' labels
  scores = score(config, pseudo_dir(workdir), config.data.sweep_split)
  scores["pseudo_threshold"] = settings["fg_threshold"]
  scores["pseudo_split"] = config.data.sweep_split
  if distributed.is_chief():
    gallery(config, workdir, config.data.sweep_split)
    wd.write_json(marker, {"settings": settings, "scores": scores})
  distributed.barrier("pseudo:done")
  return scores
