"""SPML's label propagation over the train and sweep splits, and its classifiers' scores:
the inference loops the `spml_labels` and `spml_bootstrap` stages share around the pure
steps of `ops/propagation.py` (METHODS.md §5.5; the steps are described in
`stages/spml_labels.py`).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.ops import propagation
from wsss_jax.ops import seg_inference
from wsss_jax.stages import cam_store
from wsss_jax.stages import inference
from wsss_jax.stages import scoring

PROPAGATIONS = ("nn", "rw")
SCORE_SOURCES = ("cams", "softmax", "bootstrap")


def propagation_mode(config: mlc.ConfigDict) -> str:
  """`spml_labels.propagation`, '' meaning nn for tags and rw for the other weak labels."""
  mode = config.spml_labels.propagation or (
      "nn" if config.data.get("weak_label", "tags") == "tags" else "rw")
  if mode not in PROPAGATIONS:
    raise ValueError(f"config.spml_labels.propagation={mode!r}; expected one of "
                     f"{PROPAGATIONS} or ''")
  return mode


def first_pass_fn(config: mlc.ConfigDict, model: Any, num_classes: int, bg: float,
                  score_source: str, logt: int, scales: tuple[float, ...] = (1.0,)):
  """(variables, batch) -> random-walk labels `pred`, cluster ids, prototypes and their
  labels.

  `score_source` (SCORE_SOURCES): 'cams' = the batch's CAMs with a constant background `bg`;
  'softmax' = the SPML classifier's softmax (scale 1, flip-averaged); 'bootstrap' =
  `propagation.bootstrap_scores` of the classifier's logits averaged over `scales`
  (+ flip). The walk has 2^`logt` steps.
  """
  lc = config.spml_labels

  def fn(variables, batch):
    images, valid = batch["image"], batch["valid"]
    b = images.shape[0]
    x = jnp.concatenate([images, images[:, :, ::-1]]) if lc.flip else images
    out = inference.forward(model, variables, x)
    emb = out["embedding"]
    views = [emb[:b]] + ([emb[b:, :, ::-1]] if lc.flip else [])
    present = propagation.present_classes(batch["labels"])
    if score_source == "cams":
      scores = jnp.concatenate([jnp.full(batch["cams"].shape[:3] + (1,), bg),
                                batch["cams"]], axis=-1)
    elif score_source == "softmax":
      logits = out["seg_logits"]
      scores = jax.nn.softmax(logits[:b], -1)
      if lc.flip:
        scores = 0.5 * (scores + jax.nn.softmax(logits[b:, :, ::-1], -1))
    else:
      # Its scale-1 pass repeats the forward above on the same input; XLA's CSE merges
      # the two inside this one jitted function.
      logits = seg_inference.multiscale_logits(
          lambda y: inference.forward(model, variables, y)["seg_logits"], images, scales,
          bool(lc.flip))
      scores = propagation.bootstrap_scores(logits, valid, present)
    label = propagation.walk_labels(
        scores, views, valid, present, images, max_classes=int(lc.max_classes),
        stride=int(lc.rw_stride), scale=float(lc.rw_scale), beta=float(lc.rw_beta),
        logt=logt, crf=bool(lc.rw_crf))
    clusters = propagation.cluster_prototypes(views, valid, label, grid=int(lc.nn_grid),
                                              iters=int(lc.nn_iters),
                                              num_classes=num_classes)
    return {"pred": label, **clusters}

  return fn


def nn_fn(config: mlc.ConfigDict, num_classes: int):
  """(memory, batch + first-pass outputs) -> {'label': nearest-prototype labels}."""
  lc = config.spml_labels

  def fn(memory, batch):
    return {"label": propagation.nearest_prototype_labels(
        memory, batch["protos"], batch["proto_valid"], batch["ids"], batch["labels"],
        batch["image"], batch["valid"], num_classes=num_classes, topk=int(lc.nn_topk),
        min_norm=float(lc.nn_min_norm), mask_absent=bool(lc.nn_mask_absent),
        crf=bool(lc.nn_crf))}

  return fn


def classifier_miou(config: mlc.ConfigDict, model: Any, variables: Any, mesh: Any,
                    num_classes: int, scales: tuple[float, ...] = (1.0,),
                    crf: bool = False) -> float:
  """mIoU of an SPML softmax classifier on `data.val_split`: softmax averaged over
  `scales` (+ flip when `spml_labels.flip`), optional DeepLab CRF; no tags are used."""
  def fn(variables, batch):
    probs = seg_inference.multiscale_probs(
        lambda x: inference.forward(model, variables, x)["seg_logits"], batch["image"],
        scales, bool(config.spml_labels.flip))
    if crf:
      probs = propagation.crf_probs(probs, batch["image"], batch["valid"])
    return {"pred": jnp.argmax(probs, -1).astype(jnp.int32)}

  conf = scoring.predicted(config, config.data.val_split, fn, mesh,
                           num_classes=num_classes, variables=variables)
  return scoring.iou(conf)[1]


def propagate(config: mlc.ConfigDict, workdir: str, model: Any, variables: Any, mesh: Any,
              out_root: str, *, score_source: str, logt: int, bg: float = 0.0,
              scales: tuple[float, ...] = (1.0,)) -> float:
  """Steps 1-2 of `stages/spml_labels.py` over the train and sweep splits.

  Writes `out_root/pseudo/<id>.png` (nearest-prototype labels, or the random walk's when
  the propagation is 'rw'); returns the random-walk labels' mIoU on the sweep split.
  `score_source`, `logt`, `scales`: see `first_pass_fn` ('cams' reads `workdir/cams`).
  Single process (the prototype memory holds every training image's clusters).
  """
  if score_source not in SCORE_SOURCES:
    raise ValueError(f"score_source={score_source!r}; expected one of {SCORE_SOURCES}")
  c = sources.get_meta(config.data).num_classes
  mode = propagation_mode(config)
  first = first_pass_fn(config, model, c, bg, score_source, logt, scales)
  label_dir = os.path.join(out_root, "pseudo")
  cache: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  rw_miou = float("nan")
  splits = list(dict.fromkeys([config.data.train_split, config.data.sweep_split]))
  for split in splits:
    add = (functools.partial(cam_store.dense_cams_batch,
                             cam_dir=cam_store.split_dir(workdir, split), num_fg=c - 1)
           if score_source == "cams" else None)
    cache[split] = {}

    def keep(record, out, split=split):
      if mode == "rw":
        h, w = record["mask"].shape
        label_sources.write_label(label_dir, record["id"], out["pred"][:h, :w])
      else:
        cache[split][record["id"]] = {k: v for k, v in out.items() if k != "pred"}

    conf = scoring.predicted(config, split, first, mesh, num_classes=c,
                             variables=variables, add_inputs=add, on_image=keep)
    if split == config.data.sweep_split:
      rw_miou = scoring.iou(conf)[1]
  if mode == "nn":
    train = cache[config.data.train_split]
    memory = {"features": np.concatenate([o["protos"] for o in train.values()]),
              "labels": np.concatenate([o["proto_label"] for o in train.values()]),
              "valid": np.concatenate([o["proto_valid"] for o in train.values()])}
    nn = nn_fn(config, c)
    for split in splits:
      def add(batch, split=split):
        keys = ("ids", "protos", "proto_valid")
        ref = next(iter(cache[split].values()))
        out = {k: np.zeros((len(batch["id"]),) + ref[k].shape, ref[k].dtype) for k in keys}
        for j, image_id in enumerate(batch["id"]):
          if str(image_id) in cache[split]:
            for k in keys:
              out[k][j] = cache[split][str(image_id)][k]
        out["ids"] = np.where(np.asarray(batch["index"])[:, None, None] >= 0, out["ids"], -1)
        return out
      for record, out in inference.predict_split(config, split, nn, mesh, variables=memory,
                                                 add_inputs=add):
        h, w = record["mask"].shape
        label_sources.write_label(label_dir, record["id"], out["label"][:h, :w])
  return rw_miou
