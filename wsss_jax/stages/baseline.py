"""`baseline` stage: the CAM baseline that other methods start from.

CSRM warm-starts from it (`config.train.init_from='baseline'`); SPML takes its CAM
pseudo-labels from it (`config.cams.variables='baseline'`). It is the `cam` method trained
for `config.baseline.num_steps` steps with the main config's data, model and optimizer
(`config.baseline.lr` > 0 overrides the learning rate), written to `workdir/baseline/`
like the `train` stage writes `workdir/train/` (resumable; `final_variables.msgpack` marks
it complete). Reports `baseline_map` on `data.val_split`.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections as mlc

from wsss_jax import methods
from wsss_jax.data import sources
from wsss_jax.stages import inference
from wsss_jax.stages import training

STAGE_DIR = "baseline"


def baseline_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """The config the baseline trains with: `method='cam'`, the baseline's steps and LR."""
  c = mlc.ConfigDict(config.to_dict())
  c.method = "cam"
  c.train.num_steps = int(config.baseline.num_steps)
  c.train.init_from = ""
  if float(config.baseline.get("lr", 0.0)) > 0:
    c.optim.lr = float(config.baseline.lr)
  return c


def variables_path(workdir: str) -> str:
  return os.path.join(workdir, STAGE_DIR, inference.VARIABLES_FILE)


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  meta = sources.prepare(config.data)
  cfg = baseline_config(config)
  out_dir = os.path.join(workdir, STAGE_DIR)
  method = methods.make_method(cfg, meta.num_classes)
  path = training.train_method(cfg, out_dir, method,
                               sources.get_source(cfg.data, cfg.data.train_split))
  return training.classification_scores(cfg, out_dir, method, path, "baseline",
                                        {"baseline_steps": int(cfg.train.num_steps)})
