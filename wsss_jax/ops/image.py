"""ImageNet normalisation constants and the inverse normalisation, for host and device code
(numpy or JAX arrays; no JAX import). The forward, fast host normalisation is
`data.transforms.normalize`."""
from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # RGB, in [0, 1]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MEAN255 = IMAGENET_MEAN * 255.0
STD255 = IMAGENET_STD * 255.0


def denormalize(image, *, as_uint8: bool = True):
  """Inverse of `normalize`.

  Args:
    image: `[..., 3]` float numpy or jax array in normalised units.
    as_uint8: return uint8 (rounded and clipped to [0, 255]); else float32 in [0, 255]
      unclipped.

  Returns:
    Array of the same shape (same array library as the input).
  """
  out = image.astype(np.float32) * STD255 + MEAN255
  if as_uint8:
    out = out.clip(0.0, 255.0).round().astype(np.uint8)
  return out
