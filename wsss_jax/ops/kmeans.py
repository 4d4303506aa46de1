"""Per-image k-means with masks and fixed shapes (FBR NROIs, SPML segments, DSCNet groups).

One call clusters one point set; `jax.vmap` it over the images of a batch. Everything is
shape-static: masked-out points keep their slot and get `assign = -1`; a centre that is
masked out (`center_mask`) is never chosen, so a per-image number of clusters is a prefix
(or any subset) of a fixed `K`.

Two geometries:
  * Lloyd (`spherical=False`): squared Euclidean distance, centres are means.
  * Spherical (`spherical=True`): points are expected L2-normalised, the E-step takes the
    largest cosine `x . c`, the M-step re-normalises the summed members (SPML §5.2).

Empty clusters keep their previous centre (METHODS.md §7.1) instead of collapsing to 0,
which would otherwise attract every point in spherical mode.

The distance step is one `[K, D] x [D, N]` matmul per iteration (scikit-learn's Lloyd step
in the other orientation), so it runs on the matrix units. The nearest centre is a
`first_argmax` over K.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from wsss_jax.ops.norms import l2_normalize

_BIG = 1e30


class KMeansResult(NamedTuple):
  """assign [N] int32 (-1 where masked out); centers [K, D] float32; counts [K] int32."""
  assign: jax.Array
  centers: jax.Array
  counts: jax.Array


def _varying_zero(*arrays: jax.Array) -> jax.Array:
  """A float32 0 that depends on every input.

  Loop carries built from constants are device-invariant under shard_map (check_vma)
  while the loop body makes them vary with the per-device inputs, which `fori_loop`
  rejects; adding this zero gives the initial carry the inputs' variance.
  """
  return sum((jnp.sum(jnp.ravel(a)[:0]).astype(jnp.float32) for a in arrays),
             jnp.zeros((), jnp.float32))


def assign_points(points: jax.Array, centers: jax.Array, *, spherical: bool = False,
                  center_mask: jax.Array | None = None) -> jax.Array:
  """E-step: index of the nearest allowed centre for each point.

  Args:
    points: [N, D].
    centers: [K, D].
    spherical: largest cosine (points and centres L2-normalised) instead of the smallest
      squared Euclidean distance.
    center_mask: [K] bool; False centres are never chosen. Default: all allowed.

  Returns:
    [N] int32 in [0, K) (ties go to the lowest index, like `np.argmin`).
  """
  points = points.astype(jnp.float32)
  centers = centers.astype(jnp.float32)
  # [K, N], centres first: the reductions over K then combine whole rows of N points
  # elementwise, which vectorises; over a trailing K axis (36 for SPML) they did not.
  dots = centers @ points.T
  if spherical:
    score = dots
  else:
    # The negated squared distance without |x|^2, which is the same for every centre.
    score = 2.0 * dots - jnp.sum(centers * centers, axis=-1)[:, None]
  if center_mask is not None:
    score = jnp.where(center_mask[:, None], score, -_BIG)
  return first_argmax(score, axis=0)


def first_argmax(score: jax.Array, axis: int = -1) -> jax.Array:
  """`jnp.argmax(score, axis)` as two plain reductions: the maximum, then the lowest index
  that attains it.

  `jnp.argmax` lowers to one variadic (value, index) reduce, which XLA:CPU does not
  vectorise: as `argmin` over [N, K] it was 31 of the 56 ms of the SPML-sized k-means
  (16 x 3136 points, K=36, 10 iterations; BENCHMARKS.md). Two single-output reductions
  vectorise. Ties go to the lowest index, as with `jnp.argmax`; a row whose maximum is NaN
  gets 0.

  Args:
    score: float array with K entries along `axis`.
    axis: the axis reduced.

  Returns:
    int32 in [0, K), `score`'s shape without `axis`.
  """
  axis = axis % score.ndim
  k = score.shape[axis]
  largest = jnp.max(score, axis=axis, keepdims=True)
  ids = jax.lax.broadcasted_iota(jnp.int32, score.shape, axis)
  index = jnp.min(jnp.where(score == largest, ids, k), axis=axis)
  return jnp.where(index == k, 0, index)


def centers_from_assign(points: jax.Array, mask: jax.Array, assign: jax.Array, k: int, *,
                        spherical: bool = False,
                        previous: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """M-step: the centre of each cluster's members.

  Args:
    points: [N, D].
    mask: [N] bool; only True points count.
    assign: [N] int32 cluster ids (values outside [0, k) count for no cluster).
    k: number of clusters K.
    spherical: re-normalise the summed members instead of averaging.
    previous: [K, D] centres kept for empty clusters (default: zeros).

  Returns:
    (centers [K, D] float32, counts [K] int32).
  """
  points = points.astype(jnp.float32)
  one_hot = (assign[:, None] == jnp.arange(k)[None, :]) & mask[:, None]  # [N, K]
  one_hot = one_hot.astype(jnp.float32)
  sums = one_hot.T @ points  # [K, D]
  counts = jnp.sum(one_hot, axis=0)
  if spherical:
    centers = l2_normalize(sums)
  else:
    centers = sums / jnp.maximum(counts, 1.0)[:, None]
  if previous is None:
    previous = jnp.zeros_like(centers)
  centers = jnp.where(counts[:, None] > 0, centers, previous.astype(jnp.float32))
  return centers, counts.astype(jnp.int32)


def kmeans(points: jax.Array, mask: jax.Array, init_centers: jax.Array, *, num_iters: int,
           spherical: bool = False, center_mask: jax.Array | None = None) -> KMeansResult:
  """Fixed-iteration k-means of the masked points of one image.

  Each iteration is an E-step then an M-step (so `num_iters=10` means 10 assignments and 10
  centre updates, as scikit-learn's `max_iter` with `tol=0` counts them); the returned
  assignment is the final E-step against the returned centres.

  Args:
    points: [N, D] features (L2-normalised for `spherical`).
    mask: [N] bool; False points are ignored and get `assign = -1`.
    init_centers: [K, D] initial centres (`kmeans_plusplus_init`, or `centers_from_assign`
      of a grid partition for SPML).
    num_iters: Lloyd iterations (static).
    spherical: cosine geometry, see the module docstring.
    center_mask: [K] bool; False centres are never assigned (a per-image K <= K_max).

  Returns:
    KMeansResult(assign [N] int32, centers [K, D] float32, counts [K] int32).
  """
  k = init_centers.shape[0]
  points = jnp.asarray(points, jnp.float32)
  mask = jnp.asarray(mask, bool)

  def body(_, centers):
    assign = assign_points(points, centers, spherical=spherical, center_mask=center_mask)
    return centers_from_assign(points, mask, assign, k, spherical=spherical,
                               previous=centers)[0]

  extra = () if center_mask is None else (jnp.asarray(center_mask),)
  init = init_centers.astype(jnp.float32) + _varying_zero(points, mask, *extra)
  centers = jax.lax.fori_loop(0, num_iters, body, init)
  assign = assign_points(points, centers, spherical=spherical, center_mask=center_mask)
  _, counts = centers_from_assign(points, mask, assign, k, spherical=spherical,
                                  previous=centers)
  return KMeansResult(jnp.where(mask, assign, -1), centers, counts)


def kmeans_plusplus_init(key: jax.Array, points: jax.Array, mask: jax.Array, k: int, *,
                         center_mask: jax.Array | None = None) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii) restricted to the masked points.

  The first centre is uniform over the masked points; each next one is drawn with
  probability proportional to the squared distance to the nearest chosen centre (D^2
  sampling, one candidate per step: scikit-learn's greedy variant tries several). When no
  masked point is left with a positive distance (fewer distinct points than K) the draw
  falls back to uniform over the masked points, so centres repeat; with no masked point
  at all every centre is zero.

  Args:
    key: PRNG key.
    points: [N, D].
    mask: [N] bool.
    k: number of centres K (static).
    center_mask: [K] bool; centres that are False are still filled (by the same rule) but do
      not influence the D^2 weights of later draws.

  Returns:
    [K, D] float32 initial centres.
  """
  points = jnp.asarray(points, jnp.float32)
  mask = jnp.asarray(mask, bool)
  n = points.shape[0]
  if center_mask is None:
    center_mask = jnp.ones((k,), bool)
  center_mask = jnp.asarray(center_mask, bool)
  uniform_logits = jnp.where(mask, 0.0, -jnp.inf)

  def draw(key, d2, have_center):
    weighted = mask & (d2 > 0)
    use_d2 = have_center & jnp.any(weighted)
    logits = jnp.where(use_d2, jnp.where(weighted, jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf),
                       uniform_logits)
    # All -inf (no masked point) would make categorical return garbage: pick index 0.
    logits = jnp.where(jnp.any(mask), logits, jnp.zeros((n,)))
    return jax.random.categorical(key, logits)

  def body(i, carry):
    centers, d2, have_center = carry
    idx = draw(jax.random.fold_in(key, i), d2, have_center)
    c = jnp.where(jnp.any(mask), points[idx], jnp.zeros_like(points[idx]))
    centers = centers.at[i].set(c)
    new_d2 = jnp.sum((points - c[None, :]) ** 2, axis=-1)
    d2 = jnp.where(center_mask[i], jnp.minimum(d2, new_d2), d2)
    return centers, d2, have_center | center_mask[i]

  zero = _varying_zero(points, mask, center_mask, jax.random.key_data(key))
  init = (jnp.zeros((k, points.shape[1]), jnp.float32) + zero, jnp.full((n,), jnp.inf) + zero,
          zero != 0)
  centers, _, _ = jax.lax.fori_loop(0, k, body, init)
  return centers


def grid_init_assign(height: int, width: int, grid_h: int, grid_w: int) -> jax.Array:
  """Cluster ids of a regular `grid_h x grid_w` partition of an `height x width` map.

  SPML initialises its spherical k-means with such a grid (6x6 in training, 12x12 at
  inference). Cell (gy, gx) has id `gy * grid_w + gx`; cell boundaries are
  `floor(y * grid_h / height)`, so cells differ in size by at most one pixel.

  Returns:
    [height * width] int32, row-major.
  """
  gy = (jnp.arange(height) * grid_h) // height
  gx = (jnp.arange(width) * grid_w) // width
  return (gy[:, None] * grid_w + gx[None, :]).reshape(-1).astype(jnp.int32)
