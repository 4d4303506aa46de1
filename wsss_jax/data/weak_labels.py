"""Sparse/coarse weak labels derived from ground-truth masks, for SPML experiments.

`data.weak_label` = `points` | `scribbles` | `boxes` simulates the annotations SPML handles
besides image tags (METHODS.md §5.4) from the masks of a dataset that has no such
annotations (MSRC, synthetic). Output label maps use the SPML encoding: class ids
0..C-1 where annotated, `unlabeled` (= C) elsewhere; GT void pixels (255) are unlabeled.
Everything is deterministic per mask (no randomness), so a record always gets the same
annotation.

  * points: per connected component of every class (background included) of at least
    `min_area` pixels, its most interior pixel (maximum of the distance transform),
    dilated to a disk of radius 6 (the released code dilates point labels by 6).
  * scribbles: per component, its skeleton (scikit-image `skeletonize`), dilated by 3.
  * boxes: per foreground component, its bounding box. Outside every box: background.
    Inside: the box's central region (each side shrunk to `box_core` of the box) takes
    the class where a single class covers it; the rest of the box interior is unlabeled
    (SPML derives box labels from box-wise CAMs, which we do not have here).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsss_jax.ops import IGNORE_INDEX

KINDS = ("points", "scribbles", "boxes")


def _disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return (y * y + x * x) <= radius * radius


def _components(mask: np.ndarray, cls: int, min_area: int):
  comp, n = ndimage.label(mask == cls)
  for k in range(1, n + 1):
    region = comp == k
    if region.sum() >= min_area:
      yield region


def weak_label(mask: np.ndarray, kind: str, num_classes: int, *, min_area: int = 16,
               point_radius: int = 6, scribble_radius: int = 3,
               box_core: float = 0.5) -> np.ndarray:
  """The weak annotation of one GT mask.

  Args:
    mask: uint8 [H, W] GT class ids (255 void).
    kind: one of `KINDS`.
    num_classes: C; the returned "unlabeled" id.
    min_area: components smaller than this (pixels) get no annotation.
    point_radius, scribble_radius: dilation radii (pixels).
    box_core: side fraction of a box's labelled core.

  Returns:
    uint8 [H, W]: class ids where annotated, C elsewhere.
  """
  if kind not in KINDS:
    raise ValueError(f"config.data.weak_label={kind!r}; expected 'tags' or one of {KINDS}")
  out = np.full(mask.shape, num_classes, np.uint8)
  classes = [int(c) for c in np.unique(mask) if c != IGNORE_INDEX and c < num_classes]
  if kind == "points":
    for c in classes:
      for region in _components(mask, c, min_area):
        # Padded so that the image border counts as the region's boundary.
        dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        spot = np.zeros(mask.shape, bool)
        spot[y, x] = True
        out[ndimage.binary_dilation(spot, _disk(point_radius))] = c
  elif kind == "scribbles":
    from skimage.morphology import skeletonize  # Local import: optional dependency.
    for c in classes:
      for region in _components(mask, c, min_area):
        out[ndimage.binary_dilation(skeletonize(region), _disk(scribble_radius))] = c
  else:
    out[:] = 0
    cover = np.zeros((num_classes,) + mask.shape, bool)
    core = np.zeros((num_classes,) + mask.shape, bool)
    for c in classes:
      if c == 0:
        continue
      for region in _components(mask, c, min_area):
        ys, xs = np.nonzero(region)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        cover[c, y0:y1, x0:x1] = True
        dy, dx = (y1 - y0) * (1 - box_core) / 2, (x1 - x0) * (1 - box_core) / 2
        core[c, int(y0 + dy):int(np.ceil(y1 - dy)), int(x0 + dx):int(np.ceil(x1 - dx))] = True
    n_cover = cover.sum(axis=0)
    out[n_cover > 0] = num_classes
    owner = np.argmax(cover, axis=0)
    owner_core = np.take_along_axis(core, owner[None], axis=0)[0]
    labelled = (n_cover == 1) & owner_core
    out[labelled] = owner[labelled]
  return out
