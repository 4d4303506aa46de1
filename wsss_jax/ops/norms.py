"""The one L2 normalisation of the package (k-means, contrastive losses, prototypes,
embeddings, notebooks)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = EPS) -> jax.Array:
  """`x / max(||x||_2, eps)` along `axis`, computed in float32.

  Args:
    x: float [..., D] (any float dtype; numpy arrays are accepted).
    axis: the vector axis.
    eps: floor of the norm, so zero vectors stay zero instead of becoming NaN.

  Returns:
    float32 array of `x`'s shape; rows of unit length (or zero).
  """
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
