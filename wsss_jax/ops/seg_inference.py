"""Segmentation inference (METHODS.md §1.1 S6): multi-scale + flip softmax, optional CRF."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from wsss_jax.ops import crf as crf_lib
from wsss_jax.ops import resize
from wsss_jax.ops import sizes


def multiscale_probs(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                     scales: Sequence[float], flip: bool) -> jax.Array:
  """Mean class probabilities over scales (and horizontal flips).

  Args:
    logits_fn: images [b, h, w, 3] -> logits [b, h', w', C] at any stride.
    images: float [B, H, W, 3] normalised.
    scales: static image scales (sizes rounded as in `ops/cam.py`); each pass's logits are
      resized back to H×W (half-pixel bilinear) before the softmax.
    flip: also run the mirrored images (in the same batch) and mirror their output back.

  Returns:
    float32 [B, H, W, C] probabilities (mean of the softmaxes of all passes).
  """
  return _multiscale_mean(logits_fn, images, scales, flip, lambda x: jax.nn.softmax(x, -1))


def multiscale_logits(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                      scales: Sequence[float], flip: bool) -> jax.Array:
  """Mean *logits* over scales and flips (SPML's `pseudo_softmax.py` averages logits, then
  takes one softmax); arguments as `multiscale_probs`. Returns float32 [B, H, W, C]."""
  return _multiscale_mean(logits_fn, images, scales, flip, lambda x: x)


def _multiscale_mean(logits_fn, images, scales, flip, transform):
  b, h, w, _ = images.shape
  total = 0.0
  for s in scales:
    size = (sizes.scaled_size(h, s), sizes.scaled_size(w, s))
    x = images if size == (h, w) else resize.resize_bilinear(images, size)
    if flip:
      x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
    out = transform(resize.resize_bilinear(logits_fn(x).astype(jnp.float32), (h, w)))
    total = total + (out[:b] + out[b:, :, ::-1] if flip else out)
  return total / (len(scales) * (2 if flip else 1))


def crf_refine_probs(probs: jax.Array, images: jax.Array, valid: jax.Array,
                     params: crf_lib.CRFParams = crf_lib.DEEPLAB_CRF,
                     num_iters: int = 10) -> jax.Array:
  """DeepLab-style CRF post-processing: softmax unary → marginals [B, H, W, C]."""
  unary = crf_lib.unary_from_softmax(probs)
  return crf_lib.dense_crf_batch(unary, images, params, num_iters, valid=valid)
