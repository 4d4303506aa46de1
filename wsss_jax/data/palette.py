"""The PASCAL VOC colour map and palette-PNG label files (masks, pseudo-labels)."""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image


@functools.cache
def voc_palette() -> np.ndarray:
  """The PASCAL VOC colour map, uint8 [256, 3] (index 255 = (224, 224, 192))."""
  pal = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  pal.setflags(write=False)
  return pal


def colorize(labels: np.ndarray) -> np.ndarray:
  """int [H, W] class ids (255 = ignore) → uint8 [H, W, 3] VOC colours."""
  return voc_palette()[np.clip(labels, 0, 255).astype(np.int64)]


def save_palette_png(path: str, mask: np.ndarray) -> None:
  """Writes a uint8 [H, W] class-id mask as a VOC palette ('P' mode) PNG; values exact."""
  img = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
  img.putpalette(voc_palette().ravel().tolist())
  img.save(path, format="PNG")
