"""PNG figures in `workdir/figures/`: threshold curve, per-class IoU bars, CAM overlays,
pseudo-label vs ground-truth gallery.

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
                   series: dict[str, Sequence[float]]) -> None:
  """Grouped bars of per-class IoU, one series per stage (cam, pseudo, seg)."""
  _save(path, lambda: viz.per_class_bars(class_names, series))


def cam_overlays(path: str, images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                 titles: Sequence[str]) -> None:
  """One column per image: the photo, then the max over its CAMs as a heat map overlay.

  Args:
    images: uint8 [H, W, 3] each.
    cams: float [K, H, W] each (K may be 0).
  """
  _save(path, lambda: viz.cam_overlays(images, cams, titles))


def label_gallery(path: str, images: Sequence[np.ndarray],
                  rows: dict[str, Sequence[np.ndarray]], titles: Sequence[str]) -> None:
  """Photo row, then one row per label map set (e.g. 'ground truth', 'pseudo')."""
  _save(path, lambda: viz.label_gallery(images, rows, titles))
