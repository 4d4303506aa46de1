"""FBR pieces (METHODS.md §3.2): seeds, queries, NROIs, active sampling and the losses.

Pixels are flattened: N pixels (B*h*w, image-major, row-major), K = C-1 foreground classes
(index k is class id k+1), D feature channels. Every function is pure and shape-static:
data-dependent sets (queries of a class, the pixels of a class, an image's background) are
masks over fixed-size arrays, and samples are drawn with replacement from precomputed
uniforms so a sharded step can slice the global draws (see `methods/fbr.py`).

The contrast of Eq. 5 with cosine similarities,

  l(q; p+, N) = -log exp(q.p+/t) / (exp(q.p+/t) + sum_{n in N} exp(q.n/t)),

is written on precomputed logits (`info_nce_from_logits`): FBR's negatives are either one
set shared by all anchors (256 NROIs) or indices into a pool whose similarity matrix is a
single matmul, so the `[A, M, D]` gather of `ops.contrastive.info_nce` is never built.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import kmeans as kmeans_ops
from wsss_jax.ops.norms import l2_normalize


def seed_cams(cams: jax.Array, labels: jax.Array) -> jax.Array:
  """M: ReLU, keep the image's classes, per-image per-class max-normalise.

  Args:
    cams: [B, h, w, K] raw class maps.
    labels: [B, K] multi-hot.

  Returns:
    [B, h, w, K] float32 in [0, 1).
  """
  return cam_ops.normalize_cams(jax.nn.relu(cams.astype(jnp.float32)), labels)


def seed_labels(norm_cams: jax.Array, bg_threshold: float) -> jax.Array:
  """Seed pseudo-label Y^: argmax class id where max_k M_k > bg_threshold, else 0 (bg).

  Args:
    norm_cams: [..., K] normalised CAMs.
    bg_threshold: constant background score (the released code uses 0.10).

  Returns:
    [...] int32 in [0, K] (0 = background).
  """
  best = jnp.max(norm_cams, axis=-1)
  cls = jnp.argmax(norm_cams, axis=-1).astype(jnp.int32) + 1
  return jnp.where(best > bg_threshold, cls, 0)


def query_mask(norm_cams: jax.Array, seeds: jax.Array, threshold: float) -> jax.Array:
  """Adaptive queries (Eq. 4): pixels of class c (Y^ = c) with M_c < threshold.

  Args:
    norm_cams: [N, K].
    seeds: [N] int32 seed labels (0 = bg).
    threshold: tau_q (0.4 in the paper).

  Returns:
    [N] bool.
  """
  own = jnp.take_along_axis(norm_cams, jnp.maximum(seeds - 1, 0)[:, None], axis=-1)[:, 0]
  return (seeds > 0) & (own < threshold)


def unsure_query_mask(norm_cams: jax.Array, seeds: jax.Array, *, bg_score: float = 0.1,
                      min_cam: float = 0.05, sure_percentile: float = 60.0,
                      entropy_quantile: float = 0.1) -> jax.Array:
  """The released code's "unsure" queries (`get_reliable_pseudo_label`, METHODS.md §3.3).

  Per image: a pixel of class c is *sure* when its M_c is above the `sure_percentile`-th
  percentile of M_c over the image's class-c pixels with M_c > `min_cam`; the pixel
  entropy of softmax([M_1..M_K, bg_score]) (absent classes enter with 0, background
  pixels get entropy 0) must exceed the image's `entropy_quantile` quantile. Queries are
  the foreground pixels that are not sure and above that entropy (linear interpolation,
  as `torch.quantile`).

  Args:
    norm_cams: [B, P, K] normalised CAMs.
    seeds: [B, P] seed labels (0 = bg).

  Returns:
    [B, P] bool.
  """
  m = norm_cams.astype(jnp.float32)
  k = m.shape[-1]
  own_idx = jnp.maximum(seeds - 1, 0)
  own = jnp.take_along_axis(m, own_idx[..., None], axis=-1)[..., 0]           # [B, P]
  member = (seeds[:, None, :] == jnp.arange(1, k + 1)[None, :, None])         # [B, K, P]
  vals = jnp.where(member & (jnp.swapaxes(m, 1, 2) > min_cam), jnp.swapaxes(m, 1, 2),
                   jnp.nan)
  pct = jnp.nanpercentile(vals, sure_percentile, axis=-1)                     # [B, K]
  sure = own > jnp.take_along_axis(pct, own_idx, axis=-1)  # NaN (no members) -> False
  scores = jnp.concatenate([m, jnp.full(m.shape[:-1] + (1,), bg_score)], axis=-1)
  logp = jax.nn.log_softmax(scores, axis=-1)
  ent = jnp.where(seeds > 0, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0)   # [B, P]
  t = jnp.quantile(ent, entropy_quantile, axis=-1, keepdims=True)
  return (seeds > 0) & ~sure & (ent > t)


def bg_seg_targets(norm_cams: jax.Array, threshold: float = 0.05) -> jax.Array:
  """Pseudo BG labels B (Eq. 6): 1 where sum_k M_k < threshold. [..., K] -> [...] f32."""
  return (jnp.sum(norm_cams, axis=-1) < threshold).astype(jnp.float32)


def bg_seg_sums(bg_logits: jax.Array, targets: jax.Array,
                valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of the binary cross-entropy with logits over the valid pixels (Eq. 6).

  Args:
    bg_logits: [...] BG predictor logits.
    targets: [...] float32 BG pseudo-labels (`bg_seg_targets`).
    valid: [...] bool, pixels that enter the loss (False on crop padding); None = all.

  Returns:
    float32 scalars; sum them across devices, then divide (a global mean).
  """
  z = bg_logits.astype(jnp.float32)
  bce = targets * jax.nn.softplus(-z) + (1.0 - targets) * jax.nn.softplus(z)
  w = jnp.ones_like(bce) if valid is None else valid.astype(jnp.float32)
  return jnp.sum(bce * w), jnp.sum(w)


def bg_seg_loss(bg_logits: jax.Array, targets: jax.Array,
                valid: jax.Array | None = None) -> jax.Array:
  """Mean binary cross-entropy with logits over the (valid) pixels (Eq. 6). Scalar f32."""
  total, count = bg_seg_sums(bg_logits, targets, valid)
  return total / jnp.maximum(count, 1.0)


def decorrelation_sums(z_fg: jax.Array, z_bg: jax.Array,
                       valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Released-code L_sim as (sum, count) of cos(z_fg(i), z_bg(i)) over the valid pixels.

  Args:
    z_fg, z_bg: [..., D] (the code: ReLU(proj_fg) and BN -> ReLU(proj_bg)).
    valid: [...] bool or None (all pixels).
  """
  cos = jnp.sum(l2_normalize(z_fg) * l2_normalize(z_bg), axis=-1)
  w = jnp.ones_like(cos) if valid is None else valid.astype(jnp.float32)
  return jnp.sum(cos * w), jnp.sum(w)


def decorrelation_loss(z_fg: jax.Array, z_bg: jax.Array) -> jax.Array:
  """Released-code L_sim: mean over pixels of cos(z_fg(i), z_bg(i)) ([..., D] each)."""
  total, count = decorrelation_sums(z_fg, z_bg)
  return total / jnp.maximum(count, 1.0)


def info_nce_from_logits(pos: jax.Array, neg: jax.Array,
                         neg_mask: jax.Array | None = None) -> jax.Array:
  """-log softmax of the positive among [pos, negatives], from temperature-scaled logits.

  Args:
    pos: [A] positive logits q.p+/t.
    neg: [A, M] negative logits q.n/t.
    neg_mask: [A, M] or [M] bool; masked-out negatives leave the denominator (with none
      left the loss is 0).

  Returns:
    [A] float32.
  """
  pos = pos.astype(jnp.float32)
  neg = neg.astype(jnp.float32)
  if neg_mask is not None:
    neg = jnp.where(jnp.broadcast_to(neg_mask, neg.shape), neg, -jnp.inf)
  return jax.nn.logsumexp(jnp.concatenate([pos[:, None], neg], axis=-1), axis=-1) - pos


def class_sums(values: jax.Array, classes: jax.Array, weight: jax.Array,
               num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class (sum of values, count) of the weighted entries.

  Args:
    values: [A] float.
    classes: [A] int32 in [0, num_classes).
    weight: [A] bool/float (0 = not counted).
    num_classes: K.

  Returns:
    (sums [K], counts [K]) float32. Reduce them across devices, then `mean_of_class_means`.
  """
  onehot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32) * weight.astype(
      jnp.float32)[:, None]
  return onehot.T @ values.astype(jnp.float32), jnp.sum(onehot, axis=0)


def mean_of_class_means(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Mean over classes with counts > 0 of sums/counts (Eqs. 7 and 9); 0 with none."""
  has = counts > 0
  per_class = jnp.where(has, sums / jnp.where(has, counts, 1.0), 0.0)
  n = jnp.sum(has.astype(jnp.float32))
  return jnp.sum(per_class) / jnp.maximum(n, 1.0)


def extract_nrois(bg_features: jax.Array, bg_mask: jax.Array, keys: jax.Array, *,
                  num_clusters: int, num_iters: int) -> tuple[jax.Array, jax.Array]:
  """NROIs: per-image Lloyd k-means (k-means++ seeding) of the background pixels.

  An image with n < K distinct background pixels gives at most n non-empty clusters,
  whose centres are those pixels themselves (the released code pushes the raw features in
  that case); empty clusters are not NROIs.

  Args:
    bg_features: [B, P, D] features of the P pixels of each image (Z_bg, detached).
    bg_mask: [B, P] bool, the background pixels (Y^ = 0).
    keys: [B] PRNG keys (k-means++ seeding).
    num_clusters: K (8 in the paper).
    num_iters: Lloyd iterations.

  Returns:
    (centres [B, K, D] float32, valid [B, K] bool: non-empty clusters).
  """

  def one(key, x, m):
    init = kmeans_ops.kmeans_plusplus_init(key, x, m, num_clusters)
    res = kmeans_ops.kmeans(x, m, init, num_iters=num_iters)
    return res.centers, res.counts > 0

  return jax.vmap(one)(keys, bg_features.astype(jnp.float32), bg_mask.astype(bool))


def active_class_probs(prototypes: jax.Array, valid: jax.Array,
                       temperature: float) -> jax.Array:
  """Active negative sampling distribution over classes (Eq. 8).

  pi[c, c'] = softmax over the valid c' != c of cos(p_c, p_c') / temperature; rows of
  classes without any valid other class are all zero.

  Args:
    prototypes: [K, D].
    valid: [K] bool, the classes present in the batch (with a prototype and pixels).
    temperature: softmax temperature (0.5 in the released code).

  Returns:
    [K, K] float32, rows sum to 1 or 0.
  """
  p = l2_normalize(prototypes)
  sim = (p @ p.T) / temperature
  k = prototypes.shape[0]
  allowed = valid[None, :] & ~jnp.eye(k, dtype=bool)
  logits = jnp.where(allowed, sim, -jnp.inf)
  any_allowed = jnp.any(allowed, axis=-1, keepdims=True)
  probs = jax.nn.softmax(jnp.where(any_allowed, logits, 0.0), axis=-1)
  return jnp.where(any_allowed, probs, 0.0)


def sample_active_negatives(class_probs: jax.Array, pool_classes: jax.Array,
                            u_class: jax.Array, u_pixel: jax.Array
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws negatives per anchor: a class c' ~ class_probs[row], then a uniform pixel of c'.

  Inverse-CDF sampling from given uniforms, so the draws of a global batch can be made
  once and sliced per device.

  Args:
    class_probs: [A, K] per-anchor class distribution (rows of `active_class_probs`
      gathered at each anchor's class; a zero row means "no negative class").
    pool_classes: [P] int32 class index in [0, K) of each pool pixel, or -1 for pixels
      that are not candidates (background, unlabelled).
    u_class: [A, M] uniforms in [0, 1).
    u_pixel: [A, M] uniforms in [0, 1).

  Returns:
    (pixel indices [A, M] int32 into the pool, classes [A, M] int32, ok [A, M] bool: the
    anchor has a negative class and that class has pool pixels).
  """
  k = class_probs.shape[-1]
  cdf = jnp.cumsum(class_probs, axis=-1)                        # [A, K]
  # Number of CDF steps below u: the inverse CDF. Clipped so rounding (cdf[-1] < u) stays
  # in range; zero-probability classes are never chosen because their step is empty.
  cls = jnp.sum(cdf[:, None, :] <= u_class[..., None] * cdf[:, -1:, None], axis=-1)
  cls = jnp.minimum(cls, k - 1).astype(jnp.int32)
  # Pool pixels grouped by class: a stable sort puts class c's pixels in
  # [start[c], start[c] + count[c]) of `order`.
  key = jnp.where(pool_classes >= 0, pool_classes, k)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  counts = jnp.sum(jax.nn.one_hot(key, k + 1, dtype=jnp.int32), axis=0)[:k]
  starts = jnp.cumsum(counts) - counts
  n = counts[cls]
  offset = jnp.minimum(jnp.floor(u_pixel * n).astype(jnp.int32), jnp.maximum(n - 1, 0))
  idx = order[jnp.minimum(starts[cls] + offset, order.shape[0] - 1)]
  ok = (cdf[:, -1:] > 0) & (n > 0)
  return idx, cls, ok
