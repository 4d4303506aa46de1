"""Fixed-size segment tables: unique (cluster, label, superpixel) combinations per image.

SPML (METHODS.md §5.2) segments an image as the intersection of its spherical k-means
clusters, its (pseudo-)label map and a low-level over-segmentation (superpixels). The
number of distinct combinations is data dependent; here it is capped at a static
`max_segments` S so the train step stays shape-static (METHODS.md §7.1):

  key_i = (cluster_i * L + label_i) * P + superpixel_i        (L labels, P superpixel ids)
  ids   = rank of key_i among the sorted distinct keys of the image  (jnp.unique, size=S)

Pixels whose key ranks at S or beyond (overflow: more than S distinct combinations) and
masked-out pixels get id -1 and join no segment; `overflow` counts them so a run can report
how often S was too small. Segment s of the table is valid when it has at least one pixel;
its cluster, label and superpixel are decoded from its key (segments are pure in all three
by construction, so the "majority label" of a segment is simply its label).

One call handles one image; `jax.vmap` it over a batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_SENTINEL = jnp.iinfo(jnp.int32).max  # key of masked-out pixels; sorts after every real key


class SegmentTable(NamedTuple):
  """Per-image segment table (all arrays fixed-size).

  Attributes:
    ids: [N] int32 segment id of each pixel in [0, S), -1 for masked-out/overflow pixels.
    valid: [S] bool, the segment has at least one pixel.
    cluster: [S] int32 k-means cluster of the segment (0 where invalid).
    label: [S] int32 label of the segment (0 where invalid).
    superpixel: [S] int32 superpixel id of the segment (0 where invalid).
    count: [S] int32 pixels per segment.
    overflow: [] int32 masked-in pixels left without a segment because S was too small.
  """
  ids: jax.Array
  valid: jax.Array
  cluster: jax.Array
  label: jax.Array
  superpixel: jax.Array
  count: jax.Array
  overflow: jax.Array


def segment_table(cluster: jax.Array, label: jax.Array, superpixel: jax.Array,
                  mask: jax.Array, *, max_segments: int, num_labels: int,
                  num_superpixels: int) -> SegmentTable:
  """Segments = distinct (cluster, label, superpixel) triples among the masked pixels.

  Args:
    cluster: [N] int k-means cluster ids (>= 0 where `mask`).
    label: [N] int label ids in [0, num_labels) where `mask`.
    superpixel: [N] int superpixel ids; values outside [0, num_superpixels) are clipped
      (two out-of-range superpixels then share an id: make P large enough).
    mask: [N] bool pixels that take part.
    max_segments: S, the table size (static).
    num_labels: L, the number of distinct label values (e.g. C + 1 with "unlabeled").
    num_superpixels: P, superpixel ids per image (static).

  Returns:
    SegmentTable; segment ids are ordered by (cluster, label, superpixel).
  """
  cluster = cluster.astype(jnp.int32)
  label = label.astype(jnp.int32)
  sp = jnp.clip(superpixel.astype(jnp.int32), 0, num_superpixels - 1)
  key = (jnp.maximum(cluster, 0) * num_labels + label) * num_superpixels + sp
  key = jnp.where(mask, key, _SENTINEL)
  uniq, inverse = jnp.unique(key, size=max_segments, fill_value=_SENTINEL,
                             return_inverse=True)
  inverse = inverse.reshape(-1).astype(jnp.int32)
  kept = mask & (inverse < max_segments)
  ids = jnp.where(kept, inverse, -1)
  count = jax.ops.segment_sum(kept.astype(jnp.int32), jnp.where(kept, ids, max_segments),
                              num_segments=max_segments + 1)[:max_segments]
  valid = (uniq != _SENTINEL) & (count > 0)
  k = jnp.where(valid, uniq, 0)
  return SegmentTable(
      ids=ids, valid=valid,
      cluster=k // (num_superpixels * num_labels),
      label=(k // num_superpixels) % num_labels,
      superpixel=k % num_superpixels,
      count=count,
      overflow=jnp.sum(mask & ~kept).astype(jnp.int32))


def segment_means(features: jax.Array, ids: jax.Array, num_segments: int, *,
                  normalize: bool = True) -> jax.Array:
  """Mean feature of each segment (differentiable w.r.t. `features`).

  Args:
    features: [N, D].
    ids: [N] int segment ids; ids outside [0, num_segments) (e.g. -1) are ignored.
    num_segments: S (static).
    normalize: L2-normalise each mean (spherical prototype, SPML's mu_s); empty segments
      stay 0.

  Returns:
    [S, D] float32.
  """
  f = features.astype(jnp.float32)
  safe = jnp.where((ids >= 0) & (ids < num_segments), ids, num_segments)
  sums = jax.ops.segment_sum(f, safe, num_segments=num_segments + 1)[:num_segments]
  if normalize:
    norm = jnp.sqrt(jnp.sum(sums * sums, axis=-1, keepdims=True))
    return sums / jnp.maximum(norm, 1e-12)
  counts = jax.ops.segment_sum(jnp.ones_like(safe, jnp.float32), safe,
                               num_segments=num_segments + 1)[:num_segments]
  return sums / jnp.maximum(counts, 1.0)[:, None]


def segment_mode(values: jax.Array, ids: jax.Array, num_segments: int, num_values: int,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Most frequent value per segment (majority vote; ties to the smallest value).

  Args:
    values: [N] int in [0, num_values) (others are ignored).
    ids: [N] int segment ids (outside [0, S) ignored).
    num_segments: S.
    num_values: V.
    mask: optional [N] bool; only True pixels vote.

  Returns:
    (mode [S] int32, votes [S] int32 = pixels that voted).
  """
  ok = (ids >= 0) & (ids < num_segments) & (values >= 0) & (values < num_values)
  if mask is not None:
    ok = ok & mask
  hist = jax.ops.segment_sum(
      jax.nn.one_hot(jnp.where(ok, values, 0), num_values, dtype=jnp.int32)
      * ok[:, None].astype(jnp.int32),
      jnp.where(ok, ids, num_segments), num_segments=num_segments + 1)[:num_segments]
  return jnp.argmax(hist, axis=-1).astype(jnp.int32), jnp.sum(hist, axis=-1)


def location_features(height: int, width: int) -> jax.Array:
  """SPML's location features: (y, x) of each pixel centre in [-0.5, 0.5]^2.

  Returns:
    [height * width, 2] float32, row-major (y first).
  """
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height - 0.5
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width - 0.5
  yy, xx = jnp.meshgrid(y, x, indexing="ij")
  return jnp.stack([yy, xx], axis=-1).reshape(-1, 2)
