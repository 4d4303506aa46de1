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
(sweep split, as the pseudo stage scores), `spml_classifier_miou`.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.data import sources
from wsss_jax.methods import spml
from wsss_jax.runtime import mesh as mesh_lib
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
  if config.spml_labels.eval_classifier:
    scores["spml_classifier_miou"] = propagate.classifier_miou(config, model, variables,
                                                               mesh, c)
  wd.write_json(os.path.join(out_root, "pseudo", "settings.json"), settings)
  wd.write_json(marker, {"settings": settings, "scores": scores})
  return scores
