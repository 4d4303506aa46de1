"""PNG figures in `workdir/figures/`: threshold curve, per-class IoU bars, CAM overlays
(one per labelled class, with a colour bar), pseudo-label vs ground-truth gallery (with a
class colour legend).

The plots themselves are `wsss_jax.viz` (the same ones the notebooks show); this module
only saves them. Matplotlib is an optional extra: without it each figure is skipped with
a warning (logged once) and the stage's numbers and files are unaffected.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from wsss_jax import viz


def _save(path: str, make: Callable[[], Any]) -> None:
  """Builds the figure with `make()` and writes it to `path`, unless matplotlib is absent."""
  if not viz.available():
    logging.log_first_n(logging.WARNING, "Skipping figures (e.g. %s): %s", 1, path,
                        viz.INSTALL_HINT)
    return
  viz.save(make(), path)


def threshold_curve(path: str, sweep: dict[str, Any]) -> None:
  """mIoU against the background threshold, best point marked."""
  _save(path, lambda: viz.threshold_curve(sweep))


def per_class_bars(path: str, class_names: Sequence[str],
                   series: dict[str, Sequence[float]],
                   splits: dict[str, str] | None = None) -> None:
  """Grouped bars of per-class IoU, one series per stage (cam, pseudo, seg), each named
  with the split it was scored on; absent classes marked apart from an IoU of 0."""
  _save(path, lambda: viz.per_class_bars(class_names, series, splits=splits))


def cam_overlays(path: str, images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                 keys: Sequence[Sequence[int]], class_names: Sequence[str],
                 titles: Sequence[str], masks: Sequence[np.ndarray] | None = None) -> None:
  """One row per image: the photo, [its ground truth], then one overlay per labelled
  class titled with the class's name; a colour bar gives the CAM scale.

  Args:
    images: uint8 [H, W, 3] each.
    cams: float [K, H, W] each (K may be 0); channel k is class `keys[i][k]`.
    keys: class ids of each image's channels.
    class_names: background first.
    masks: optional ground-truth label maps (with a colour legend).
  """
  _save(path, lambda: viz.cam_per_class(images, cams, keys, class_names, titles, masks))


def label_gallery(path: str, images: Sequence[np.ndarray],
                  rows: dict[str, Sequence[np.ndarray]], titles: Sequence[str],
                  class_names: Sequence[str] | None = None) -> None:
  """Photo row, then one row per label map set (e.g. 'ground truth', 'pseudo'), with a
  legend of the classes shown and the "ignore" colour."""
  _save(path, lambda: viz.label_gallery(images, rows, titles, class_names))
