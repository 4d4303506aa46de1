"""What the training stages share (`baseline`, `train`, `seg`, `spml_bootstrap`): train a
Method into a folder (resuming), warm starts, the classifier's mAP, and the record of what
a folder was trained from.

Outputs of `train_method`: `out_dir/` (checkpoints, metrics.jsonl) and
`out_dir/final_variables.msgpack` (the marker that training is complete). A killed run
resumes from the latest checkpoint, grain iterator included.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax.data import pipeline
from wsss_jax.data import sources
from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import metrics
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.stages import inference
from wsss_jax.stages import workdir as wd
from wsss_jax.train import loop
from wsss_jax.train import rollback
from wsss_jax.train import warm_start

CLASSIFICATION_FILE = "classification.json"


def train_method(config: mlc.ConfigDict, out_dir: str, method: Any, source: Any,
                 eval_fn: loop.EvalFn | None = None) -> str:
  """Trains `method` on `source` into `out_dir` (resuming); returns the variables path.

  `eval_fn(state, step)` runs every `config.train.eval_every` steps (0: never).
  """
  path = os.path.join(out_dir, inference.VARIABLES_FILE)
  if fs.exists(path):
    return path
  mesh = mesh_lib.make_mesh(config.mesh)
  # `train.nan_retries > 0`: a NaN/Inf rolls back to the last finite checkpoint and
  # retries with a lower learning rate (train/rollback.py); `c` is config, LR scaled.
  state = rollback.train_with_rollback(
      lambda c: loop.train(
          method, c, out_dir,
          lambda: pipeline.train_dataset(source, c.data, seed=c.seed, mesh=mesh), mesh,
          eval_fn=eval_fn if int(c.train.eval_every) > 0 else None),
      config, out_dir)
  exported = method.export_variables(state.params, state.batch_stats, state.extra)
  inference.save_variables(path, exported["params"], exported["batch_stats"])
  return path


def init_from_path(config: mlc.ConfigDict, workdir: str) -> str:
  """The variables file named by `config.train.init_from` ('' = none).

  `'baseline'` is the `baseline` stage's output in this work directory; anything else is a
  path to a `final_variables.msgpack` or to the directory (a stage folder) holding one.
  """
  init_from = str(config.train.get("init_from", "") or "")
  if not init_from:
    return ""
  if init_from == "baseline":
    path = os.path.join(workdir, "baseline", inference.VARIABLES_FILE)
    hint = "add the 'baseline' stage before 'train' in config.stages"
  else:
    path = init_from
    if fs.isdir(path):
      path = os.path.join(path, inference.VARIABLES_FILE)
    hint = "give a final_variables.msgpack written by a train or baseline stage"
  if not fs.exists(path):
    raise FileNotFoundError(f"config.train.init_from={init_from!r}: {path} does not exist; "
                            f"{hint}")
  return path


def with_warm_start(method: Any, path: str) -> Any:
  """`method` whose initial variables take every matching leaf from the file at `path`.

  The ImageNet weights load first (the method's own `load_pretrained`), then the saved
  leaves overwrite them; leaves the saved model does not have (new heads) stay as
  initialised. Only applies to a fresh start: a resumed run restores its checkpoint.
  """
  if not path:
    return method
  saved = inference.load_variables(path)
  own = method.load_pretrained

  def load(variables):
    if own is not None:
      variables = own(variables)
    merged, copied, fresh = warm_start.merge_matching(variables, saved, source=path)
    logging.info("Warm start from %s: %d leaves copied, %d new (%s)", path, len(copied),
                 len(fresh), ", ".join(sorted({"/".join(f.split("/")[:2]) for f in fresh})))
    return merged

  return dataclasses.replace(method, load_pretrained=load)


def classification_logits_fn(model: Any):
  """`(variables, eval batch) -> {'logits': [B, K]}`: masked GAP of the raw class maps."""

  def batch_fn(variables, batch):
    # Every method's model returns raw class maps `cams` (CONVENTIONS.md).
    cams = inference.forward(model, variables, batch["image"])["cams"]
    return {"logits": cam_ops.masked_mean_logits(cams, batch["valid"])}

  return batch_fn


def classification_map(config: mlc.ConfigDict, logits_fn: Any, variables: dict[str, Any],
                       mesh: Any) -> tuple[float, list[float]]:
  """Image-level mAP on `data.val_split` (`logits_fn` from `classification_logits_fn`).

  Collective: each process scores its share of the images; all get the same mAP.
  """
  source = sources.get_source(config.data, config.data.val_split)
  num_fg = len(source[0]["labels"])
  index, scores, labels = [], [], []
  for record, out in inference.predict_split(config, config.data.val_split, logits_fn,
                                             mesh, variables=variables,
                                             what="classification mAP"):
    index.append(record["index"])
    scores.append(out["logits"])
    labels.append(np.asarray(record["labels"]) > 0)
  merged = distributed.gather_indexed(
      np.asarray(index, np.int64),
      {"scores": np.asarray(scores, np.float32).reshape(len(index), num_fg),
       "labels": np.asarray(labels, bool).reshape(len(index), num_fg)},
      len(source), inference.local_slots(config, len(source)))
  return metrics.mean_average_precision(merged["scores"], merged["labels"])


def classification_scores(config: mlc.ConfigDict, out_dir: str, method: Any,
                          variables_path: str, prefix: str,
                          extra: dict[str, Any] | None = None,
                          logits_fn: Any = None) -> dict[str, Any]:
  """`{prefix}_map`, `{prefix}_ap_per_class` and `{prefix}_map_split` of the trained
  classifier on `data.val_split`, computed once per split (`out_dir/classification.json`).

  `logits_fn`: the `classification_logits_fn` already used for periodic evals (reusing it
  reuses its compiled program). Collective: every process scores its share of the images.
  """
  path = os.path.join(out_dir, CLASSIFICATION_FILE)
  split = config.data.val_split
  if fs.exists(path):
    done = wd.read_json(path)
    if done.get(f"{prefix}_map_split", split) == split:
      return done
  mesh = mesh_lib.make_mesh(config.mesh)
  mean_ap, aps = classification_map(
      config, logits_fn or classification_logits_fn(method.model),
      inference.load_variables(variables_path), mesh)
  result = {f"{prefix}_map": mean_ap, f"{prefix}_ap_per_class": aps,
            f"{prefix}_map_split": split, **(extra or {})}
  if distributed.is_chief():
    wd.write_json(path, result)
  distributed.barrier(f"{prefix}:classification")
  return result


def check_inputs(out_dir: str, inputs: dict[str, Any]) -> None:
  """Records the inputs of a new run; refuses to resume one trained from other inputs.

  Checkpoints are never deleted here: the user decides (delete the folder to retrain).
  """
  path = os.path.join(out_dir, "inputs.json")
  existed = fs.exists(path)
  # Every process looks before process 0 may write it below.
  distributed.barrier("inputs:checked")
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
  distributed.barrier("inputs:written")
