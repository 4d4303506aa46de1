r"""Where DSCNet-R's SGCL groups put object pixels, on a trained work directory (issue 31).

SGCL's groups were k-means clusters labelled by the majority pseudo-label of their cells
(`sgcl_groups='majority'`): an object cell in a mostly-background cluster got a background
target. They are now cluster ∩ pseudo-label (`'split'`, `ops.group_contrast.split_groups`):
a cell's group label is its own pseudo-label. This module counts, over real images, the
ground-truth object cells that land in a background-labelled group (and background cells
in an object-labelled group) under both groupings, with two label sources:

  * `gt`: the ground-truth mask as labels (the split share is 0 by construction);
  * `pseudo`: the run's own Eq. 2 labels, computed as the loss does (plain CAMs of the
    model, ReLU, max-normalised over the image's classes, background score
    `pseudo_bg_threshold`), so a share is the object cells SGCL pulls toward background.

The groups are the model's k-means groups (`gc.batch_groups`, the run's settings) on each
whole image, one k-means seed per image index. `stage='baseline'` measures the warm start
Y of step 0, `'train'` the end of training.

  python -m wsss_jax.analysis.groups runs/matrix/dscnet/seed1 --stage=baseline --images=48
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import methods
from wsss_jax.analysis import features as feats
from wsss_jax.analysis import reader
from wsss_jax.data import transforms
from wsss_jax.models.dscnet_net import KEY_SALT
from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import group_contrast as gc
from wsss_jax.stages import inference

LABEL_SOURCES = ("gt", "pseudo")
GROUPINGS = ("majority", "split")


def group_label_counts(gt: np.ndarray, labels: np.ndarray, assign: np.ndarray,
                       num_classes: int) -> dict[str, int]:
  """Cells whose group label contradicts the ground truth, for one image (NumPy).

  Args:
    gt: [N] int ground truth (0 = background, 1..C-1 = objects, anything else ignored).
    labels: [N] int labels the groups are labelled with (values outside [0, C) = none).
    assign: [N] int k-means cluster ids (-1 = no group).
    num_classes: C with background.

  Returns:
    Over cells that belong to a group (assign >= 0, a label in [0, C)):
    'objects' / 'background': ground-truth object / background cells;
    'majority' / 'split': object cells in a background-labelled group, the group being
    the cluster labelled by its majority (ties: lowest id, as `gc.group_labels`) or the
    cluster ∩ label group (its label is the cell's own);
    'bg_majority' / 'bg_split': background cells in an object-labelled group, likewise.
  """
  gt, labels, assign = (np.asarray(x).reshape(-1).astype(np.int64) for x in (gt, labels, assign))
  labelled = (assign >= 0) & (labels >= 0) & (labels < num_classes)
  k = int(assign.max()) + 1 if assign.size and assign.max() >= 0 else 0
  votes = np.zeros((max(k, 1), num_classes), np.int64)
  np.add.at(votes, (assign[labelled], labels[labelled]), 1)
  majority = np.argmax(votes, axis=1)[np.maximum(assign, 0)]
  objects = labelled & (gt >= 1) & (gt < num_classes)
  background = labelled & (gt == 0)
  return {"objects": int(objects.sum()), "background": int(background.sum()),
          "majority": int((objects & (majority == 0)).sum()),
          "split": int((objects & (labels == 0)).sum()),
          "bg_majority": int((background & (majority != 0)).sum()),
          "bg_split": int((background & (labels != 0)).sum())}


def sgcl_group_shares(w: reader.Workdir, stage: str = "train", split: str | None = None,
                      num_images: int = 48) -> dict[str, Any]:
  """Shares of ground-truth object cells in background-labelled groups (module docstring).

  Args:
    w: a DSCNet-R work directory (its `config.dscnet_r` gives the grouping settings).
    stage: 'baseline' (the warm start's model: Y at step 0) or 'train'.
    split: default the run's training split; num_images: the first N of it.

  Returns:
    {'stage', 'split', 'images', 'object_cells', 'background_cells',
    '<source>_<grouping>': share of object cells in background-labelled groups,
    '<source>_bg_<grouping>': share of background cells in object-labelled groups} for
    source in LABEL_SOURCES and grouping in GROUPINGS, plus 'pseudo_fg_fraction' (the
    share of cells Eq. 2 labels foreground).
  """
  if "dscnet_r" not in w.config:
    raise ValueError(f"{w.path}: not a DSCNet-R run (config.method={w.config.method!r})")
  r = w.config.dscnet_r.reconstructed
  c = w.num_classes
  split = split or w.train_split
  method = methods.make_method(w.config, c, name="cam" if stage == "baseline" else None)
  variables = w.variables(stage)

  @jax.jit
  def groups(v: Any, image: jax.Array, present: jax.Array, key: jax.Array):
    out = inference.forward(method.model, v, transforms.normalize(image))
    cams = out.get("plain_cams", out["cams"])
    f = out["features"]
    valid = jnp.ones(f.shape[:3], bool)
    ncam = cam_ops.normalize_cams(jax.nn.relu(cams), present, valid)
    y = cam_ops.cams_to_labels(ncam, present, float(r.pseudo_bg_threshold), valid)
    assign = gc.batch_groups(key[None], f, valid, present > 0, k_max=c,
                             extra_groups=int(r.extra_groups), space=r.kmeans_space,
                             num_iters=int(r.kmeans_iters), init=r.kmeans_init)
    return y[0], assign[0]

  totals = {f"{s}_{g}": 0 for s in LABEL_SOURCES for g in GROUPINGS}
  bg_totals = {f"{s}_bg_{g}": 0 for s in LABEL_SOURCES for g in GROUPINGS}
  objects = background = fg = cells = 0
  n = min(num_images, len(w.source(split)))
  for i in range(n):
    rec = w.record(split, i)
    key = jax.random.fold_in(jax.random.key(KEY_SALT), i)
    y, assign = jax.device_get(groups(variables, jnp.asarray(rec["image"][None]),
                                      jnp.asarray(rec["labels"][None], jnp.float32), key))
    gt = feats.resize_labels(rec["mask"].astype(np.int64), y.shape).reshape(-1)
    for source, labels in (("gt", gt), ("pseudo", y.reshape(-1))):
      counts = group_label_counts(gt, labels, assign, c)
      for g in GROUPINGS:
        totals[f"{source}_{g}"] += counts[g]
        bg_totals[f"{source}_bg_{g}"] += counts[f"bg_{g}"]
      if source == "pseudo":  # every cell has a pseudo label: the same cells as for gt
        objects += counts["objects"]
        background += counts["background"]
    fg += int(((y > 0) & (y < c)).sum())
    cells += int(y.size)
  out: dict[str, Any] = {"stage": stage, "split": split, "images": n, "object_cells": objects,
                         "background_cells": background}
  out.update({k: v / max(objects, 1) for k, v in totals.items()})
  out.update({k: v / max(background, 1) for k, v in bg_totals.items()})
  out["pseudo_fg_fraction"] = fg / max(cells, 1)
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir")
  p.add_argument("--stage", default="train", choices=("baseline", "train"))
  p.add_argument("--split", default=None)
  p.add_argument("--images", type=int, default=48)
  a = p.parse_args(argv)
  print(json.dumps(sgcl_group_shares(reader.open_workdir(a.workdir), a.stage, a.split,
                                     a.images), indent=1))


if __name__ == "__main__":
  main()
