"""PNG figures in `workdir/figures/`: threshold curve, per-class IoU bars, CAM overlays,
pseudo-label vs ground-truth gallery. Matplotlib with the Agg backend (no display)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsss_jax.data.palette import colorize  # noqa: E402
from wsss_jax.stages import workdir as wd  # noqa: E402


def _save(fig: Any, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with wd.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)


def threshold_curve(path: str, sweep: dict[str, Any]) -> None:
  """mIoU against the background threshold, best point marked."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(sweep["thresholds"], sweep["miou"], marker="o")
  ax.axvline(sweep["best_threshold"], color="gray", linestyle="--")
  ax.set_xlabel("background threshold")
  ax.set_ylabel(f"mIoU ({sweep['split']})")
  ax.set_title(f"best {sweep['best_miou']:.3f} at t={sweep['best_threshold']:.2f}")
  ax.grid(alpha=0.3)
  _save(fig, path)


def per_class_bars(path: str, class_names: Sequence[str],
                   series: dict[str, Sequence[float]]) -> None:
  """Grouped bars of per-class IoU, one series per stage (cam, pseudo, seg)."""
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(class_names)), 3.5))
  width = 0.8 / max(1, len(series))
  x = np.arange(len(class_names))
  for i, (name, values) in enumerate(series.items()):
    ax.bar(x + i * width, np.nan_to_num(np.asarray(values, float)), width, label=name)
  ax.set_xticks(x + 0.4 - width / 2, class_names, rotation=60, ha="right")
  ax.set_ylabel("IoU")
  ax.set_ylim(0, 1)
  ax.legend()
  _save(fig, path)


def cam_overlays(path: str, images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                 titles: Sequence[str]) -> None:
  """One column per image: the photo, then the max over its CAMs as a heat map overlay.

  Args:
    images: uint8 [H, W, 3] each.
    cams: float [K, H, W] each (K may be 0).
  """
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.4), squeeze=False)
  for j, (img, cam, title) in enumerate(zip(images, cams, titles)):
    axes[0, j].imshow(img)
    axes[0, j].set_title(title, fontsize=7)
    heat = cam.max(axis=0) if len(cam) else np.zeros(img.shape[:2])
    axes[1, j].imshow(img)
    axes[1, j].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for ax in axes[:, j]:
      ax.axis("off")
  _save(fig, path)


def label_gallery(path: str, images: Sequence[np.ndarray],
                  rows: dict[str, Sequence[np.ndarray]], titles: Sequence[str]) -> None:
  """Photo row, then one row per label map set (e.g. 'ground truth', 'pseudo')."""
  n = len(images)
  fig, axes = plt.subplots(1 + len(rows), n, figsize=(2.2 * n, 2.2 * (1 + len(rows))),
                           squeeze=False)
  for j in range(n):
    axes[0, j].imshow(images[j])
    axes[0, j].set_title(titles[j], fontsize=7)
    for i, (name, maps) in enumerate(rows.items(), start=1):
      axes[i, j].imshow(colorize(maps[j]))
      if j == 0:
        axes[i, j].set_ylabel(name)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  _save(fig, path)
