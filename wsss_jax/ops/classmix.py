"""ClassMix on device (CSRM, METHODS.md §2.5; PNOC `batch_mixaug_pt`).

For every image a of the batch: pick a random other image b; from b's pseudo mask take its
present classes (not background, not 255) and keep a random max(floor(n/2), 1) of them;
paste b's pixels of those classes into a's image, pseudo mask and per-pixel extras (teacher
segmentation logits); set a's image labels of the pasted classes to 1. Applied to the whole
batch with probability p per step (one coin for the batch, as the reference).

Shape-static: partners come from a random cyclic shift per image ((a + s_a) mod B,
s_a in 1..B-1, i.e. uniform over the other images), the class subset from random
priorities masked to the present classes.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import resize



def present_classes(masks: jax.Array, num_classes: int) -> jax.Array:
  """[B, C] bool: which class ids 0..C-1 occur in each mask [B, H, W] (255 ignored)."""
  flat = masks.reshape(masks.shape[0], -1)
  onehot_any = jax.vmap(lambda m: jnp.zeros((num_classes + 1,), bool).at[
      jnp.where(m == IGNORE_INDEX, num_classes, m)].set(True, mode="drop"))(flat)
  return onehot_any[:, :num_classes]


def classmix_plan(key: jax.Array, masks: jax.Array, num_classes: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Random partners and pasted classes.

  Args:
    key: PRNG key.
    masks: int [B, H, W] pseudo masks (class ids, 255 = unsure).
    num_classes: C (background included).

  Returns:
    (partner [B] int32: index of image b for each a (a itself when B == 1),
     chosen [B, C] bool: classes of image partner[a] pasted into a; never background).
  """
  b = masks.shape[0]
  k_shift, k_pri = jax.random.split(key)
  shift = jax.random.randint(k_shift, (b,), 1, max(b, 2)) if b > 1 else jnp.zeros((1,), int)
  partner = ((jnp.arange(b) + shift) % b).astype(jnp.int32)
  present = present_classes(masks, num_classes).at[:, 0].set(False)          # [B, C]
  present_b = present[partner]
  n = jnp.sum(present_b, axis=-1)
  k = jnp.maximum(n // 2, 1)
  priority = jnp.where(present_b, jax.random.uniform(k_pri, present_b.shape), -1.0)
  # rank 0 = highest priority; keep the k best present classes.
  rank = jnp.argsort(jnp.argsort(-priority, axis=-1), axis=-1)
  chosen = present_b & (rank < k[:, None])
  return partner, chosen


def classmix(key: jax.Array, images: jax.Array, masks: jax.Array, labels: jax.Array,
             extras: Any = None, *, num_classes: int, prob: float = 0.5,
             apply: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, Any,
                                                     jax.Array]:
  """Mixes a batch consistently (images, pseudo masks, labels, per-pixel extras).

  Args:
    key: PRNG key.
    images: [B, H, W, 3].
    masks: int [B, H, W] pseudo masks (255 = unsure).
    labels: [B, C-1] multi-hot image labels (foreground classes).
    extras: pytree of [B, h, w, ...] arrays mixed like the image (teacher logits); at
      another resolution than the image the paste mask is resized (nearest).
    num_classes: C.
    prob: probability that this step mixes at all.
    apply: optional bool [] overriding the coin (tests).

  Returns:
    (images, masks, labels, extras, paste [B, H, W] bool: pixels taken from the partner;
    all False when the coin says no mixing).
  """
  k_coin, k_plan = jax.random.split(key)
  if apply is None:
    apply = jax.random.uniform(k_coin) < prob
  partner, chosen = classmix_plan(k_plan, masks, num_classes)
  pm = masks[partner]
  safe = jnp.where(pm == IGNORE_INDEX, 0, pm)
  paste = jnp.take_along_axis(chosen, safe.reshape(safe.shape[0], -1), axis=1)
  paste = paste.reshape(pm.shape) & (pm != IGNORE_INDEX) & apply

  def mix(x):
    # Extras at a lower resolution (stride-4 teacher maps) use the paste mask resized with
    # PyTorch's legacy nearest rule.
    sel = paste if x.shape[1:3] == paste.shape[1:3] else resize.resize_nearest(
        paste, x.shape[1:3], half_pixel=False)
    sel = sel.reshape(sel.shape + (1,) * (x.ndim - 3))
    return jnp.where(sel, x[partner], x)

  images = mix(images)
  masks = mix(masks)
  extras = jax.tree.map(mix, extras)
  new_labels = jnp.maximum(labels, (chosen[:, 1:] & apply).astype(labels.dtype))
  return images, masks, new_labels, extras, paste
