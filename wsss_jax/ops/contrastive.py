"""Pieces shared by the contrastive losses (CSRM, FBR, SPML, DSCNet-R).

Sampling "k items of a data-dependent set" is shape-static here: draw a fixed number of
indices with replacement from a masked categorical distribution and carry an `ok` flag
for the empty set (METHODS.md §7.1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_categorical(key: jax.Array, mask: jax.Array, n: int,
                       logits: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`n` indices drawn with replacement from the True entries of `mask`.

  Args:
    key: PRNG key.
    mask: [N] bool.
    n: number of draws (static).
    logits: optional [N] unnormalised log-weights (softmax over the masked entries);
      default uniform.

  Returns:
    (idx [n] int32, ok bool []). When no entry is True, `ok` is False and `idx` is all 0
    (a valid index to gather with; the caller masks the result out).
  """
  mask = mask.astype(bool)
  base = jnp.zeros(mask.shape, jnp.float32) if logits is None else logits.astype(jnp.float32)
  ok = jnp.any(mask)
  masked = jnp.where(mask, base, -jnp.inf)
  masked = jnp.where(ok, masked, jnp.zeros_like(masked))
  idx = jax.random.categorical(key, masked, shape=(n,))
  return jnp.where(ok, idx, 0).astype(jnp.int32), ok


def info_nce(anchors: jax.Array, positives: jax.Array, negatives: jax.Array,
             temperature: float | jax.Array,
             negative_mask: jax.Array | None = None) -> jax.Array:
  """Per-anchor InfoNCE with one positive and a set of negatives.

  loss_a = -log( exp(a.p/t) / (exp(a.p/t) + sum_m w_am exp(a.n_m/t)) ), where w = the
  negative mask (1 when omitted). Dot products are taken as given: L2-normalise the
  inputs first for cosine similarities.

  Args:
    anchors: [A, D].
    positives: [A, D], one per anchor.
    negatives: [A, M, D].
    temperature: t > 0.
    negative_mask: [A, M] bool/float; masked-out negatives do not enter the denominator.

  Returns:
    [A] float32 losses (log-sum-exp, stable for small t).
  """
  a = anchors.astype(jnp.float32)
  pos = jnp.sum(a * positives.astype(jnp.float32), axis=-1) / temperature      # [A]
  neg = jnp.einsum("ad,amd->am", a, negatives.astype(jnp.float32)) / temperature  # [A, M]
  if negative_mask is not None:
    neg = jnp.where(negative_mask.astype(bool), neg, -jnp.inf)
  logits = jnp.concatenate([pos[:, None], neg], axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - pos
