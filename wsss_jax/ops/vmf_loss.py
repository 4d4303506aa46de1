"""SPML's pixel-to-segment vMF contrastive loss (SegSort+ / soft-neighbourhood form).

For an anchor pixel i with L2-normalised embedding e_i and prototypes mu_s (METHODS.md
§5.3, paper Eqs. 1-4):

  L_i = -log [ sum_{s in P(i)} exp(k e_i.mu_s) / sum_{s in P(i) u N(i)} exp(k e_i.mu_s) ]

where P(i) (positives) and N(i) (negatives) come from one relation. The pixel's own
segment s_i is removed from P(i) (and from the denominator) when at least one other
positive exists; otherwise it is the only positive. An anchor without any positive (not
eligible for the relation) contributes nothing; one without negatives contributes 0.

Each relation is a way of building the [A, S] (positive, negative) masks from per-anchor
and per-prototype attributes; `relation_masks` implements the four of the paper:

  * 'annotation' (A): same / different semantic label; unlabeled anchors and unlabeled
    prototypes take no part.
  * 'cooccurrence' (C): prototypes of images whose tag sets overlap with the anchor's image
    / of images with disjoint tags. `same_image_positive=True` (our extension, off by
    default as in the released code) also makes every segment of the anchor's own image
    positive; without it an image with no foreground tag has no positive (its anchors take
    no part) and its segments are negatives for everyone, itself included.
  * 'lowlevel' (I): same / different superpixel, same image only.
  * 'affinity' (O): same / different label after propagating labels to unlabeled
    segments from their nearest labeled segment (`propagate_labels`).

Everything is shape-static: masks are boolean arrays, masked logits are replaced by a large
negative number (no -inf, so gradients stay finite), and the loss is returned as a
(sum, count) pair for a global mean across devices.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

RELATIONS = ("annotation", "cooccurrence", "lowlevel", "affinity")
_NEG = -1e9


class Anchors(NamedTuple):
  """Per-anchor attributes ([A] arrays unless stated).

  Attributes:
    image: int32 image index (global in the batch).
    label: int32 label id; ids >= `num_labeled` mean "unlabeled".
    superpixel: int32 superpixel id.
    segment: int32 index of the anchor's own segment among the prototypes (-1: none).
    tags: [A, K] {0, 1} image tags of the anchor's image.
    valid: bool, the anchor is a real pixel that takes part in clustering.
  """
  image: jax.Array
  label: jax.Array
  superpixel: jax.Array
  segment: jax.Array
  tags: jax.Array
  valid: jax.Array


class Prototypes(NamedTuple):
  """Per-prototype attributes ([S] arrays unless stated); `image` -1 = from memory."""
  image: jax.Array
  label: jax.Array
  superpixel: jax.Array
  tags: jax.Array
  valid: jax.Array


def relation_masks(relation: str, anchors: Anchors, protos: Prototypes,
                   num_labeled: int, same_image_positive: bool = False
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(eligible [A], positive [A, S], negative [A, S]) masks of one relation.

  Args:
    relation: one of `RELATIONS` ('affinity' expects labels already propagated).
    anchors, protos: attributes.
    num_labeled: labels < num_labeled are real classes (C); larger ids are unlabeled.
    same_image_positive: 'cooccurrence' only: segments of the anchor's own image are
      positives whatever the tags (module docstring).
  """
  pv = protos.valid[None, :]
  av = anchors.valid
  if relation in ("annotation", "affinity"):
    a_lab = anchors.label < num_labeled
    p_lab = (protos.label < num_labeled)[None, :]
    same = anchors.label[:, None] == protos.label[None, :]
    return av & a_lab, pv & p_lab & same, pv & p_lab & ~same
  if relation == "cooccurrence":
    overlap = (anchors.tags.astype(jnp.float32) @ protos.tags.astype(jnp.float32).T) > 0
    if same_image_positive:
      overlap = overlap | (anchors.image[:, None] == protos.image[None, :])
    return av, pv & overlap, pv & ~overlap
  if relation == "lowlevel":
    same_image = anchors.image[:, None] == protos.image[None, :]
    same_sp = anchors.superpixel[:, None] == protos.superpixel[None, :]
    return av, pv & same_image & same_sp, pv & same_image & ~same_sp
  raise ValueError(f"unknown SPML relation {relation!r}; expected one of {RELATIONS}")


def segsort_loss(similarity: jax.Array, positive: jax.Array, negative: jax.Array,
                 own: jax.Array, eligible: jax.Array, kappa: float
                 ) -> tuple[jax.Array, jax.Array]:
  """Soft-neighbourhood vMF loss with own-segment removal, summed over anchors.

  Args:
    similarity: [A, S] cosine e_i . mu_s.
    positive, negative: [A, S] bool (disjoint).
    own: [A, S] bool, the anchor's own segment (at most one True per row).
    eligible: [A] bool anchors that take part.
    kappa: vMF concentration.

  Returns:
    (sum of per-anchor losses over eligible anchors with a positive, their count), float32
    scalars.
  """
  logits = kappa * similarity.astype(jnp.float32)
  others = positive & ~own
  has_other = jnp.any(others, axis=-1, keepdims=True)
  pos = jnp.where(has_other, others, positive & own)
  denom = pos | (negative & ~own)
  lse_pos = jax.nn.logsumexp(jnp.where(pos, logits, _NEG), axis=-1)
  lse_all = jax.nn.logsumexp(jnp.where(denom, logits, _NEG), axis=-1)
  take = eligible & jnp.any(pos, axis=-1)
  per_anchor = jnp.where(take, lse_all - lse_pos, 0.0)
  return jnp.sum(per_anchor), jnp.sum(take).astype(jnp.float32)


def relation_loss(relation: str, anchor_features: jax.Array, proto_features: jax.Array,
                  anchors: Anchors, protos: Prototypes, *, kappa: float,
                  num_labeled: int, same_image_positive: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
  """`segsort_loss` of one relation.

  Args:
    relation: one of `RELATIONS`.
    anchor_features: [A, D] L2-normalised.
    proto_features: [S, D] L2-normalised prototypes.
    anchors, protos: attributes (`anchors.segment` indexes `proto_features`).
    kappa: concentration; num_labeled: C.
    same_image_positive: see `relation_masks` ('cooccurrence' only).

  Returns:
    (loss sum, anchor count) float32 scalars.
  """
  eligible, pos, neg = relation_masks(relation, anchors, protos, num_labeled,
                                      same_image_positive)
  own = anchors.segment[:, None] == jnp.arange(proto_features.shape[0])[None, :]
  sim = anchor_features.astype(jnp.float32) @ proto_features.astype(jnp.float32).T
  return segsort_loss(sim, pos, neg, own, eligible, kappa)


def propagate_labels(features: jax.Array, labels: jax.Array, valid: jax.Array,
                     num_labeled: int) -> jax.Array:
  """Feature-affinity relation: unlabeled segments take their nearest labeled one's label.

  Args:
    features: [S, D] L2-normalised prototypes.
    labels: [S] int labels (>= num_labeled = unlabeled).
    valid: [S] bool.
    num_labeled: C.

  Returns:
    [S] int32 labels; unchanged for labeled segments, the label of the most similar valid
    labeled segment for unlabeled ones (still unlabeled when there is none).
  """
  labeled = valid & (labels < num_labeled)
  sim = features.astype(jnp.float32) @ features.astype(jnp.float32).T
  sim = jnp.where(labeled[None, :], sim, -jnp.inf)
  nearest = jnp.argmax(sim, axis=-1)
  found = jnp.any(labeled)
  new = jnp.where(found, labels[nearest], labels)
  return jnp.where(labels < num_labeled, labels, new).astype(jnp.int32)
