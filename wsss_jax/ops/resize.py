"""Resizing of images, class maps and label maps (METHODS §1.4, §7.4).

* `resize_bilinear(..., align_corners=False)`: half-pixel bilinear via `jax.image.resize`,
  equal to PyTorch `F.interpolate(mode='bilinear', align_corners=False)` (IRN/PSA) when
  `antialias=False` (the default here, unlike `jax.image.resize`'s own default, which low-pass
  filters when downsampling).
* `resize_bilinear(..., align_corners=True)`: PyTorch's `align_corners=True` (PNOC/CSRM):
  output pixel i samples input coordinate i * (in - 1) / (out - 1) (corner pixels map onto
  corner pixels). Written as two static gathers and a lerp per axis, so it is exact in
  float32 on every backend (no matmul precision issues on TPU).
* `resize_nearest`: label maps (any dtype, 255 stays 255), half-pixel centres by default
  (PIL / `jax.image.resize` / torch 'nearest-exact'); `half_pixel=False` is PyTorch's legacy
  'nearest' (src = floor(i * in / out)).

All sizes are static Python ints; every function is jittable.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _as_size(size: Sequence[int]) -> tuple[int, int]:
  h, w = (int(s) for s in size)
  if h <= 0 or w <= 0:
    raise ValueError(f"size must be positive, got {size}")
  return h, w


def _align_corners_taps(n_in: int, n_out: int):
  """Static (i0, i1, frac) for align_corners=True along one axis."""
  if n_out == 1 or n_in == 1:
    src = np.zeros(n_out, np.float64)
  else:
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  i0 = np.clip(np.floor(src).astype(np.int32), 0, n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = (src - i0).astype(np.float32)
  return i0, i1, frac


def _lerp_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
  i0, i1, frac = _align_corners_taps(x.shape[axis], n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  f = jnp.asarray(frac).reshape(shape)
  a = jnp.take(x, jnp.asarray(i0), axis=axis)
  b = jnp.take(x, jnp.asarray(i1), axis=axis)
  return a + (b - a) * f


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool = False,
                    antialias: bool = False) -> jax.Array:
  """Bilinear resize of NHWC images / class maps.

  Args:
    x: [B, H, W, C] or [H, W, C]; integer inputs are converted to float32.
    size: (out_h, out_w), static.
    align_corners: False = half-pixel centres (PyTorch align_corners=False, jax.image.resize);
      True = PyTorch align_corners=True.
    antialias: only for align_corners=False: low-pass filter when downsampling (the
      `jax.image.resize` default). False (default) reproduces PyTorch's plain 2-tap bilinear.

  Returns:
    float [B, out_h, out_w, C] or [out_h, out_w, C].
  """
  out_h, out_w = _as_size(size)
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(f"expected [B,H,W,C] or [H,W,C], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  h_axis = x.ndim - 3
  if (x.shape[h_axis], x.shape[h_axis + 1]) == (out_h, out_w):
    return x
  if align_corners:
    return _lerp_axis(_lerp_axis(x, h_axis, out_h), h_axis + 1, out_w)
  shape = x.shape[:h_axis] + (out_h, out_w) + x.shape[-1:]
  return jax.image.resize(x, shape, method="linear", antialias=antialias)


def _nearest_index(n_in: int, n_out: int, half_pixel: bool) -> np.ndarray:
  scale = n_in / n_out
  if half_pixel:
    src = np.floor((np.arange(n_out) + 0.5) * scale)
  else:
    src = np.floor(np.arange(n_out) * scale)
  return np.clip(src, 0, n_in - 1).astype(np.int32)


def resize_nearest(labels: jax.Array, size: Sequence[int], half_pixel: bool = True) -> jax.Array:
  """Nearest-neighbour resize of label maps over the LAST TWO axes.

  Args:
    labels: [..., H, W] of any dtype (class ids, 255 = ignore, bool masks).
    size: (out_h, out_w), static.
    half_pixel: True = sample at output-pixel centres (PIL NEAREST, jax.image.resize
      'nearest', torch 'nearest-exact'); False = PyTorch legacy 'nearest'.

  Returns:
    [..., out_h, out_w], same dtype.
  """
  out_h, out_w = _as_size(size)
  labels = jnp.asarray(labels)
  h, w = labels.shape[-2:]
  if (h, w) == (out_h, out_w):
    return labels
  rows = jnp.asarray(_nearest_index(h, out_h, half_pixel))
  cols = jnp.asarray(_nearest_index(w, out_w, half_pixel))
  return jnp.take(jnp.take(labels, rows, axis=-2), cols, axis=-1)
