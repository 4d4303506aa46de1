"""`seg` stage: DeepLabV3+ trained on the pseudo-labels with the shared training core.

`config.seg.pseudo_source`: `pseudo` (the PNGs of the pseudo stage, 255 ignored) or `gt`
(the ground-truth masks: the fully supervised upper bound with the same backbone and
schedule). Steps, learning rate and batch size come from `config.seg`; everything else
(optimizer kind, schedule, augmentation, mesh) from the main config.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections as mlc

from wsss_jax import fs
from wsss_jax import methods
from wsss_jax.data import sources
from wsss_jax.stages import pseudo as pseudo_stage
from wsss_jax.stages import train as train_stage
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import distributed

PSEUDO_SOURCES = ("pseudo", "gt")


class PseudoLabelSource:
  """A record source whose `mask` is the pseudo-label PNG of the same id.

  Picklable (grain workers): holds the base source and a folder path only.
  """

  def __init__(self, base: Any, workdir: str, directory: str | None = None):
    self.base = base
    self.workdir = workdir
    self.directory = directory  # folder of <id>.png; None = the pseudo stage's

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.base[index])
    path = (os.path.join(self.directory, f"{record['id']}.png") if self.directory
            else pseudo_stage.label_path(self.workdir, record["id"]))
    if not fs.exists(path):
      raise FileNotFoundError(f"{path}: pseudo-label missing; run the pseudo stage first")
    label = pseudo_stage.read_label(path)
    if label.shape != record["mask"].shape:
      raise ValueError(f"{path}: pseudo-label is {label.shape}, image {record['id']} is "
                       f"{record['mask'].shape}")
    record["mask"] = label
    return record


def seg_dir(config: mlc.ConfigDict, workdir: str) -> str:
  """workdir/seg for pseudo-labels, workdir/seg_gt for the upper bound (both can coexist)."""
  return os.path.join(workdir, "seg" if config.seg.pseudo_source == "pseudo" else "seg_gt")


def result_prefix(config: mlc.ConfigDict) -> str:
  """Headline keys: `seg_miou` for pseudo-labels, `seg_gt_miou` for the upper bound."""
  return "seg" if config.seg.pseudo_source == "pseudo" else "seg_gt"


def seg_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """The main config with the segmentation schedule in `train`/`optim`/`data`."""
  c = mlc.ConfigDict(config.to_dict())
  c.train.num_steps = int(config.seg.num_steps)
  c.optim.lr = float(config.seg.lr)
  c.data.batch_size = int(config.seg.batch_size)
  return c


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  origin = config.seg.pseudo_source
  if origin not in PSEUDO_SOURCES:
    raise ValueError(f"config.seg.pseudo_source={origin!r}; expected one of {PSEUDO_SOURCES}")
  meta = sources.prepare(config.data)
  source = sources.get_source(config.data, config.data.train_split)
  if origin == "pseudo":
    source = PseudoLabelSource(source, workdir, label_dir(config, workdir))
  c = seg_config(config)
  out_dir = seg_dir(config, workdir)
  check_inputs(out_dir, training_inputs(config, workdir))
  method = methods.make_method(c, meta.num_classes, name="seg")
  train_stage.train_method(c, out_dir, method, source)
  return {"seg_pseudo_source": origin}


def label_dir(config: mlc.ConfigDict, workdir: str) -> str:
  """The pseudo-label folder: `seg.pseudo_dir` under the workdir ('pseudo' = the pseudo
  stage's; SPML's configs use 'spml/pseudo', the spml_labels stage's)."""
  return os.path.join(workdir, config.seg.get("pseudo_dir", "pseudo"))


def training_inputs(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """What the segmentation model is trained from: the label source and its settings."""
  inputs = {"pseudo_source": config.seg.pseudo_source,
            # Training keys only: evaluation settings (scales, flip, crf) may change freely.
            "seg": {k: v for k, v in config.seg.to_dict().items()
                    if k not in ("crf", "scales", "flip")},
            "backbone": config.model.backbone}
  settings = os.path.join(label_dir(config, workdir), "settings.json")
  if config.seg.pseudo_source == "pseudo" and fs.exists(settings):
    inputs["pseudo"] = wd.read_json(settings)
  return inputs


def check_inputs(out_dir: str, inputs: dict[str, Any]) -> None:
  """Records the inputs of a new run; refuses to resume one trained from other inputs.

  Checkpoints are never deleted here: the user decides (delete the folder to retrain).
  """
  path = os.path.join(out_dir, "inputs.json")
  existed = fs.exists(path)
  # Every process looks before process 0 may write it below.
  distributed.barrier("seg:inputs:checked")
  if existed:
    before = wd.read_json(path)
    if before != json.loads(json.dumps(inputs)):
      raise ValueError(
          f"{out_dir} holds a segmentation model trained from other inputs "
          f"({path}: {before}) than this run's ({inputs}). Delete {out_dir} to retrain, "
          "or use another --workdir.")
    return
  if distributed.is_chief():
    wd.write_json(path, inputs)
  distributed.barrier("seg:inputs")
