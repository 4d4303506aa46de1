"""`spml_bootstrap` stage: SPML's bootstrapped softmax classifiers (METHODS.md §5.5, 4-6).

Image tags only, after `spml_labels`, whose nearest-prototype labels
(`workdir/spml/pseudo`) start it. For round r = 1..`rounds`:

1. Classifier r = SPML's classifier head on the frozen trained embedding
   (`SPMLNet(freeze_embedding=True)`: backbone and ASPP parameters frozen, backbone
   BatchNorm in inference mode), warm-started from `workdir/train`, trained with pixel
   cross-entropy on the round's labels by the shared train loop (`steps`, `lr`,
   `batch_size`; the segmentation stage's loss) -> `workdir/spml_boot/classifier<r>`.
2. If r < rounds, the next round's labels (the reference's `pseudo_softmax.py` followed
   by nearest-prototype propagation): classifier r's logits averaged over `label_scales`
   + flip, softmax, each class divided by its maximum over the image, classes absent
   from the tags zeroed (`ops.propagation.bootstrap_scores`); a random walk of 2^`rw_logt`
   steps (T^1 in the reference), no CRF (as the reference); then `spml_labels` step 2 ->
   `workdir/spml_boot/round<r+1>/pseudo`.

Final inference with the last classifier: softmax averaged over `final_scales` + flip,
DeepLab CRF when `final_crf`.
- `data.val_split` -> `spml_boot_miou`: SPML's own segmentation result (the number the
  paper reports; no tags used).
- train and sweep splits -> `workdir/spml_boot/pseudo/<id>.png`, classes absent from the
  image's tags removed before the CRF: pseudo-labels for the shared `seg` stage
  (`--config.seg.pseudo_dir=spml_boot/pseudo`), scored on the sweep split
  (`spml_boot_pseudo_miou`).

Differences from the reference (CPU budget; see README "SPML"): each classifier fine-tunes
the jointly trained classifier for `steps` steps (the reference trains 4k iterations), and
there is no 512x512 sliding window (images are at most the eval pad size).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.data import label_sources
from wsss_jax.data import sources
from wsss_jax.methods import seg as seg_method
from wsss_jax.methods import spml
from wsss_jax.ops import propagation
from wsss_jax.ops import seg_inference
from wsss_jax.stages import inference
from wsss_jax.stages import propagate
from wsss_jax.stages import registry
from wsss_jax.stages import scoring
from wsss_jax.stages import training
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import mesh as mesh_lib

OUT_DIR = registry.SPML_BOOT_DIR   # final labels in workdir/spml_boot/pseudo/<id>.png
# The embedding network: everything but the classifier head (`classifier_*`).
EMBEDDING_PARAMS = (r"^backbone(/|$)", r"^embed_")
FINAL_KEYS = ("final_scales", "final_crf")   # final inference only: no retraining


def default_config() -> mlc.ConfigDict:
  """The `config.spml_bootstrap` block (reference values where the CPU allows)."""
  return mlc.ConfigDict(dict(
      rounds=2,                          # classifiers trained in turn (reference: 2)
      steps=4000, batch_size=16,         # per classifier (reference: 4k iterations)
      lr=0.0,                            # 0: optim.lr (the embedding's)
      label_scales=(0.75, 1.0),          # classifier -> next round's labels (+ flip)
      rw_logt=0,                         # walk of 2^0 = 1 step (reference: T^1)
      final_scales=(0.5, 0.75, 1.0, 1.25, 1.5),  # final inference (+ flip)
      final_crf=True))


def classifier_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """The main config with a classifier round's schedule: `train`/`optim`/`data`."""
  bc = config.spml_bootstrap
  c = mlc.ConfigDict(config.to_dict())
  c.train.num_steps = int(bc.steps)
  c.train.eval_every = 0
  if float(bc.lr) > 0:
    c.optim.lr = float(bc.lr)
  c.optim.frozen = EMBEDDING_PARAMS
  c.data.batch_size = int(bc.batch_size)
  c.data.extra_maps = ()        # the classifier needs no superpixels
  return c


def _no_walk_crf(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """`config` with `spml_labels.rw_crf` off: the reference's round labels
  (pseudo_softmax.py) take the argmax of the walked softmax without a CRF, unlike the
  CAM walk of `spml_labels` (pseudo_camrw_crf.py)."""
  c = mlc.ConfigDict(config.to_dict())
  c.spml_labels.rw_crf = False
  return c


def _label_dir(workdir: str, round_: int) -> str:
  """Folder whose `pseudo/<id>.png` are the labels classifier `round_` trains on."""
  if round_ == 1:
    return os.path.join(workdir, registry.SPML_LABELS_DIR)
  return os.path.join(workdir, OUT_DIR, f"round{round_}")


def train_classifier(config: mlc.ConfigDict, workdir: str, round_: int, num_classes: int,
                     settings: dict[str, Any]) -> dict[str, Any]:
  """Trains (or resumes, or reuses) classifier `round_`; returns its variables.

  `settings` (what its labels and schedule came from) are recorded in its folder; a
  folder trained from other settings is refused, never resumed.
  """
  c = classifier_config(config)
  out_dir = os.path.join(workdir, OUT_DIR, f"classifier{round_}")
  labels = os.path.join(_label_dir(workdir, round_), "pseudo")
  training.check_inputs(out_dir, {"round": round_, **settings})
  model = spml.build_model(c, num_classes, freeze_embedding=True)
  method = dataclasses.replace(seg_method.make_seg_method(c, num_classes, model=model),
                               name="spml_classifier")
  method = training.with_warm_start(
      method, os.path.join(workdir, "train", inference.VARIABLES_FILE))
  source = label_sources.PseudoLabelSource(
      sources.get_source(c.data, c.data.train_split), workdir, labels)
  return inference.load_variables(training.train_method(c, out_dir, method, source))


def _tagged_labels_fn(config: mlc.ConfigDict, model: Any):
  """(variables, batch) -> {'label': [B, P, P]}: final inference restricted to the tags."""
  bc = config.spml_bootstrap
  flip = bool(config.spml_labels.flip)

  def fn(variables, batch):
    images, valid = batch["image"], batch["valid"]
    probs = seg_inference.multiscale_probs(
        lambda x: inference.forward(model, variables, x)["seg_logits"], images,
        tuple(bc.final_scales), flip)
    present = propagation.present_classes(batch["labels"])
    probs = jnp.where(present[:, None, None, :], probs, 0.0)
    if bc.final_crf:
      probs = propagation.crf_probs(probs, images, valid)
      probs = jnp.where(present[:, None, None, :], probs, -1.0)
    return {"label": jnp.argmax(probs, -1).astype(jnp.int32)}

  return fn


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  if config.data.get("weak_label", "tags") != "tags":
    raise ValueError("the spml_bootstrap stage is for image tags (config.data.weak_label="
                     f"{config.data.weak_label!r}); drop it from config.stages")
  if jax.process_count() > 1:
    raise ValueError("the spml_bootstrap stage runs in a single process (it propagates "
                     "labels like spml_labels); run it without --num_processes")
  bc = config.spml_bootstrap
  rounds = int(bc.rounds)
  if rounds < 1:
    raise ValueError(f"config.spml_bootstrap.rounds={rounds}; expected >= 1")
  meta = sources.prepare(config.data)
  c = meta.num_classes
  first_labels = os.path.join(_label_dir(workdir, 1), "pseudo", "settings.json")
  if not fs.exists(first_labels):
    raise FileNotFoundError(f"{first_labels}: SPML's labels are missing; run the "
                            "spml_labels stage before spml_bootstrap")
  out_root = os.path.join(workdir, OUT_DIR)
  marker = os.path.join(out_root, "complete.json")
  # What the classifiers and the round labels depend on (the final inference's scales
  # and CRF may change without retraining them), and what the final labels depend on.
  # JSON round trip: tuples compare equal to the lists read back from the markers.
  training = json.loads(json.dumps(
      {"bootstrap": {k: v for k, v in bc.to_dict().items() if k not in FINAL_KEYS},
       "labels": wd.read_json(first_labels)}))
  settings = {**training, "final": json.loads(json.dumps({k: bc[k] for k in FINAL_KEYS}))}
  if fs.exists(marker) and wd.read_json(marker).get("settings") == settings:
    return wd.read_json(marker)["scores"]
  model = spml.build_model(config, c)
  mesh = mesh_lib.make_mesh(config.mesh)
  scores: dict[str, Any] = {}
  for r in range(1, rounds + 1):
    variables = train_classifier(config, workdir, r, c, training)
    if r == rounds:
      break
    next_root = _label_dir(workdir, r + 1)
    round_marker = os.path.join(next_root, "complete.json")
    if fs.exists(round_marker) and wd.read_json(round_marker).get("settings") == training:
      scores.update(wd.read_json(round_marker)["scores"])
      continue
    propagate.propagate(_no_walk_crf(config), workdir, model, variables, mesh, next_root,
                          score_source="bootstrap", logt=int(bc.rw_logt),
                          scales=tuple(bc.label_scales))
    scored = scoring.label_files(config, os.path.join(next_root, "pseudo"),
                                 config.data.sweep_split)
    round_scores = {f"spml_boot_round{r + 1}_pseudo_miou": scored["miou"]}
    wd.write_json(round_marker, {"settings": training, "scores": round_scores})
    scores.update(round_scores)
  scores["spml_boot_miou"] = propagate.classifier_miou(
      config, model, variables, mesh, c, tuple(bc.final_scales), bool(bc.final_crf))
  label_fn = _tagged_labels_fn(config, model)
  for split in dict.fromkeys([config.data.train_split, config.data.sweep_split]):
    for record, out in inference.predict_split(config, split, label_fn, mesh,
                                               variables=variables):
      h, w = record["mask"].shape
      label_sources.write_label(os.path.join(out_root, "pseudo"), record["id"],
                                out["label"][:h, :w])
  scored = scoring.label_files(config, os.path.join(out_root, "pseudo"),
                               config.data.sweep_split)
  scores.update({f"spml_boot_pseudo_{k}": v for k, v in scored.items()})
  wd.write_json(os.path.join(out_root, "pseudo", "settings.json"), settings)
  wd.write_json(marker, {"settings": settings, "scores": scores})
  return scores
