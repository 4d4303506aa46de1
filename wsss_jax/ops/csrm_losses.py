"""CSRM losses, schedules and pixel selection as pure functions (METHODS.md §2.2-§2.4).

All functions take *global* arrays (the whole step's batch); `methods/csrm.py` gathers what
it needs across devices first, so the same code serves the jit and the shard_map step.
Conventions: K = C-1 foreground classes, class id 0 = background, 255 = ignore; "epoch" is
the reference's fixed-length epoch (`steps_per_epoch` updates, 46 for VOC), counted from 0.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops.contrastive import info_nce
from wsss_jax.ops.losses import multilabel_soft_margin_loss
from wsss_jax.ops.losses import pixel_cross_entropy
from wsss_jax.ops import crf as crf_ops
from wsss_jax.ops import resize



# --------------------------------------------------------------------------------------
# Schedules (all from the int32 step count).
# --------------------------------------------------------------------------------------


class Schedule(NamedTuple):
  """Per-step weights and rates (float32 scalars; `epoch` int32)."""
  epoch: jax.Array
  active: jax.Array        # 1 after warm-up (epoch >= warmup), else 0: w_u, w_contra
  w_s2c: jax.Array         # min(0.1 + 0.9 (e - w) / (E - w), 1) after warm-up, else 0
  keep_percent: jax.Array  # L_u: 100 - 20 (1 - e / E), percent of U pixels kept (lowest
  #                           entropy); U²PL's `drop_percent` (its percentile, not a drop rate)
  alpha_percent: jax.Array  # L_contra: 20 (1 - e / E), percent of low/high-entropy pixels


def schedule(step: jax.Array, steps_per_epoch: int, num_epochs: int,
             warmup_epochs: int) -> Schedule:
  """CSRM schedules at update `step` (0-based), with integer epoch e = step // spe."""
  e = (jnp.asarray(step, jnp.int32) // steps_per_epoch).astype(jnp.int32)
  ef = e.astype(jnp.float32)
  big_e, w = float(num_epochs), float(warmup_epochs)
  active = (e >= warmup_epochs).astype(jnp.float32)
  ramp = jnp.minimum(0.1 + 0.9 * (ef - w) / max(big_e - w, 1.0), 1.0)
  return Schedule(epoch=e, active=active, w_s2c=active * ramp,
                  keep_percent=100.0 - 20.0 * (1.0 - ef / big_e),
                  alpha_percent=20.0 * (1.0 - ef / big_e))


def ema_decay(step: jax.Array, steps_per_epoch: int, warmup_epochs: int,
              copy_inclusive: bool = True, max_decay: float = 0.99, *,
              count_current: bool = True) -> jax.Array:
  """Teacher decay d for the update after optimizer step `step` (θ_t <- d θ_t + (1-d) θ_s).

  `step` is the 0-based index of the update just made (the train state's count before its
  increment). d = 0 (copy the student) while epoch <= warmup (`copy_inclusive`, the
  reference's `<=`) or epoch < warmup; afterwards min(1 - 1 / (1 + n - warmup_steps),
  max_decay) with n = step + 1, the number of updates done including this one, as the
  reference reads its optimizer counter after the increment (`count_current`), or n = step.
  """
  step = jnp.asarray(step, jnp.int32)
  e = step // steps_per_epoch
  copy = (e <= warmup_epochs) if copy_inclusive else (e < warmup_epochs)
  n = step + 1 if count_current else step
  since = (n - warmup_epochs * steps_per_epoch).astype(jnp.float32)
  d = jnp.minimum(1.0 - 1.0 / (1.0 + jnp.maximum(since, 0.0)), max_decay)
  return jnp.where(copy, 0.0, d).astype(jnp.float32)


# --------------------------------------------------------------------------------------
# Pseudo-labels.
# --------------------------------------------------------------------------------------


def cam_pseudo_masks(cams: jax.Array, labels: jax.Array, images_rgb: jax.Array,
                     fg_threshold: float, bg_threshold: float, *, use_crf: bool = True,
                     crf_iters: int = 10, gt_prob: float = 0.7,
                     align_corners: bool = True) -> jax.Array:
  """Teacher-CAM pseudo masks with the double threshold (+ label CRF) (§2.3.1).

  A = ReLU(cams) ⊙ y, upsampled to the image size (bilinear), restricted to the present
  classes and max-normalised; then IRN `cam_to_ir_label` (fg threshold -> [CRF], bg
  threshold -> [CRF]; fg result, 255 where it is bg, 0 where both are bg).

  Args:
    cams: float [B, h, w, K] raw class maps (before ReLU).
    labels: [B, K] multi-hot.
    images_rgb: [B, H, W, 3] RGB in 0..255 (CRF input; only its size is used without CRF).
    fg_threshold, bg_threshold: δ_fg (0.30 VOC) and δ_bg (0.05).
    use_crf: run the on-device label CRF (`ops/crf.py`, LABEL_CRF); False = thresholds only.

  Returns:
    int32 [B, H, W] class ids, 255 = unsure.
  """
  size = images_rgb.shape[1:3]
  a = jax.nn.relu(cams.astype(jnp.float32))
  a = resize.resize_bilinear(a, size, align_corners=align_corners)
  a = cam_ops.normalize_cams(a, labels)
  if use_crf:
    return cam_ops.double_threshold_labels_crf(
        a, labels, jnp.clip(images_rgb, 0.0, 255.0), fg_threshold, bg_threshold,
        crf_ops.LABEL_CRF, crf_iters, gt_prob)
  return cam_ops.double_threshold_labels(a, labels, fg_threshold, bg_threshold)


def label_masked_probs(seg_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """P_t = softmax(S) ⊙ [1, y], renormalised over the channels (§2.2 step 4).

  Args:
    seg_logits: [B, H, W, C]; labels: [B, C-1].

  Returns:
    float32 [B, H, W, C].
  """
  p = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)
  keep = jnp.concatenate([jnp.ones(labels.shape[:-1] + (1,)),
                          (labels > 0.5).astype(jnp.float32)], axis=-1)
  p = p * keep[:, None, None, :]
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-12)


def entropy(probs: jax.Array) -> jax.Array:
  """Shannon entropy over the last axis (nats), [..., C] -> [...]."""
  return -jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)


def masked_percentile(values: jax.Array, mask: jax.Array, percent: jax.Array) -> jax.Array:
  """np.percentile(values[mask], percent) with linear interpolation; NaN if mask is empty."""
  v = jnp.where(mask, values.astype(jnp.float32), jnp.nan).reshape(-1)
  return jnp.nanquantile(v, jnp.clip(percent / 100.0, 0.0, 1.0))


# --------------------------------------------------------------------------------------
# Pixel losses. Each returns (sum, count) so the caller can normalise globally.
# --------------------------------------------------------------------------------------


def classification_loss(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """L_c per image [B]: multi-label soft margin against (1 - ls) y + ls / 2 (§2.3.0)."""
  y = labels.astype(jnp.float32) * (1.0 - smoothing) + smoothing / 2.0
  return multilabel_soft_margin_loss(logits, y)


def c2s_targets(cam_masks: jax.Array, is_labeled: jax.Array) -> jax.Array:
  """L_c2s targets: CAM pseudo masks of labelled images with a foreground pixel, else 255.

  Args:
    cam_masks: int [B, H, W]; is_labeled: bool [B] (the "L" half).
  """
  has_fg = jnp.any((cam_masks > 0) & (cam_masks != IGNORE_INDEX), axis=(1, 2))
  use = is_labeled & has_fg
  return jnp.where(use[:, None, None], cam_masks, IGNORE_INDEX)


def s2c_logits_targets(seg_logits: jax.Array, cams: jax.Array, teacher_probs: jax.Array,
                       threshold: float, align_corners: bool = True
                       ) -> tuple[jax.Array, jax.Array]:
  """L_s2c inputs (§2.3.2): Z = [stopgrad(S_s bg), up(A_s)], Ŷ = argmax P_t if max > σ.

  Args:
    seg_logits: student [B, H, W, C] at full resolution.
    cams: student raw class maps [B, h, w, C-1] (gradient flows here).
    teacher_probs: label-masked teacher P_t [B, H, W, C].
    threshold: σ_s2c (0.5).

  Returns:
    (Z [B, H, W, C], targets int32 [B, H, W] with 255 below the threshold).
  """
  size = seg_logits.shape[1:3]
  up = resize.resize_bilinear(cams.astype(jnp.float32), size, align_corners=align_corners)
  z = jnp.concatenate([jax.lax.stop_gradient(seg_logits[..., :1]), up], axis=-1)
  conf = jnp.max(teacher_probs, axis=-1)
  target = jnp.argmax(teacher_probs, axis=-1).astype(jnp.int32)
  return z, jnp.where(conf > threshold, target, IGNORE_INDEX)


def unsup_targets(teacher_argmax: jax.Array, teacher_entropy: jax.Array,
                  is_unlabeled: jax.Array, keep_percent: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """L_u targets: the `keep_percent` % lowest-entropy U pixels (§2.3.3, U²PL).

  Ŷ_t = argmax P_t on the U images; pixels whose (train-mode teacher) entropy is >= θ, the
  `keep_percent` percentile of the U pixels' entropies, become 255, so about keep_percent %
  of the U pixels are kept (80 % at the first epoch, rising to 100 %). U²PL calls this
  percentile `drop_percent`; it is the share kept, not dropped.

  Args:
    teacher_argmax: int [B, H, W] argmax of the label-masked teacher probabilities.
    teacher_entropy: [B, H, W] entropy that ranks the pixels.
    is_unlabeled: bool [B].
    keep_percent: percent of U pixels to keep (80 .. 100).

  Returns:
    (targets int32 [B, H, W], weight: float32 []: (#U pixels) / (#kept pixels), the U²PL
    re-weighting (1.25 when 80 % are kept); 0 when nothing is kept).
  """
  u = jnp.broadcast_to(is_unlabeled[:, None, None], teacher_entropy.shape)
  theta = masked_percentile(teacher_entropy, u, keep_percent)
  keep = u & (teacher_entropy < theta)
  target = jnp.where(keep, teacher_argmax, IGNORE_INDEX).astype(jnp.int32)
  n_all = jnp.sum(u).astype(jnp.float32)
  n_kept = jnp.sum(keep).astype(jnp.float32)
  return target, jnp.where(n_kept > 0, n_all / jnp.maximum(n_kept, 1.0), 0.0)


def ce_sum_count(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0):
  """(sum, count) of pixel cross-entropy over targets != 255 (`methods.seg`)."""
  return pixel_cross_entropy(logits, targets, smoothing)


# --------------------------------------------------------------------------------------
# Pixel contrast (§2.3.4, U²PL memory-bank contrast).
# --------------------------------------------------------------------------------------


class ContrastMasks(NamedTuple):
  """Per-class pixel sets over the N flattened stride-4 pixels (all [C, N] bool)."""
  anchor: jax.Array    # label c, low mask, prob_t[c] > δ_p: student anchors
  proto: jax.Array     # label c, low mask: teacher prototype; "valid class" if any
  negative: jax.Array  # high mask and the rank rules: teacher keys for queue c


def class_ranks(probs: jax.Array) -> jax.Array:
  """Rank of every class per pixel by descending probability (0 = top), [..., C] int32."""
  order = jnp.argsort(-probs, axis=-1)
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


def contrast_masks(labels4: jax.Array, probs4: jax.Array, entropy4: jax.Array,
                   is_unlabeled: jax.Array, image_labels: jax.Array,
                   alpha_percent: jax.Array, *, low_rank: int = 3, high_rank: int = 6,
                   positive_threshold: float = 0.3, negative_threshold: float = 1.0,
                   unlabeled_use_labels: bool = True) -> ContrastMasks:
  """Anchor / prototype / negative pixel sets of U²PL as CSRM uses them (§2.3.4).

  Args:
    labels4: int [B, h, w] stride-4 labels: CAM pseudo mask (L images), teacher argmax (U
      images); 255 = unsure.
    probs4: [B, h, w, C] train-mode teacher probabilities (NOT label-masked).
    entropy4: [B, h, w] their entropy.
    is_unlabeled: bool [B].
    image_labels: [B, C-1] multi-hot (after mixing); background counts as present.
    alpha_percent: α_t (percent): U pixels below the α-quantile of the entropy are "low",
      those at or above the (100-α)-quantile are "high". For L images low = high = labelled.
    low_rank, high_rank: r_l (3), r_h (6 VOC, 12 COCO).
    positive_threshold: δ_p (0.3).
    negative_threshold: δ_n (1.0): negatives of queue c need prob_t[c] < δ_n.
    unlabeled_use_labels: the reference reads the U images' labels ("c not in the image
      label" negatives, METHODS §2.8.4); False treats U as truly unlabeled (mid-rank only).

  Returns:
    ContrastMasks with [C, B*h*w] bool arrays (pixels in (image, row, col) order).
  """
  c = probs4.shape[-1]
  valid = labels4 != IGNORE_INDEX
  u = jnp.broadcast_to(is_unlabeled[:, None, None], labels4.shape)
  uv = u & valid
  lo_t = masked_percentile(entropy4, uv, alpha_percent)
  hi_t = masked_percentile(entropy4, uv, 100.0 - alpha_percent)
  low = jnp.where(u, uv & (entropy4 < lo_t), valid)
  high = jnp.where(u, uv & (entropy4 >= hi_t), valid)
  onehot = labels4[..., None] == jnp.arange(c)                               # [B,h,w,C]
  rank = class_ranks(probs4)
  top = rank < low_rank
  mid = (rank >= low_rank) & (rank < high_rank)
  present = jnp.concatenate([jnp.ones(image_labels.shape[:-1] + (1,), bool),
                             image_labels > 0.5], axis=-1)[:, None, None, :]  # [B,1,1,C]
  neg_l = top & ~onehot                      # confidently labelled as another class
  neg_u = ((top & ~present) if unlabeled_use_labels else jnp.zeros_like(top)) | mid
  neg = (high[..., None] & (probs4 < negative_threshold)
         & jnp.where(u[..., None], neg_u, neg_l))
  proto = onehot & low[..., None]
  anchor = proto & (probs4 > positive_threshold)
  flat = lambda m: m.reshape(-1, c).T
  return ContrastMasks(anchor=flat(anchor), proto=flat(proto), negative=flat(neg))


def contrast_loss(anchors: jax.Array, anchor_ok: jax.Array, prototypes: jax.Array,
                  class_valid: jax.Array, negatives: jax.Array, negative_ok: jax.Array,
                  temperature: float) -> jax.Array:
  """L_contra from sampled features (§2.3.4).

  ℓ_c = mean over the n anchors of CE(cos(q, [r⁺_c, k⁻_1..M]) / τ, 0) for every valid
  class with anchors and a non-empty queue; L = Σ_c ℓ_c / #valid classes (classes skipped
  for lack of anchors or negatives still count); 0 when fewer than 2 classes are valid.

  Args:
    anchors: [C, n, D] student features (gradient flows).
    anchor_ok: [C] bool: the class had anchor candidates.
    prototypes: [C, D] teacher prototypes (mean feature of the class's low pixels).
    class_valid: [C] bool: the class had low-mask pixels.
    negatives: [C, n, M, D] teacher keys sampled from queue c.
    negative_ok: [C] bool: queue c was not empty.
    temperature: τ (0.5).

  Returns:
    float32 scalar.
  """
  norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  a, p, k = norm(anchors.astype(jnp.float32)), norm(prototypes), norm(negatives)
  per = jax.vmap(lambda a_c, p_c, k_c: jnp.mean(info_nce(
      a_c, jnp.broadcast_to(p_c, a_c.shape), k_c, temperature)))(a, p, k)      # [C]
  use = class_valid & anchor_ok & negative_ok
  n_valid = jnp.sum(class_valid).astype(jnp.float32)
  total = jnp.sum(jnp.where(use, per, 0.0))
  return jnp.where(n_valid >= 2, total / jnp.maximum(n_valid, 1.0), 0.0)


def newest_masked(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the newest min(#mask, Q) True entries, oldest first (bank compaction).

  Enqueueing only these Q items leaves a FIFO bank exactly as enqueueing all masked items
  would (`ops/memory.fifo_enqueue` keeps the newest Q), but moves Q instead of N features.

  Args:
    mask: [N] bool (arrival order); capacity: Q.

  Returns:
    (idx [Q] int32, ok [Q] bool: the first min(#mask, Q) entries are valid).
  """
  m = mask.astype(jnp.int32)
  rank_from_end = jnp.cumsum(m[::-1])[::-1] - m
  kept = jnp.minimum(jnp.sum(m), capacity)
  slot = jnp.where(mask & (rank_from_end < capacity), kept - 1 - rank_from_end, capacity)
  idx = jnp.zeros((capacity,), jnp.int32).at[slot].set(
      jnp.arange(mask.shape[0], dtype=jnp.int32), mode="drop")
  return idx, jnp.arange(capacity) < kept
