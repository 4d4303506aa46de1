"""Class prototypes from CAM-weighted pixel features, and their EMA across steps.

FBR (METHODS.md §3.2, Eq. 3; PPC/RegionContrast style): for each foreground class c the
prototype is the CAM-weighted mean of the features of the top-K pixels of that class's
normalised CAM over the whole batch,

  p_c = sum_{i in T_c} M_c(i) z(i) / sum_{i in T_c} M_c(i),   T_c = top-K pixels of M_c.

Pixels of images without class c carry M_c = 0 (the CAMs are label-masked), so they have
zero weight even if the top-K reaches them; a class whose top-K weights are all zero has
no prototype (`valid` False).

`prototype_ema` keeps a running prototype per class across steps (off = momentum 0
reproduces the paper, which uses the batch prototypes only). Everything is pure and
shape-static.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_weighted_prototypes(features: jax.Array, scores: jax.Array,
                             k: int) -> tuple[jax.Array, jax.Array]:
  """CAM-weighted mean of each class's top-k pixels.

  Args:
    features: [N, D] pixel features (N = all pixels of the batch, any order).
    scores: [N, C] non-negative class scores (normalised CAMs, 0 where a class is absent).
    k: pixels per class (static; clipped to N).

  Returns:
    (prototypes [C, D] float32 (zeros where invalid), valid [C] bool: the top-k weights
    sum to > 0).
  """
  feats = features.astype(jnp.float32)
  s = scores.astype(jnp.float32)
  k = int(min(max(k, 1), s.shape[0]))
  top_w, top_i = jax.lax.top_k(s.T, k)                       # [C, k] each
  top_w = jnp.maximum(top_w, 0.0)
  den = jnp.sum(top_w, axis=-1)                               # [C]
  num = jnp.einsum("ck,ckd->cd", top_w, feats[top_i])         # [C, D]
  valid = den > 0
  protos = jnp.where(valid[:, None], num / jnp.where(valid, den, 1.0)[:, None], 0.0)
  return protos, valid


def prototype_ema(previous: jax.Array, previous_valid: jax.Array, current: jax.Array,
                  current_valid: jax.Array, momentum: float) -> tuple[jax.Array, jax.Array]:
  """Exponential moving average of class prototypes.

  new_c = momentum * previous_c + (1 - momentum) * current_c when both are valid;
  current_c when only it is valid (the first time a class is seen); previous_c when the
  class is absent from this batch. `momentum = 0` returns `current` (the paper's setting).

  Args:
    previous: [C, D] running prototypes.
    previous_valid: [C] bool.
    current: [C, D] this batch's prototypes.
    current_valid: [C] bool.
    momentum: in [0, 1).

  Returns:
    (prototypes [C, D] float32, valid [C] bool).
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"prototype EMA momentum must be in [0, 1), got {momentum}")
  prev = previous.astype(jnp.float32)
  cur = current.astype(jnp.float32)
  both = (previous_valid & current_valid)[:, None]
  blended = momentum * prev + (1.0 - momentum) * cur
  out = jnp.where(both, blended, jnp.where(current_valid[:, None], cur, prev))
  return out, previous_valid | current_valid
