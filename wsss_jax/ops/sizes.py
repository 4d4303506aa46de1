"""Output sizes shared by host-side transforms and device-side inference (no JAX import, so
the data layer's workers do not load it)."""
from __future__ import annotations


def scaled_size(n: int, scale: float) -> int:
  """Side length of `n` pixels scaled by `scale`: `round(n * scale)`, at least 1 pixel.

  Python's round (ties to even), as IRN's `pil_rescale`; test-time scales (CAMs, the
  segmentation model's multi-scale inference) and the data transforms (random rescale,
  the eval pipeline's shrinking of oversize images) all size images with it.
  """
  return max(1, int(round(float(n) * float(scale))))
