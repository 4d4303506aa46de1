"""`spml_labels` stage: SPML inference -> pseudo-labels for the shared segmentation stage.

SPML trains on `data.label_sources.SPMLTrainSource` (the `train` stage); the pure steps below
are `ops/propagation.py`, their inference loops `stages/propagate.py`.

Pseudo-labels (METHODS.md §5.5), per image of the train and sweep splits, with the trained
SPML embedding (`workdir/train`):

1. Random walk ("cam_rw"): embeddings at scale 1 (+ flip), resized to stride
   `rw_stride`, affinity a_ij = exp(rw_scale (e_i.e_j - 1)) averaged over the flips,
   raised to `rw_beta`, column-normalised -> T; scores v <- v T repeated 2^`rw_logt` times
   (= v T^(2^logt), without forming the matrix power). Scores: for tags the baseline's
   CAMs (`workdir/cams`, the image's classes) with a constant background plane at the
   sweep's best threshold (our CAMs' background rule; SEAM's (1-max)^6 does not apply to
   them); for points/scribbles/boxes the SPML classifier's softmax (flip-averaged).
   DeepLab CRF on the walked scores before the argmax (`rw_crf`, default on as the
   reference's pseudo_camrw_crf.py), so step 2 labels its prototypes with the CRF'd
   labels. Argmax -> cam_rw labels.
2. Nearest-prototype propagation ("cam_nn", tags only, `propagation='nn'`): per image,
   spherical k-means (`nn_grid`^2 grid init) on the location-augmented embedding; each
   cluster's prototype is labelled with its majority cam_rw label; all training-set
   prototypes form the memory. Each cluster of each image retrieves its `nn_topk` nearest
   memory prototypes; their label histogram is the cluster's class distribution. Tag
   classes are divided by max(their max, `nn_min_norm`); classes absent from the tags are
   zeroed (`nn_mask_absent`, our choice; the reference code leaves them). DeepLab CRF
   (`nn_crf`), argmax.

Scale 1 + flip only (the reference uses 0.5-2 and sliding windows: CPU budget). The
reference then trains two bootstrapped softmax classifiers on these labels: the
`spml_bootstrap` stage (`stages/spml_bootstrap.py`, in the full configs), whose labels the
`seg` stage then trains on; without it the `seg` stage trains on these labels
(`--config.seg.pseudo_dir=spml/pseudo`). SPML's own jointly trained classifier is scored
on `data.val_split` directly (`spml_classifier_miou`, scale 1 + flip, no CRF).

Writes `workdir/spml/pseudo/<id>.png` and reports `spml_rw_miou`, `spml_pseudo_miou`
(sweep split, as the pseudo stage scores), `spml_classifier_miou`, and for tags the
diagnostic `spml_rw_miou_steps<t>`: the random-walk labels' mIoU on the sweep split after
t steps of one walk, for each t of `rw_diag_steps` (with `rw_crf`, as step 1 makes them;
with a working embedding it should rise with t). It costs one more forward pass and one
CRF per t and image of the sweep split; `rw_diag_steps=()` turns it off.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.data import sources
from wsss_jax.methods import spml
from wsss_jax.ops import metrics
from wsss_jax.ops import propagation
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.stages import cam_store
from wsss_jax.stages import inference
from wsss_jax.stages import propagate
from wsss_jax.stages import registry
from wsss_jax.stages import scoring
from wsss_jax.stages import workdir as wd

OUT_DIR = registry.SPML_LABELS_DIR   # labels in workdir/spml/pseudo/<id>.png


def default_config() -> mlc.ConfigDict:
  """The `config.spml_labels` block."""
  return mlc.ConfigDict(dict(
      propagation="",            # nn | rw; '' = nn for tags, rw for the other weak labels
      train_labels="pseudo",     # folder of the CAM pseudo-labels SPML trains on (tags)
      flip=True,
      rw_stride=8, rw_scale=5.0, rw_beta=20.0, rw_logt=6,
      rw_crf=True,               # DeepLab CRF after the walk (reference pseudo_camrw_crf.py)
      max_classes=8,             # classes per image carried through the random walk
      rw_diag_steps=(1, 4, 16, 64),  # walk lengths scored as spml_rw_miou_steps<t> (tags)
      nn_grid=12, nn_iters=10, nn_topk=20, nn_min_norm=0.15, nn_mask_absent=True,
      nn_crf=True, eval_classifier=True))


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  if jax.process_count() > 1:
    # The prototype memory of step 2 needs every image's clusters in one process; the
    # multi-process gather (runtime/distributed.py) is not wired in here yet.
    raise ValueError("the spml_labels stage runs in a single process; run it without "
                     "--num_processes (the train stage may use several)")
  meta = sources.prepare(config.data)
  c = meta.num_classes
  mode = propagate.propagation_mode(config)
  use_cams = config.data.get("weak_label", "tags") == "tags"
  out_root = os.path.join(workdir, OUT_DIR)
  marker = os.path.join(out_root, "complete.json")
  bg = wd.foreground_threshold(config, workdir) if use_cams else 0.0
  settings = {"labels": config.spml_labels.to_dict(), "mode": mode, "bg": bg,
              "weak_label": config.data.get("weak_label", "tags")}
  if fs.exists(marker) and wd.read_json(marker).get("settings") == settings:
    return wd.read_json(marker)["scores"]
  model = spml.build_model(config, c)
  variables = inference.load_variables(
      os.path.join(workdir, "train", inference.VARIABLES_FILE))
  mesh = mesh_lib.make_mesh(config.mesh)
  scores = {"spml_rw_miou": propagate.propagate(
      config, workdir, model, variables, mesh, out_root,
      score_source="cams" if use_cams else "softmax", logt=int(config.spml_labels.rw_logt),
      bg=bg)}
  scored = scoring.label_files(config, os.path.join(out_root, "pseudo"),
                               config.data.sweep_split)
  scores.update({f"spml_pseudo_{k}": v for k, v in scored.items()})
  steps = tuple(int(t) for t in config.spml_labels.rw_diag_steps)
  if use_cams and steps:
    scores.update(walk_steps_miou(config, workdir, model, variables, mesh, bg, steps))
  if config.spml_labels.eval_classifier:
    scores["spml_classifier_miou"] = propagate.classifier_miou(config, model, variables,
                                                               mesh, c)
  wd.write_json(os.path.join(out_root, "pseudo", "settings.json"), settings)
  wd.write_json(marker, {"settings": settings, "scores": scores})
  return scores


def walk_steps_fn(config: mlc.ConfigDict, model: Any, num_classes: int, bg: float,
                  steps: Sequence[int]):
  """(variables, eval batch with `cams`) -> {'conf': int32 [B, T, C, C]}: per image, the
  confusion matrix of the CAM walk's labels (step 1 of the module docstring, `rw_crf`
  included) after each of the T walk lengths `steps`, against the batch's masks."""
  lc = config.spml_labels

  def fn(variables, batch):
    images, valid = batch["image"], batch["valid"]
    b = images.shape[0]
    x = jnp.concatenate([images, images[:, :, ::-1]]) if lc.flip else images
    emb = inference.forward(model, variables, x)["embedding"]
    views = [emb[:b]] + ([emb[b:, :, ::-1]] if lc.flip else [])
    scores = jnp.concatenate([jnp.full(batch["cams"].shape[:3] + (1,), bg), batch["cams"]],
                             axis=-1)
    labels = propagation.walk_labels_steps(
        scores, views, valid, propagation.present_classes(batch["labels"]), images,
        max_classes=int(lc.max_classes), stride=int(lc.rw_stride), scale=float(lc.rw_scale),
        beta=float(lc.rw_beta), steps=tuple(steps), crf=bool(lc.rw_crf))   # [T, B, P, P]
    conf = jax.vmap(lambda lab, gt, v: jax.vmap(
        lambda l: metrics.confusion_matrix(gt, l, num_classes, v))(lab))(
            jnp.swapaxes(labels, 0, 1), batch["mask"], valid)
    return {"conf": conf}

  return fn


def walk_steps_miou(config: mlc.ConfigDict, workdir: str, model: Any, variables: Any,
                    mesh: Any, bg: float, steps: Sequence[int]) -> dict[str, float]:
  """`{'spml_rw_miou_steps<t>': mIoU}` of the CAM walk's labels on the sweep split after t
  steps, for each t of `steps` (module docstring)."""
  c = sources.get_meta(config.data).num_classes
  split = config.data.sweep_split
  add = functools.partial(cam_store.dense_cams_batch,
                          cam_dir=cam_store.split_dir(workdir, split), num_fg=c - 1)
  conf = scoring.predicted(config, split, walk_steps_fn(config, model, c, bg, steps), mesh,
                           num_classes=c, variables=variables, add_inputs=add,
                           conf_shape=(len(steps),), what="spml walk lengths")
  return {f"spml_rw_miou_steps{t}": scoring.iou(conf[i])[1] for i, t in enumerate(steps)}
