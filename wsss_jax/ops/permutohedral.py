"""Permutohedral lattice filtering in shape-static JAX (Adams, Baek & Davis 2010).

The Gaussian filter behind the dense CRF of `ops/crf.py`, following the densecrf C++ code
step by step so that the lattice (and the filtered values) equal pydensecrf's: elevation,
barycentric splat onto the d+1 simplex vertices, one [1/2, 1, 1/2] blur along each lattice
direction, slice, scaled by 1 / (1 + 2^-d). See `ops/crf.py` for the model and the
measurements.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# ----------------------------------------------------------------------------------------
# Permutohedral lattice (batched: every array carries a leading batch axis B).
#
# Layout. A vertex of the lattice that is the r-th vertex of some point's simplex has every
# coordinate = r (mod d+1) ("remainder class" r), so the N (d+1) (point, vertex) entries split
# into d+1 classes of N entries, each deduplicated on its own with the reduced coordinates
# (key - r) / (d+1). The reduced keys pack into one uint32 (mixed radix) for the kernels and
# image sizes used here, so every sort is a single-operand sort (XLA:CPU's multi-operand
# sort with an index payload is ~4x slower, measured) and entries find their row by a binary
# search instead of a payload. Rows of all images and classes live in one flat array:
# image b owns B-stride rows [b S, (b+1) S), S = (d+1) C + 1: C rows per class, then its
# all-zero "missing" row. Gathers and scatters use these flat indices rather than `vmap`
# (XLA:CPU's batched gathers/scatters were 4-5x slower, measured).
# ----------------------------------------------------------------------------------------

_MAX_RADIX_PRODUCT = 2**32 - 2   # per word; leaves 2^32 - 1 free for the sentinel


class Packing(NamedTuple):
  """Static mixed-radix layout of the d reduced key coordinates in uint32 words."""
  word_of: tuple[int, ...]    # word of coordinate i
  multiplier: tuple[int, ...]  # radix multiplier of coordinate i in its word
  origin: tuple[int, ...]     # subtracted from reduced coordinate i (makes it >= 0)
  num_words: int


class Lattice(NamedTuple):
  """Permutohedral lattices of a batch of B point sets of N points in d dims (a pytree).

  offsets: int32 [B, d+1, N] flat row of each point's d+1 simplex vertices (vertex r of a
    point is in remainder class r).
  weights: float32 [B, d+1, N] barycentric weights (0 for invalid points).
  blur_prev, blur_next: int32 [d+1, B S] flat neighbour row of every row along each
    lattice direction (the image's missing row where the neighbour does not exist; the
    missing rows point to themselves).
  row_mask: float32 [B S] 1 for vertex rows, 0 for the missing rows.
  norm: float32 [B, N] NORMALIZE_SYMMETRIC factors 1 / sqrt(K 1) (0 for invalid points).
  """
  offsets: jax.Array
  weights: jax.Array
  blur_prev: jax.Array
  blur_next: jax.Array
  row_mask: jax.Array
  norm: jax.Array


def scale_factors(d: int) -> np.ndarray:
  # As densecrf: `float inv_std_dev = sqrt(2.0 / 3.0) * (d + 1)` (rounded to float32), then
  # `scale_factor[i] = 1.0 / sqrt(double((i + 2) * (i + 1))) * inv_std_dev` in double.
  inv_std_dev = np.float64(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
  return np.array([1.0 / np.sqrt(float((i + 2) * (i + 1))) * inv_std_dev for i in range(d)],
                  np.float64).astype(np.float32)


def make_packing(feature_lo: np.ndarray, feature_hi: np.ndarray) -> Packing:
  """Static packing of reduced lattice keys from static bounds of the scaled features."""
  d = len(feature_lo)
  sf = scale_factors(d).astype(np.float64)
  lo = np.minimum(feature_lo, feature_hi) * sf
  hi = np.maximum(feature_lo, feature_hi) * sf
  origin, widths = [], []
  for i in range(d):  # only coordinates 0..d-1 are stored in a key
    # elevated[i] = sum_{k >= i} cf_k - i cf_{i-1} (elevated[0] = sum cf).
    e_lo, e_hi = lo[i:].sum(), hi[i:].sum()
    if i > 0:
      e_lo, e_hi = e_lo - i * hi[i - 1], e_hi - i * lo[i - 1]
    # Reduced vertex coordinates lie within [e/(d+1) - 2.5, e/(d+1) + 1.5]; blur neighbours
    # one further. Margin 4 on both sides.
    q_lo = int(math.floor(e_lo / (d + 1))) - 4
    q_hi = int(math.ceil(e_hi / (d + 1))) + 4
    origin.append(q_lo)
    widths.append(q_hi - q_lo + 1)
  word_of, multiplier, product = [], [], [1]
  for width in widths:
    if width > _MAX_RADIX_PRODUCT:
      raise ValueError(f"lattice coordinate range {width} too large to pack")
    if product[-1] * width > _MAX_RADIX_PRODUCT:
      product.append(1)
    word_of.append(len(product) - 1)
    multiplier.append(product[-1])
    product[-1] *= width
  return Packing(tuple(word_of), tuple(multiplier), tuple(origin), len(product))


def _pack(coords: Sequence[jax.Array], packing: Packing) -> list[jax.Array]:
  """Packs d int32 reduced coordinates into uint32 words."""
  words = [None] * packing.num_words
  for c, w, m, o in zip(coords, packing.word_of, packing.multiplier, packing.origin):
    v = (c - o).astype(jnp.uint32) * np.uint32(m)
    words[w] = v if words[w] is None else words[w] + v
  return words


def _pack_delta(delta: Sequence[int], packing: Packing) -> list[np.uint32]:
  """Packed form of a coordinate offset (modulo 2^32: adding it to a packed key is exact
  whenever the shifted coordinates stay in range, which the packing margins guarantee)."""
  words = [0] * packing.num_words
  for v, w, m in zip(delta, packing.word_of, packing.multiplier):
    words[w] += int(v) * m
  return [np.uint32(x % 2**32) for x in words]


def _lex_less(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
  """a < b lexicographically over the word lists (word 0 most significant)."""
  less = a[-1] < b[-1]
  for x, y in zip(reversed(a[:-1]), reversed(b[:-1])):
    less = (x < y) | ((x == y) & less)
  return less


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Gather along axis 0 (indices are known to be in bounds: no negative-index handling).

  The indices are flattened first: XLA:CPU gathers with a 1-D index array are ~2.5x faster
  than the same gather with a multi-dimensional one (measured).
  """
  out = x.at[idx.reshape(-1)].get(mode="promise_in_bounds")
  return out.reshape(idx.shape + x.shape[1:])


def _search_sorted(table: Sequence[jax.Array], query: Sequence[jax.Array],
                   low: jax.Array, size: int) -> jax.Array:
  """First index in [low, low + size) of the flat sorted word tables whose key >= query.

  Vectorised binary search (the `jnp.searchsorted` 'scan' scheme, on word tuples); `low`
  broadcasts against the query (the start of each query's segment in the flat table).
  Returns low + size when every key of the segment is smaller.
  """

  def body(_, state):
    lo, hi = state
    mid = lo + (hi - lo) // 2
    go_left = ~_lex_less([_take(t, mid) for t in table], query)   # query <= table[mid]
    return jnp.where(go_left, lo, mid), jnp.where(go_left, mid, hi)

  lo = jnp.broadcast_to(low, query[0].shape).astype(jnp.int32)
  levels = int(math.ceil(math.log2(size + 1)))
  # Probes stay below lo + size, so `hi` ends at the insertion index.
  _, hi = lax.fori_loop(0, levels, body, (lo, lo + size))
  return hi


def _simplices(coords: Sequence[jax.Array]):
  """Enclosing simplex of each elevated feature (densecrf `Permutohedral::init`).

  Works on lists of per-coordinate arrays so that XLA vectorises over the points (a trailing
  axis of size d+1 is slow on CPU).

  Args:
    coords: d float32 arrays [...] (the scaled features, one array per dimension).

  Returns:
    reduced: d+1 (vertex r) lists of d int32 arrays [...]: the stored key coordinates of
      vertex r, reduced as (key - r) / (d+1);
    bary: d+1 float32 arrays [...], the barycentric weight of each vertex.
  """
  d = len(coords)
  sf = jnp.asarray(scale_factors(d))
  f = jnp.stack([c.astype(jnp.float32) for c in coords])                     # [d, ...]

  # The products cf_i = f_i sf_i and (i + 1) cf_i are rounded to float32 on their own, as in
  # the C++, by computing them in a loop and storing them: fused into the sums below, XLA:CPU
  # contracts multiply-adds into FMAs, which round differently, so ties between elevated
  # coordinates (frequent: integer pixel positions) can break differently than in pydensecrf
  # (seen as one spurious vertex on an MSRC image).
  def products(i, state):
    cf, scaled = state
    c = lax.dynamic_index_in_dim(f, i, keepdims=False) * sf[i]
    cf = lax.dynamic_update_index_in_dim(cf, c, i, 0)
    scaled = lax.dynamic_update_index_in_dim(scaled, (i + 1).astype(jnp.float32) * c, i, 0)
    return cf, scaled

  cf, scaled = lax.fori_loop(0, d, products, (jnp.zeros_like(f), jnp.zeros_like(f)))
  # Elevate, in the C++ order: for j = d..1, el[j] = running - j cf[j-1], running += cf[j-1].
  el = [None] * (d + 1)
  running = jnp.zeros(f.shape[1:], jnp.float32)
  for j in range(d, 0, -1):
    el[j] = running - scaled[j - 1]
    running = running + cf[j - 1]
  el[0] = running
  el = jnp.stack(el)                                                          # [d+1, ...]
  # Closest remainder-0 point: round each coordinate to a multiple of d+1 (ties go down),
  # in float32 exactly as the C++; kept as the multiple q (rem0 = q (d+1)), no int division.
  v = el * jnp.float32(1.0 / (d + 1))
  up, down = jnp.ceil(v), jnp.floor(v)
  q = jnp.where(up * (d + 1) - el < el - down * (d + 1), up, down)
  rem0 = q * (d + 1)
  total = q.sum(axis=0).astype(jnp.int32)      # coordinate sum / (d+1), exact in float32
  # rank[i] = position of coordinate i in decreasing order of el - rem0, ties as in C++:
  # for i < j, "diff_i < diff_j" increments rank[i], otherwise rank[j]; i.e.
  # rank[i] = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i}.
  # Computed in a loop so that XLA materialises it: fused, every consumer (the d+1 keys and
  # barycentric weights) would recompute the O(d^2) comparisons.
  diff = el - rem0

  def rank_of(i, ranks):
    mine = lax.dynamic_index_in_dim(diff, i, keepdims=False)
    index = jnp.arange(d + 1).reshape((d + 1,) + (1,) * mine.ndim)
    counted = jnp.where(index > i, diff > mine, diff >= mine) & (index != i)
    return lax.dynamic_update_index_in_dim(ranks, counted.sum(axis=0).astype(jnp.int32), i, 0)

  rank = lax.fori_loop(0, d + 1, rank_of, jnp.zeros(diff.shape, jnp.int32))
  # Bring points with a coordinate sum != 0 back onto the plane.
  rank = rank + total
  below, above = rank < 0, rank > d
  rank = jnp.where(below, rank + (d + 1), jnp.where(above, rank - (d + 1), rank))
  q = q.astype(jnp.int32) + below.astype(jnp.int32) - above.astype(jnp.int32)
  # Barycentric coordinates, accumulated in the C++ order:
  # b[d - rank_i] += v_i, b[d - rank_i + 1] -= v_i.
  delta = (el - (q * (d + 1)).astype(jnp.float32)) * jnp.float32(1.0 / (d + 1))
  bary = [jnp.zeros_like(cf[0]) for _ in range(d + 2)]
  for i in range(d + 1):
    for k in range(d + 1):
      hit = rank[i] == d - k
      bary[k] = jnp.where(hit, bary[k] + delta[i], bary[k])
      bary[k + 1] = jnp.where(hit, bary[k + 1] - delta[i], bary[k + 1])
  bary[0] = bary[0] + (1.0 + bary[d + 1])
  # Vertex r: key = rem0 + canonical[r, rank], canonical = r or r - (d+1), so its reduced
  # coordinates (key - r) / (d+1) are q or q - 1.
  reduced = [[q[i] - (rank[i] > d - r).astype(jnp.int32) for i in range(d)]
             for r in range(d + 1)]
  return reduced, bary[:d + 1]


class SortedVertices(NamedTuple):
  """Deduplicated lattice keys of a batch: the capacity-independent part of the build."""
  rows: jax.Array               # int32 [B, d+1, N] row of each entry in its class; N if invalid
  table: tuple[jax.Array, ...]  # uint32 [B, d+1, N] sorted distinct keys per class, sentinels
  bary: jax.Array               # float32 [B, d+1, N]
  num_vertices: jax.Array       # int32 [B, d+1] distinct keys per class (M_r)


def sort_vertices(features: Sequence[jax.Array], valid: jax.Array | None,
                   packing: Packing) -> SortedVertices:
  """Vertex keys of every point, deduplicated per remainder class (a hash table by sorting).

  Args:
    features: d float32 arrays [B, N], the scaled features.
    valid: optional bool [B, N].
    packing: static key layout.
  """
  d = len(features)
  b, n = features[0].shape
  d1 = d + 1
  reduced, bary = _simplices(features)
  packed = [_pack(reduced[r], packing) for r in range(d1)]
  words = [jnp.stack([packed[r][k] for r in range(d1)], axis=1)
           for k in range(packing.num_words)]                          # each [B, d+1, N]
  bary = jnp.stack(bary, axis=1)                                       # [B, d+1, N]
  sentinel = np.uint32(2**32 - 1)
  if valid is not None:
    words = [jnp.where(valid[:, None, :], w, sentinel) for w in words]
    bary = jnp.where(valid[:, None, :], bary, 0.0)
  if len(words) == 1:
    sorted_words = [lax.sort(words[0], dimension=2)]
  else:
    sorted_words = list(lax.sort(tuple(words), dimension=2, num_keys=len(words)))
  changed = jnp.zeros((b, d1, n - 1), bool)
  for w in sorted_words:
    changed = changed | (w[..., 1:] != w[..., :-1])
  first = jnp.concatenate([jnp.ones((b, d1, 1), bool), changed], axis=2)
  uid = jnp.cumsum(first.astype(jnp.int32), axis=2) - 1
  real = sorted_words[0] != sentinel
  num_vertices = (first & real).sum(axis=2).astype(jnp.int32)
  # Distinct keys per class at rows 0..M_r-1; the rest keep the sentinel (invalid entries
  # write to the scratch column N).
  segment = (jnp.arange(b * d1, dtype=jnp.int32) * (n + 1)).reshape(b, d1, 1)
  dest = (jnp.where(real, uid, n) + segment).reshape(-1)
  table = tuple(
      jnp.full((b * d1 * (n + 1),), sentinel, jnp.uint32).at[dest].set(w.reshape(-1))
      .reshape(b, d1, n + 1)[..., :n] for w in sorted_words)
  # Row of every entry: binary search of its key in its class table.
  flat = [t.reshape(-1) for t in table]
  start = (jnp.arange(b * d1, dtype=jnp.int32) * n).reshape(b, d1, 1)
  pos = _search_sorted(flat, words, start, n) - start
  rows = jnp.where(words[0] != sentinel, pos, n)
  return SortedVertices(rows, table, bary, num_vertices)


def lattice_from_sorted(srt: SortedVertices, packing: Packing, capacity: int,
                         valid: jax.Array | None) -> Lattice:
  """Blur neighbours and normalisation for lattices of `capacity` rows per class (static).

  Vertices whose row is >= capacity are dropped (their entries point to the missing row).
  """
  b, d1, n = srt.rows.shape
  d = d1 - 1
  cap = int(max(1, min(capacity, n)))
  stride = d1 * cap + 1                                      # rows per image
  image_base = jnp.arange(b, dtype=jnp.int32) * stride                       # [B]
  class_base = image_base[:, None] + jnp.arange(d1, dtype=jnp.int32) * cap   # [B, d+1]
  missing = image_base + d1 * cap                                            # [B]
  offsets = jnp.where(srt.rows < cap, class_base[..., None] + srt.rows,
                      missing[:, None, None])                                # [B, d+1, N]
  table = [t[..., :cap] for t in srt.table]                                  # [B, d+1, C]
  real = table[0] != np.uint32(2**32 - 1)
  # densecrf's n1 along direction j: every stored coordinate -1 and coordinate j +d (for
  # j = d only the implicit last coordinate moves). From class r it lands in class r-1
  # (mod d+1) at reduced coordinates +1 on j (r >= 1), or -1 on all but j (r = 0).
  # n2 (key + 1, coordinate j -d) is the inverse map of n1, so one search per direction.
  deltas = np.zeros((d1, d1, packing.num_words), np.uint32)                 # [j, r, word]
  for j in range(d1):
    for r in range(d1):
      if r >= 1:
        delta = [1 if i == j else 0 for i in range(d)]
      else:
        delta = [0 if i == j else -1 for i in range(d)]
      deltas[j, r] = _pack_delta(delta, packing)
  source = [jnp.roll(t, 1, axis=1).reshape(-1) for t in table]  # class r -> table of r-1
  query = [t[None] + jnp.asarray(deltas[..., k])[:, None, :, None]
           for k, t in enumerate(table)]                                   # [d+1, B, d+1, C]
  start = (jnp.arange(b * d1, dtype=jnp.int32) * cap).reshape(1, b, d1, 1)
  pos = _search_sorted(source, query, start, cap)
  found = real[None] & (pos < start + cap)
  safe = jnp.minimum(pos, b * d1 * cap - 1)
  for t, q in zip(source, query):
    found = found & (_take(t, safe) == q)
  target_base = jnp.roll(class_base, 1, axis=1)[None, :, :, None]          # class r-1
  prev = jnp.where(found, target_base + (pos - start), missing[None, :, None, None])
  own = jnp.broadcast_to(class_base[..., None] + jnp.arange(cap, dtype=jnp.int32),
                         (d1, b, d1, cap))
  # Flat per-direction tables over all B S rows; missing rows point to themselves.
  missing_col = jnp.broadcast_to(missing[None, :, None], (d1, b, 1))
  prev = jnp.concatenate([prev.reshape(d1, b, d1 * cap), missing_col],
                         axis=2).reshape(d1, b * stride)
  direction = jnp.arange(d1, dtype=jnp.int32)[:, None, None, None] * (b * stride)
  target = jnp.where(found, direction + prev.reshape(d1, b, stride)[:, :, :-1].reshape(
      d1, b, d1, cap), d1 * b * stride)                                     # out of range: drop
  default = jnp.broadcast_to(jnp.repeat(missing, stride)[None], (d1, b * stride))
  nxt = default.reshape(-1).at[target.reshape(-1)].set(own.reshape(-1), mode="drop")
  nxt = nxt.reshape(d1, b * stride)
  row_mask = (jnp.arange(stride) < d1 * cap).astype(jnp.float32)
  row_mask = jnp.broadcast_to(row_mask, (b, stride)).reshape(-1)
  lattice = Lattice(offsets, srt.bary, prev, nxt, row_mask, jnp.zeros((b, n), jnp.float32))
  ones = jnp.ones((b, n, 1), jnp.float32)
  norm = 1.0 / jnp.sqrt(lattice_filter(lattice, ones)[..., 0] + 1e-20)
  if valid is not None:
    norm = jnp.where(valid, norm, 0.0)
  return lattice._replace(norm=norm)


def build_lattice(features: jax.Array, feature_lo: np.ndarray, feature_hi: np.ndarray,
                  valid: jax.Array | None = None, capacity: int | None = None) -> Lattice:
  """Builds permutohedral lattices for a batch of scaled features (jittable).

  Args:
    features: float32 [B, N, d], already divided by the kernel stds.
    feature_lo, feature_hi: static NumPy [d] bounds of the features (to pack the keys);
      features must lie inside them.
    valid: optional bool [B, N]; invalid points take no part.
    capacity: static lattice rows per remainder class (default N, the worst case).
      Vertices beyond it are dropped.

  Returns:
    A `Lattice`; `lattice_filter(lattice, x)` applies the (unnormalised) Gaussian.
  """
  b, n, d = features.shape
  packing = make_packing(np.asarray(feature_lo, np.float64), np.asarray(feature_hi, np.float64))
  if valid is not None:
    valid = jnp.asarray(valid).reshape(b, n).astype(bool)
  srt = sort_vertices([features[..., i] for i in range(d)], valid, packing)
  return lattice_from_sorted(srt, packing, n if capacity is None else capacity, valid)


def lattice_filter(lattice: Lattice, values: jax.Array) -> jax.Array:
  """Approximate Gaussian filtering (splat, blur, slice; no normalisation).

  Args:
    lattice: from `build_lattice`.
    values: float32 [B, N, V].

  Returns:
    float32 [B, N, V].
  """
  d1 = lattice.offsets.shape[1]
  d = d1 - 1
  rows = lattice.row_mask.shape[0]
  v = values.shape[-1]
  # One scatter / one gather over all (vertex, point) entries, vertex-major, so that the
  # vertex axis leads: XLA:CPU handles a trailing (d+1) axis around gathers very slowly.
  flat_values = values.reshape(-1, v)
  contrib = lattice.weights.transpose(1, 0, 2).reshape(d1, -1, 1) * flat_values[None]
  grid = jnp.zeros((rows, v), values.dtype).at[
      lattice.offsets.transpose(1, 0, 2).reshape(-1)].add(
          contrib.reshape(-1, v), mode="promise_in_bounds")
  grid = grid * lattice.row_mask[:, None]        # missing rows (dropped mass) -> 0

  def blur(j, grid):
    return grid + 0.5 * (_take(grid, lattice.blur_prev[j]) + _take(grid, lattice.blur_next[j]))

  # A loop, not unrolled: XLA would fuse the unrolled chain of gathers into one kernel that
  # recomputes earlier directions per output element (2^(d+1) work; measured 10x slower).
  grid = lax.fori_loop(0, d + 1, blur, grid)
  alpha = 1.0 / (1.0 + 2.0 ** (-d))
  out = jnp.zeros_like(flat_values)
  for r in range(d1):
    out = out + lattice.weights[:, r].reshape(-1, 1) * _take(
        grid, lattice.offsets[:, r].reshape(-1))
  return (alpha * out).reshape(values.shape)


# Lattice capacity tiers, as fractions of the worst case (N rows per remainder class). The
