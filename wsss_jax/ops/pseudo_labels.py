"""Pseudo-labels from CAMs (METHODS.md §1.1 S4): one entry point over the modes of
`config.pseudo.mode`, built from the threshold and CRF rules of `ops/cam.py`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import crf as crf_lib

MODES = ("threshold", "threshold_crf", "double", "crf")


def pseudo_labels(cams: jax.Array, labels: jax.Array, images: jax.Array, valid: jax.Array,
                  *, mode: str, fg_threshold: float | jax.Array,
                  bg_threshold: float | jax.Array, crf_params: crf_lib.CRFParams,
                  crf_iters: int = 10, gt_prob: float = 0.7,
                  max_labels: int | None = None) -> jax.Array:
  """Pseudo-label maps for a batch.

  Args:
    cams: float [B, H, W, K] max-normalised CAMs over the fg classes.
    labels: [B, K] multi-hot image labels (only these classes can win; the CRF runs over
      background + these classes).
    images: [B, H, W, 3] RGB in 0..255 (used by the CRF only).
    valid: bool [B, H, W]; False pixels (padding) get 255.
    mode: 'threshold' (argmax at fg_threshold), 'threshold_crf' (that argmax refined by
      the label CRF over background + the image's classes: the calibration pipeline's
      labels, no unsure pixels), 'double' (IRN double threshold, 255 between), 'crf' (IRN:
      each threshold's argmax refined by the label CRF, combined).
    fg_threshold, bg_threshold: background plane values (bg_threshold: double/crf only).
    crf_params, crf_iters, gt_prob: the label CRF (METHODS §1.3).
    max_labels: static channel count of the CRF: 1 + the most classes any image has
      (`ops.cam.crf_refine_labels`); None runs it on all C channels (same labels, slower).

  Returns:
    int32 [B, H, W] class ids, 255 = unsure / padding.
  """
  if mode == "threshold":
    return cam_ops.cams_to_labels(cams, labels, fg_threshold, valid)
  if mode == "threshold_crf":
    return cam_ops.crf_refine_labels(
        cam_ops.cams_to_labels(cams, labels, fg_threshold, valid), labels,
        jnp.asarray(images), crf_params, crf_iters, gt_prob, valid, max_labels)
  if mode == "double":
    return cam_ops.double_threshold_labels(cams, labels, fg_threshold, bg_threshold, valid)
  if mode == "crf":
    return cam_ops.double_threshold_labels_crf(
        cams, labels, jnp.asarray(images), fg_threshold, bg_threshold, crf_params,
        crf_iters, gt_prob, valid, max_labels)
  raise ValueError(f"pseudo mode {mode!r}; expected one of {MODES}")
