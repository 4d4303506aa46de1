"""`seg` stage: DeepLabV3+ trained on the pseudo-labels with the shared training core.

`config.seg.pseudo_source`: `pseudo` (the PNGs of `seg.pseudo_dir`, by default the pseudo
stage's; 255 ignored) or `gt` (the ground-truth masks: the fully supervised upper bound
with the same backbone and schedule, into `seg_gt/`). Steps, learning rate and batch size
come from `config.seg`, and the optimizer from `config.seg.optim` where the config has that
block (the protocol's configs: every row's segmenter trains alike, whatever optimizer the
method's train stage used); everything else (augmentation, mesh, and the optimizer of
configs without the block) from the main config.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections as mlc

from wsss_jax import fs
from wsss_jax import methods
from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.stages import registry
from wsss_jax.stages import training
from wsss_jax.stages import workdir as wd

PSEUDO_SOURCES = ("pseudo", "gt")


def seg_dir(config: mlc.ConfigDict, workdir: str) -> str:
  """workdir/seg for pseudo-labels, workdir/seg_gt for the upper bound (both can coexist)."""
  return os.path.join(workdir, registry.seg_home(config))


def seg_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """The main config with the segmentation schedule in `train`/`optim`/`data`."""
  c = mlc.ConfigDict(config.to_dict())
  c.train.num_steps = int(config.seg.num_steps)
  if "optim" in config.seg:
    c.optim = mlc.ConfigDict(config.seg.optim.to_dict())
  c.optim.lr = float(config.seg.lr)
  c.data.batch_size = int(config.seg.batch_size)
  return c


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  origin = config.seg.pseudo_source   # checked by preflight (registry choices)
  meta = sources.prepare(config.data)
  source = sources.get_source(config.data, config.data.train_split)
  if origin == "pseudo":
    source = label_sources.PseudoLabelSource(source, workdir, label_dir(config, workdir))
  c = seg_config(config)
  out_dir = seg_dir(config, workdir)
  training.check_inputs(out_dir, training_inputs(config, workdir))
  method = methods.make_method(c, meta.num_classes, name="seg")
  training.train_method(c, out_dir, method, source)
  return {"seg_pseudo_source": origin}


def label_dir(config: mlc.ConfigDict, workdir: str) -> str:
  """The pseudo-label folder: `seg.pseudo_dir` under the workdir ('pseudo' = the pseudo
  stage's; SPML's configs use 'spml/pseudo', the spml_labels stage's)."""
  return os.path.join(workdir, config.seg.get("pseudo_dir") or registry.DEFAULT_LABEL_DIR)


def training_inputs(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """What the segmentation model is trained from: the label source and its settings."""
  inputs = {"pseudo_source": config.seg.pseudo_source,
            # Training keys only: evaluation settings (scales, flip, crf) may change freely.
            "seg": registry.recorded_seg_keys(config.seg.to_dict()),
            "backbone": config.model.backbone}
  settings = os.path.join(label_dir(config, workdir), "settings.json")
  if config.seg.pseudo_source == "pseudo" and fs.exists(settings):
    inputs["pseudo"] = wd.read_json(settings)
  return inputs
