"""Pure math of DSCNet-R (METHODS.md §4): pixel groups, group/graph contrast, fusion.

DSCNet-R is our *reconstruction* of DSCNet (Lai, Vong, Chen, IEEE TII 2024): the paper's
equations were lost and no code exists, so every formula here is our reading of the prose
(METHODS.md §4.2–4.4, §4.9). Functions work on ONE image (`N = h*w` feature cells) unless
their docstring says otherwise; `jax.vmap` them over the batch. All are shape-static and
jittable; variable counts (groups per image, valid cells) are carried by masks.

Notation: F [N, D] backbone features of one image, `mask` [N] bool valid (non-padding)
cells, K_max fixed number of group slots, C classes including background (id 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.ops import contrastive
from wsss_jax.ops import kmeans as kmeans_ops
from wsss_jax.ops.norms import l2_normalize

# Finite "minus infinity" for masked log-sum-exps: with -inf an empty set gives
# (-inf) - (-inf) = NaN in the forward AND in the backward of the unselected branch of a
# `jnp.where`; a large finite value keeps both finite (exp underflows to exactly 0).
_MASKED = -1e9
_EPS = 1e-12

KMEANS_SPACES = ("pearson", "cosine", "raw")
KMEANS_INITS = ("kmeans++", "random")
FUSION_COMBINES = ("sum", "product")


def pearson_normalize(x: jax.Array) -> jax.Array:
  """Centres each vector over its channels and L2-normalises it: [..., D] -> [..., D].

  The dot product of two such vectors is the Pearson correlation of the originals over
  the D channels (Eq. 4's pixel context), so cosine k-means in this space is k-means under
  the Pearson affinity (METHODS.md §4.9).
  """
  x = x.astype(jnp.float32)
  return l2_normalize(x - jnp.mean(x, axis=-1, keepdims=True))


def valid_cells(images: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Feature cells that cover real image content, from the images alone.

  Train crops and eval canvases are padded with exactly 0 after normalisation
  (CONVENTIONS.md, `data/transforms.py`); a real pixel is never exactly (0, 0, 0) there
  (uint8 / 255 never equals the ImageNet mean), and resizing keeps a zero region exactly
  zero away from its border. A cell of the `grid` is valid when more than half of the
  input pixels it covers are non-zero. The ground-truth mask is never read.

  Args:
    images: float [B, H, W, 3] normalised images.
    grid: static (h, w) feature-map size (h = ceil(H / stride)).

  Returns:
    bool [B, h, w].
  """
  b, hh, ww = images.shape[:3]
  h, w = grid
  sh, sw = -(-hh // h), -(-ww // w)  # ceil: the input stride of one cell
  px = jnp.any(images != 0, axis=-1).astype(jnp.float32)
  px = jnp.pad(px, ((0, 0), (0, h * sh - hh), (0, w * sw - ww)))
  frac = px.reshape(b, h, sh, w, sw).mean(axis=(2, 4))
  return frac > 0.5


def kmeans_points(features: jax.Array, space: str) -> tuple[jax.Array, bool]:
  """(points [..., D] to cluster, spherical?) for `space` (see KMEANS_SPACES).

  'pearson': centred + L2-normalised, cosine k-means (METHODS.md §4.9 default);
  'cosine': L2-normalised only; 'raw': Lloyd k-means on the raw features.
  """
  if space == "pearson":
    return pearson_normalize(features), True
  if space == "cosine":
    return l2_normalize(features), True
  if space == "raw":
    return features.astype(jnp.float32), False
  raise ValueError(f"kmeans_space must be one of {KMEANS_SPACES}, got {space!r}")


def group_pixels(key: jax.Array, points: jax.Array, mask: jax.Array, num_groups: jax.Array,
                 *, k_max: int, num_iters: int, spherical: bool,
                 init: str = "kmeans++") -> kmeans_ops.KMeansResult:
  """Eq. 5: partitions the valid cells of one image into `num_groups` disjoint groups.

  Seeding (`init`): 'kmeans++' (D^2 sampling, `ops/kmeans.py`) or 'random' (Forgy: valid
  cells drawn uniformly with replacement; a repeated seed leaves a group empty). Then
  `num_iters` Lloyd/spherical iterations over the first `num_groups` of `k_max` slots
  (`center_mask`); the rest stay empty.

  Args:
    key: PRNG key of this image (k-means++ seeding).
    points: [N, D] clustering features (`kmeans_points`).
    mask: [N] bool valid cells.
    num_groups: int [] K_i <= k_max (traced).
    k_max: static number of group slots.
    num_iters: static k-means iterations.
    spherical: cosine geometry.

  Returns:
    KMeansResult(assign [N] int32 in [0, K_i) or -1 on invalid cells, centers [k_max, D],
    counts [k_max] int32).
  """
  center_mask = jnp.arange(k_max) < num_groups
  if init == "kmeans++":
    centers = kmeans_ops.kmeans_plusplus_init(key, points, mask, k_max,
                                              center_mask=center_mask)
  elif init == "random":
    idx, _ = contrastive.masked_categorical(key, mask, k_max)
    centers = points[idx].astype(jnp.float32)
  else:
    raise ValueError(f"kmeans_init must be one of {KMEANS_INITS}, got {init!r}")
  if spherical:
    centers = l2_normalize(centers)
  return kmeans_ops.kmeans(points, mask, centers, num_iters=num_iters, spherical=spherical,
                           center_mask=center_mask)


def batch_groups(keys: jax.Array, features: jax.Array, valid: jax.Array, present: jax.Array,
                 *, k_max: int, extra_groups: int, space: str, num_iters: int,
                 init: str) -> jax.Array:
  """DSCNet-R's pixel groups of a batch: K_i = #present classes + `extra_groups` per image.

  Args:
    keys: [B] PRNG keys (one per image); features: [B, h, w, D] (not differentiated);
    valid: [B, h, w] bool cells; present: [B, C-1] bool foreground classes.
    k_max: static group slots; the rest as in `group_pixels` / `kmeans_points`.

  Returns:
    assign [B, h*w] int32 in [0, K_i) or -1 on invalid cells.
  """
  b, h, w, _ = features.shape
  num_groups = jnp.minimum(jnp.sum(present, -1) + extra_groups, k_max)
  points, spherical = kmeans_points(jax.lax.stop_gradient(features), space)
  res = jax.vmap(lambda key, p, m, k: group_pixels(
      key, p, m, k, k_max=k_max, num_iters=num_iters, spherical=spherical, init=init))(
          keys, points.reshape(b, h * w, -1), valid.reshape(b, h * w), num_groups)
  return jax.lax.stop_gradient(res.assign)


def group_means(features: jax.Array, assign: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Group embedding g^k = mean of the member features (differentiable in `features`).

  Args:
    features: [N, D]; assign: [N] int32 (-1 = no group); k: static K_max.

  Returns:
    (means [K, D] float32, zero for empty groups; counts [K] int32).
  """
  return kmeans_ops.centers_from_assign(features, assign >= 0, assign, k)


def group_labels(pixel_labels: jax.Array, assign: jax.Array, k: int,
                 num_classes: int) -> jax.Array:
  """Group label = majority pseudo label of its cells (ties: lowest class id).

  Args:
    pixel_labels: [N] int class ids in [0, C) (other values, e.g. 255, are not counted).
    assign: [N] int32 group ids (-1 = none).
    k: K_max; num_classes: C.

  Returns:
    [K] int32 class ids (0 for empty groups: mask them with the group counts).
  """
  g = (assign[:, None] == jnp.arange(k)[None, :]).astype(jnp.float32)           # [N, K]
  c = (pixel_labels[:, None] == jnp.arange(num_classes)[None, :]).astype(jnp.float32)
  return jnp.argmax(g.T @ c, axis=-1).astype(jnp.int32)                         # [K]


def multi_positive_nce(anchors: jax.Array, anchor_labels: jax.Array, anchor_ids: jax.Array,
                       keys: jax.Array, key_labels: jax.Array, key_valid: jax.Array,
                       key_ids: jax.Array, temperature: float
                       ) -> tuple[jax.Array, jax.Array]:
  """Eq. 3 / Eq. 6 contrast with every same-label key as a positive (PGCL).

    loss_a = -log( sum_{p in P(a)} e^{s_ap/t} / sum_{m in P(a) u N(a)} e^{s_am/t} )

  with s = dot products (pass L2-normalised vectors for cosine), P(a) = valid keys with
  the anchor's label other than the anchor itself (`key_ids != anchor_ids`), N(a) = valid
  keys with another label. Anchors without a positive get loss 0 and `has_pos` False.

  Args:
    anchors: [A, D]; anchor_labels: [A] int; anchor_ids: [A] int (global item ids).
    keys: [M, D]; key_labels: [M] int; key_valid: [M] bool; key_ids: [M] int.
    temperature: t > 0.

  Returns:
    (loss [A] float32, has_pos [A] bool).
  """
  sim = anchors.astype(jnp.float32) @ keys.astype(jnp.float32).T / temperature   # [A, M]
  same = anchor_labels[:, None] == key_labels[None, :]
  valid = key_valid[None, :] & (anchor_ids[:, None] != key_ids[None, :])
  pos = valid & same
  everything = valid  # positives and negatives: every other valid key
  lse_pos = jax.nn.logsumexp(jnp.where(pos, sim, _MASKED), axis=-1)
  lse_all = jax.nn.logsumexp(jnp.where(everything, sim, _MASKED), axis=-1)
  has_pos = jnp.any(pos, axis=-1)
  return jnp.where(has_pos, lse_all - lse_pos, 0.0), has_pos


def class_logits(groups: jax.Array, nodes: jax.Array, temperature: float) -> jax.Array:
  """Eq. 8 logits: cos(g_k, w_c) / t between group and class nodes: [..., K, C].

  softmax over C of these is S^T, "the probability of group k belonging to class c".
  """
  return jnp.einsum("...kd,cd->...kc", l2_normalize(groups), l2_normalize(nodes)) / temperature


def pixel_affinity(points: jax.Array, mask: jax.Array, temperature: float) -> jax.Array:
  """A^pix (Eq. 4 / 10): row-softmax over valid cells of Pearson(f_j, f_k) / t: [N, N].

  Args:
    points: [N, D] `pearson_normalize`d features (their dot product is the Pearson r).
    mask: [N] bool; invalid columns get weight 0, invalid rows are all 0.
  """
  logits = points @ points.T / temperature
  a = jax.nn.softmax(jnp.where(mask[None, :], logits, _MASKED), axis=-1)
  return a * mask[:, None]


def semantic_affinity(pixel_probs: jax.Array, mask: jax.Array) -> jax.Array:
  """A^sem (Eq. 8 -> 10): row-normalised q_j . q_k, q = the class distribution of the
  group each cell belongs to (the probability that cells j and k share a class): [N, N].

  Args:
    pixel_probs: [N, C] per-cell class distribution (rows sum to 1 on valid cells).
    mask: [N] bool.
  """
  q = pixel_probs * mask[:, None]
  a = q @ q.T
  return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), _EPS)


def fuse_features(features: jax.Array, a_pix: jax.Array, a_sem: jax.Array, mask: jax.Array,
                  combine: str = "sum") -> jax.Array:
  """Eq. 10: F' = N(A^pix (+) A^sem) F with N = row normalisation: [N, D].

  'sum': (+) is addition (with row-stochastic inputs, their average); 'product': the
  element-wise product (cells must be close in both streams). Invalid rows are 0.
  """
  if combine == "sum":
    a = a_pix + a_sem
  elif combine == "product":
    a = a_pix * a_sem
  else:
    raise ValueError(f"fusion_combine must be one of {FUSION_COMBINES}, got {combine!r}")
  a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), _EPS)
  return (a @ features.astype(jnp.float32)) * mask[:, None]


# --- SGCL (Eq. 8-9), rebuilt per issue 31: split groups, cross-image class nodes --------

SGCL_NEGATIVES = ("absent", "all_other")


def split_groups(assign: jax.Array, pixel_labels: jax.Array, num_classes: int) -> jax.Array:
  """SGCL's nodes: k-means groups split by the pseudo label (cluster ∩ label).

  A cell of cluster k with label c goes to slot k*C + c, so every group holds one label
  and no object cell is counted in a background group (the majority label of a coarse
  cluster did that: 29 % of object cells with ground-truth labels, issue 31).

  Args:
    assign: [N] int32 cluster ids in [0, K) (-1 = no group).
    pixel_labels: [N] int class ids in [0, C) (other values, e.g. 255, = no group).
    num_classes: C.

  Returns:
    [N] int32 slot ids in [0, K*C) or -1; the slot's label is `slot % C`.
  """
  ok = (assign >= 0) & (pixel_labels >= 0) & (pixel_labels < num_classes)
  return jnp.where(ok, assign * num_classes + pixel_labels, -1).astype(jnp.int32)


def segment_means(values: jax.Array, ids: jax.Array, num_segments: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Mean of `values` [N, D] per id in [0, S) (ids < 0 are dropped): ([S, D], counts [S]).

  A segment sum (memory [S, D], not an [N, S] one-hot): SGCL has K*C slots."""
  ok = ids >= 0
  seg = jnp.where(ok, ids, num_segments)  # an overflow segment, then dropped
  x = values.astype(jnp.float32) * ok[:, None]
  sums = jax.ops.segment_sum(x, seg, num_segments=num_segments + 1)[:-1]
  counts = jax.ops.segment_sum(ok.astype(jnp.int32), seg, num_segments=num_segments + 1)[:-1]
  return sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32), counts


def group_class_weights(cell_scores: jax.Array, ids: jax.Array, num_segments: int
                        ) -> jax.Array:
  """A (Eq. 8 matrix, transposed): the probability of each group belonging to class c.

  The group mean of the per-cell class scores (background = the constant Eq. 2 score t,
  class c = the max-normalised CAM, 0 for the image's absent classes), normalised over C.

  Args:
    cell_scores: [N, C] non-negative scores (column 0 = background).
    ids: [N] group slot ids (-1 = none); num_segments: S.

  Returns:
    [S, C] rows summing to 1 (0 for empty groups).
  """
  means, counts = segment_means(cell_scores, ids, num_segments)
  a = means / jnp.maximum(jnp.sum(means, axis=-1, keepdims=True), _EPS)
  return a * (counts > 0)[:, None]


def class_node_sums(groups: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The graph step's numerator and denominator over a set of groups (any leading axes):
  (sum_k A_kc g_k [C, D], sum_k A_kc [C]). Sum them over devices (and an EMA) before
  `class_nodes_from_sums`."""
  g = groups.reshape(-1, groups.shape[-1]).astype(jnp.float32)
  a = weights.reshape(-1, weights.shape[-1]).astype(jnp.float32)
  return a.T @ g, jnp.sum(a, axis=0)


def class_nodes_from_sums(num: jax.Array, den: jax.Array) -> tuple[jax.Array, jax.Array]:
  """S_c = sum_k A_ck g_k / sum_k A_ck, L2-normalised: ([C, D], valid [C] = den > 0)."""
  valid = den > 0
  nodes = l2_normalize(num / jnp.maximum(den, _EPS)[:, None])
  return nodes * valid[:, None], valid


def sgcl_negative_mask(group_labels: jax.Array, image_present: jax.Array,
                       node_valid: jax.Array, mode: str = "absent") -> jax.Array:
  """Which class nodes are negatives of each group: [..., K, C] bool.

  'absent' (issue 31 §3): the classes that exist in the batch (`node_valid`) and are not
  present in the anchor's image (background counts as present): a group's label from the
  CAMs may be a co-occurring class of the same image, so those are never pushed apart.
  'all_other': every other class node (the pre-issue-31 behaviour).

  Args:
    group_labels: [..., K] int; image_present: [..., C] bool (column 0 = background);
    node_valid: [C] bool.
  """
  c = node_valid.shape[0]
  other = group_labels[..., None] != jnp.arange(c)
  neg = other & node_valid
  if mode == "absent":
    return neg & ~image_present[..., None, :]
  if mode == "all_other":
    return neg
  raise ValueError(f"sgcl_negatives must be one of {SGCL_NEGATIVES}, got {mode!r}")


def sgcl_loss(groups: jax.Array, group_labels: jax.Array, nodes: jax.Array,
              negative_mask: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Eq. 9 (reconstructed): InfoNCE of each group against its label's class node, the
  masked class nodes as negatives. Nodes enter as given (stop-gradient them first).

  Args:
    groups: [A, D] L2-normalised; group_labels: [A] int; nodes: [C, D] L2-normalised;
    negative_mask: [A, C] bool; temperature: t.

  Returns:
    (loss [A] float32, has_negative [A] bool); an anchor without negatives has loss 0.
  """
  a = groups.astype(jnp.float32)
  nodes = nodes.astype(jnp.float32)
  sim = a @ nodes.T / temperature                                              # [A, C]
  pos = jnp.take_along_axis(sim, group_labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  neg = jnp.where(negative_mask, sim, _MASKED)
  lse = jax.nn.logsumexp(jnp.concatenate([pos[:, None], neg], axis=-1), axis=-1)
  has = jnp.any(negative_mask, axis=-1)
  return jnp.where(has, lse - pos, 0.0), has
