"""`baseline` stage: the CAM baseline that every method and the control start from.

Methods warm-start from it (`config.train.init_from='baseline'`); SPML takes its CAM
pseudo-labels from it (`config.cams.variables='baseline'`). It is the `cam` method trained
for `config.baseline.num_steps` steps with the main config's data and model and the
optimizer `config.baseline.optim` (the protocol's configs have that block,
`configs/common.py:plug_in`; otherwise the main `config.optim`, with `config.baseline.lr`
> 0 overriding its learning rate), written to `workdir/baseline/` like the `train` stage
writes `workdir/train/` (resumable; `final_variables.msgpack` marks it complete). Reports
`baseline_map` on `data.val_split`.

With `config.baseline.cache` (default on) a finished baseline is shared across work
directories through `baseline_cache`, keyed by the stage's fingerprint
(`registry.fingerprint(config, 'baseline')`: seed, dataset content, model, optimizer,
steps, augmentation, ...) and the pretrained weights file's sha256: a run whose key
matches a complete entry copies it instead of training (`baseline_cached: true`).
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax import methods
from wsss_jax.data import sources
from wsss_jax.models import weights
from wsss_jax.runtime import distributed
from wsss_jax.stages import baseline_cache
from wsss_jax.stages import inference
from wsss_jax.stages import registry
from wsss_jax.stages import training

STAGE_DIR = "baseline"


def baseline_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """The config the baseline trains with: `method='cam'`, its own steps and optimizer."""
  c = mlc.ConfigDict(config.to_dict())
  c.method = "cam"
  c.train.num_steps = int(config.baseline.num_steps)
  c.train.init_from = ""
  if "optim" in config.baseline:
    c.optim = mlc.ConfigDict(config.baseline.optim.to_dict())
  elif float(config.baseline.get("lr", 0.0)) > 0:
    c.optim.lr = float(config.baseline.lr)
  return c


def variables_path(workdir: str) -> str:
  return os.path.join(workdir, STAGE_DIR, inference.VARIABLES_FILE)


def cache_root(config: mlc.ConfigDict) -> str:
  """`<prepared-dataset cache>/baselines`: local, beside the prepared datasets."""
  base = config.data.get("cache_dir") or sources.default_cache_dir()
  return os.path.join(os.path.expanduser(base), "baselines")


def cache_entry(config: mlc.ConfigDict) -> tuple[str, dict[str, Any]]:
  """(key, description) of the baseline cache entry of `config`."""
  fingerprint = registry.fingerprint(config, "baseline")
  weights_file = weights.pretrained_weights_file(baseline_config(config).model)
  digest = baseline_cache.file_sha256(weights_file) if weights_file else "none"
  key = baseline_cache.cache_key(fingerprint, digest)
  return key, {"fingerprint": fingerprint,
               "settings": registry.stage_settings(config, "baseline"),
               "weights_file": weights_file, "weights_sha256": digest,
               "version": baseline_cache.CACHE_VERSION}


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  meta = sources.prepare(config.data)
  cfg = baseline_config(config)
  out_dir = os.path.join(workdir, STAGE_DIR)
  use_cache = bool(config.baseline.get("cache", True))
  cached = False
  if use_cache:
    root = cache_root(config)
    key, entry = cache_entry(config)
    hit = baseline_cache.lookup(root, key)
    if hit and not fs.exists(variables_path(workdir)):
      if distributed.is_chief():
        baseline_cache.restore(hit, out_dir)
      distributed.barrier("baseline:restored")
      logging.info("Baseline: reusing the cached baseline %s", hit)
      cached = True
  method = methods.make_method(cfg, meta.num_classes)
  path = training.train_method(cfg, out_dir, method,
                               sources.get_source(cfg.data, cfg.data.train_split))
  scores = training.classification_scores(cfg, out_dir, method, path, "baseline",
                                          {"baseline_steps": int(cfg.train.num_steps)})
  if use_cache and distributed.is_chief():
    baseline_cache.store(root, key, out_dir, entry)
  return {**scores, "baseline_cached": cached}
