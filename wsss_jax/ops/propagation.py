"""Label propagation over a learned pixel embedding (SPML's inference, METHODS.md §5.5).

Pure and jittable; the `spml_labels` and `spml_bootstrap` stages run them inside their
batched inference functions:

- `random_walk` / `random_walk_steps`: scores times T^t, T the column-normalised
  embedding affinity (PSA/SPML); `walk_labels` (`walk_labels_steps`: several lengths of
  one walk) runs it at a coarse stride on an image's R most relevant classes and returns
  the argmax labels ("cam_rw"), after the DeepLab CRF when asked.
- `cluster_prototypes`: per image, spherical k-means of the location-augmented embedding;
  each cluster's mean embedding (a prototype) with its majority label.
- `nearest_prototype_labels`: each cluster's class histogram over its k nearest memory
  prototypes (`nn_class_scores`), normalised per tag class ("cam_nn").
- `bootstrap_scores`: a bootstrapped classifier's softmax, max-normalised per class.
- `crf_probs`: DeepLab CRF marginals of non-negative scores.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from wsss_jax.ops import image as image_ops
from wsss_jax.ops import kmeans as kmeans_ops
from wsss_jax.ops import resize
from wsss_jax.ops import seg_inference
from wsss_jax.ops import segments as seg_ops
from wsss_jax.ops.norms import l2_normalize


def random_walk_steps(scores: jax.Array, embeddings: jax.Array, valid: jax.Array, *,
                      scale: float, beta: float, steps: Sequence[int]) -> jax.Array:
  """Propagates per-pixel scores with embedding affinities (PSA/SPML random walk).

  Args:
    scores: [B, N, R] scores of R classes at N pixels.
    embeddings: [F, B, N, D] unit embeddings of F views (e.g. image and flip), averaged
      as affinities.
    valid: [B, N] bool; invalid pixels neither send nor receive.
    scale, beta: a_ij = exp(scale (e_i.e_j - 1)) ** beta.
    steps: walk lengths t (static, >= 0), in any order.

  Returns:
    [len(steps), B, N, R]: scores times T^t for each t of `steps` (T column-normalised),
    from one walk of max(steps) steps.
  """
  aff = jnp.mean(jnp.exp(scale * (jnp.einsum("fbid,fbjd->fbij", embeddings, embeddings)
                                   - 1.0)), axis=0)
  m = valid.astype(jnp.float32)
  aff = (aff ** beta) * m[:, :, None] * m[:, None, :]
  t = aff / jnp.maximum(jnp.sum(aff, axis=1, keepdims=True), 1e-12)   # columns sum to 1
  step = lambda _, v: jnp.einsum("bir,bij->bjr", v, t)
  v, done, at = scores.astype(jnp.float32), 0, {}
  for n in sorted(set(int(n) for n in steps)):
    v, done = jax.lax.fori_loop(done, n, step, v), n
    at[n] = v
  return jnp.stack([at[int(n)] for n in steps])


def random_walk(scores: jax.Array, embeddings: jax.Array, valid: jax.Array, *,
                scale: float, beta: float, logt: int) -> jax.Array:
  """`random_walk_steps` of 2^logt steps (the reference's `logt` squarings of T):
  [B, N, R] scores times T^(2^logt)."""
  return random_walk_steps(scores, embeddings, valid, scale=scale, beta=beta,
                           steps=(2 ** logt,))[0]


def nn_class_scores(queries: jax.Array, query_valid: jax.Array, memory: jax.Array,
                    memory_labels: jax.Array, memory_valid: jax.Array, num_classes: int,
                    k: int) -> jax.Array:
  """Class histogram of the `k` nearest memory prototypes of each query.

  Args:
    queries: [Q, D] unit; query_valid: [Q] bool.
    memory: [M, D] unit; memory_labels: [M] int; memory_valid: [M] bool.

  Returns:
    [Q, C] fractions of the k neighbours per class (0 rows for invalid queries).
  """
  sims = jnp.where(memory_valid[None, :], queries @ memory.T, -jnp.inf)
  _, idx = jax.lax.top_k(sims, k)
  ok = jnp.take(memory_valid, idx)
  hist = jnp.sum(jax.nn.one_hot(jnp.take(memory_labels, idx), num_classes)
                 * ok[..., None], axis=-2)
  return jnp.where(query_valid[:, None], hist / k, 0.0)


def present_classes(labels: jax.Array) -> jax.Array:
  """bool [B, C]: background (always) + the image tags `labels` [B, C-1] (0/1)."""
  return jnp.concatenate([jnp.ones((labels.shape[0], 1)), labels], axis=-1) > 0.5


def bootstrap_scores(logits: jax.Array, valid: jax.Array, present: jax.Array) -> jax.Array:
  """Class scores of a bootstrapped classifier (the reference's `pseudo_softmax.py`).

  Args:
    logits: float [B, H, W, C] classifier logits (already averaged over scales/flips).
    valid: bool [B, H, W] image pixels (not padding).
    present: bool [B, C] background + the image's tags.

  Returns:
    float32 [B, H, W, C]: softmax divided by each class's maximum over the valid pixels;
    classes absent from the tags are 0.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  peak = jnp.max(jnp.where(valid[..., None], probs, 0.0), axis=(1, 2), keepdims=True)
  return jnp.where(present[:, None, None, :], probs / jnp.maximum(peak, 1e-5), 0.0)


def crf_probs(scores: jax.Array, images: jax.Array, valid: jax.Array) -> jax.Array:
  """DeepLab CRF marginals [B, H, W, C] of non-negative `scores` [B, H, W, C] (normalised
  per pixel here) on the normalised `images` [B, H, W, 3]; `valid` [B, H, W] bool."""
  prob = scores / jnp.maximum(jnp.sum(scores, -1, keepdims=True), 1e-6)
  images255 = jnp.clip(image_ops.denormalize(images, as_uint8=False), 0, 255)
  return seg_inference.crf_refine_probs(prob, images255, valid)


def walk_labels(scores: jax.Array, views: list[jax.Array], valid: jax.Array,
                present: jax.Array, images: jax.Array, *, max_classes: int, stride: int,
                scale: float, beta: float, logt: int, crf: bool) -> jax.Array:
  """Random-walk labels ("cam_rw") of a padded batch: `walk_labels_steps` of 2^logt steps.

  Args:
    scores: float [B, P, P, C] class scores (background first) at input resolution.
    views: F arrays [B, h, w, D] of the embedding (the image and its flip, mirrored back).
    valid: bool [B, P, P] image pixels.
    present: bool [B, C] background + tags (`present_classes`).
    images: float [B, P, P, 3] normalised images (for the CRF).
    max_classes: R, the classes per image carried through the walk (present ones first).
    stride: the walk runs on a [P // stride]^2 grid.
    scale, beta, logt: see `random_walk`.
    crf: refine the walked scores with the DeepLab CRF before the argmax (the reference's
      pseudo_camrw_crf.py).

  Returns:
    int32 [B, P, P] argmax labels; absent classes never win.
  """
  return walk_labels_steps(scores, views, valid, present, images, max_classes=max_classes,
                           stride=stride, scale=scale, beta=beta, steps=(2 ** logt,),
                           crf=crf)[0]


def walk_labels_steps(scores: jax.Array, views: list[jax.Array], valid: jax.Array,
                      present: jax.Array, images: jax.Array, *, max_classes: int,
                      stride: int, scale: float, beta: float, steps: Sequence[int],
                      crf: bool) -> jax.Array:
  """`walk_labels` after each walk length of `steps` (one walk): int32 [T, B, P, P]."""
  b, p = images.shape[:2]
  num_classes = scores.shape[-1]
  r = min(max_classes, num_classes)
  _, cls = jax.lax.top_k(present.astype(jnp.float32) + 1e-3 * jnp.arange(
      num_classes, 0, -1), r)
  hr, wr = p // stride, p // stride
  sel = jnp.take_along_axis(jax.image.resize(scores, (b, hr, wr, num_classes), "bilinear"),
                            cls[:, None, None, :], axis=-1)
  sel = sel * jnp.take_along_axis(present, cls, axis=-1)[:, None, None, :]
  e_r = jnp.stack([l2_normalize(jax.image.resize(e, (b, hr, wr, e.shape[-1]), "bilinear"))
                   for e in views]).reshape(len(views), b, hr * wr, -1)
  v_r = resize.resize_nearest(valid, (hr, wr)).reshape(b, -1)
  walks = random_walk_steps(sel.reshape(b, hr * wr, r), e_r, v_r, scale=scale, beta=beta,
                            steps=steps)
  out = []
  for walked in walks:
    full = jnp.full((b, hr * wr, num_classes), -1.0).at[
        jnp.arange(b)[:, None, None], jnp.arange(hr * wr)[None, :, None],
        cls[:, None, :]].set(walked)
    full = jnp.where(present[:, None, :], full, -1.0)
    up = resize.resize_bilinear(full.reshape(b, hr, wr, num_classes), (p, p))
    if crf:
      up = crf_probs(jnp.maximum(up, 0.0) * present[:, None, None, :], images, valid)
      up = jnp.where(present[:, None, None, :], up, -1.0)
    out.append(jnp.argmax(up, axis=-1).astype(jnp.int32))
  return jnp.stack(out)


def cluster_prototypes(views: list[jax.Array], valid: jax.Array, labels: jax.Array, *,
                       grid: int, iters: int, num_classes: int) -> dict[str, jax.Array]:
  """Per image, spherical k-means clusters of the embedding and their prototypes.

  Args:
    views: F arrays [B, h, w, D] of the embedding (summed, then normalised).
    valid: bool [B, P, P] image pixels.
    labels: int [B, P, P] labels whose per-cluster majority labels each prototype.
    grid: k-means starts from a grid x grid partition (K = grid^2 clusters).
    iters: k-means iterations.
    num_classes: C.

  Returns:
    {'ids': int [B, h, w] cluster ids, 'protos': [B, K, D] mean embeddings,
     'proto_label': [B, K] majority labels, 'proto_valid': bool [B, K] (cluster has
     labelled pixels)}.
  """
  e = l2_normalize(sum(views))
  b, h4, w4 = e.shape[:3]
  v4 = resize.resize_nearest(valid, (h4, w4)).reshape(b, -1)
  lab4 = resize.resize_nearest(labels, (h4, w4)).reshape(b, -1)
  k = grid * grid

  def cluster(e_img, m, lab):
    loc = seg_ops.location_features(h4, w4)
    pts = l2_normalize(jnp.concatenate([e_img.reshape(-1, e_img.shape[-1]), loc], -1))
    init, counts = kmeans_ops.centers_from_assign(
        pts, m, kmeans_ops.grid_init_assign(h4, w4, grid, grid), k, spherical=True)
    res = kmeans_ops.kmeans(pts, m, init, num_iters=iters, spherical=True,
                            center_mask=counts > 0)
    protos = seg_ops.segment_means(e_img.reshape(-1, e_img.shape[-1]), res.assign, k)
    plab, votes = seg_ops.segment_mode(lab, res.assign, k, num_classes, m)
    return res.assign.reshape(h4, w4), protos, plab, votes > 0

  ids, protos, plab, pval = jax.vmap(cluster)(e, v4, lab4)
  return {"ids": ids, "protos": protos, "proto_label": plab, "proto_valid": pval}


def nearest_prototype_labels(memory: dict[str, jax.Array], protos: jax.Array,
                             proto_valid: jax.Array, ids: jax.Array, labels: jax.Array,
                             images: jax.Array, valid: jax.Array, *, num_classes: int,
                             topk: int, min_norm: float, mask_absent: bool,
                             crf: bool) -> jax.Array:
  """Nearest-prototype labels ("cam_nn") of a padded batch.

  Args:
    memory: {'features': [M, D], 'labels': [M], 'valid': [M]}: every training image's
      prototypes (`cluster_prototypes`).
    protos, proto_valid: [B, K, D], [B, K]: this batch's prototypes (the queries).
    ids: int [B, h, w] cluster ids (-1: padding images).
    labels: [B, C-1] image tags.
    images: float [B, P, P, 3] normalised; valid: bool [B, P, P].
    num_classes: C; topk: neighbours per query; min_norm: floor of the per-class
      normaliser; mask_absent: zero classes absent from the tags; crf: DeepLab CRF.

  Returns:
    int32 [B, P, P] labels.
  """
  b, p = images.shape[:2]
  hist = jax.vmap(lambda q, qv: nn_class_scores(
      q, qv, memory["features"], memory["labels"], memory["valid"], num_classes,
      topk))(protos, proto_valid)                                       # [B, K, C]
  pix = jnp.take_along_axis(hist, jnp.maximum(ids, 0).reshape(b, -1, 1), axis=1)
  pix = jnp.where((ids >= 0).reshape(b, -1, 1), pix, 0.0)
  pix = pix.reshape(ids.shape + (num_classes,))
  up = resize.resize_bilinear(pix, (p, p))
  present = present_classes(labels)
  peak = jnp.max(jnp.where(valid[..., None], up, 0.0), axis=(1, 2), keepdims=True)
  up = jnp.where(present[:, None, None, :], up / jnp.maximum(peak, min_norm), up)
  if mask_absent:
    up = jnp.where(present[:, None, None, :], up, 0.0)
  if crf:
    up = crf_probs(up, images, valid)
    if mask_absent:
      up = jnp.where(present[:, None, None, :], up, -1.0)
  return jnp.argmax(up, axis=-1).astype(jnp.int32)
