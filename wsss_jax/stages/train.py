"""`train` stage: trains `config.method` on the train split, then scores classification.

Outputs: `workdir/train/` (checkpoints, metrics.jsonl) and `train/final_variables.msgpack`
(the marker that the stage is complete). A killed run resumes from the latest checkpoint,
grain iterator included. The records come from the method's train source
(`data.label_sources.train_source`: the dataset's, or e.g. SPML's pseudo-labels with
superpixels). Reports `train_map`: mean average precision of the image-level classifier on
`data.val_split` (classes with at least one positive image).
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections as mlc

from wsss_jax import methods
from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.stages import training


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  meta = sources.prepare(config.data)
  out_dir = os.path.join(workdir, "train")
  method = training.with_warm_start(methods.make_method(config, meta.num_classes),
                                    training.init_from_path(config, workdir))
  mesh = mesh_lib.make_mesh(config.mesh)
  logits_fn = training.classification_logits_fn(method.model)  # one function: compiled once

  def periodic_eval(state, step):
    del step
    variables = method.export_variables(state.params, state.batch_stats, state.extra)
    return {"map": training.classification_map(config, logits_fn, variables, mesh)[0]}

  source = label_sources.train_source(
      config, workdir, sources.get_source(config.data, config.data.train_split))
  path = training.train_method(config, out_dir, method, source, eval_fn=periodic_eval)
  return training.classification_scores(config, out_dir, method, path, "train",
                                        logits_fn=logits_fn)
