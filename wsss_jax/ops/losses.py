"""Losses several methods share: the multi-label soft-margin loss of the CAM classifier
(CAM baseline, CSRM's classification branch, FBR, DSCNet-R) and the pixel cross-entropy of
the segmentation model (seg stage, CSRM's segmentation branch, SPML's classifier)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.ops import IGNORE_INDEX


def multilabel_soft_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-image multi-label soft-margin loss.

  Args:
    logits: [B, K] class scores (any float dtype; computed in float32).
    labels: [B, K] multi-hot {0, 1} (float or int).

  Returns:
    [B] float32: mean over the K classes of the BCE-with-logits.
  """
  z = logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  # log s(z) = -softplus(-z), log(1 - s(z)) = -softplus(z): stable for large |z|.
  bce = y * jax.nn.softplus(-z) + (1.0 - y) * jax.nn.softplus(z)
  return jnp.mean(bce, axis=-1)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Sum and count of per-pixel CE over labelled pixels.

  Args:
    logits: float [B, H, W, C].
    labels: int [B, H, W] class ids, 255 = ignore.
    label_smoothing: ε; the target is (1-ε)·onehot + ε/C.

  Returns:
    (sum of CE over valid pixels, number of valid pixels), float32 scalars.
  """
  num_classes = logits.shape[-1]
  valid = labels != IGNORE_INDEX
  target = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=jnp.float32)
  if label_smoothing:
    target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.sum(target * logp, axis=-1)
  return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid).astype(jnp.float32)
