"""ops/kmeans.py, ops/memory.py and ops/contrastive.py against NumPy and hand cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wsss_jax.ops import contrastive
from wsss_jax.ops import kmeans as km
from wsss_jax.ops import memory
from wsss_jax.runtime import mesh as mesh_lib


def numpy_lloyd(x, mask, centers, iters, spherical=False):
  """Straightforward NumPy k-means with the same conventions (empty keeps old centre)."""
  x = x.astype(np.float64)
  c = centers.astype(np.float64).copy()
  pts = x[mask]
  for _ in range(iters):
    if spherical:
      a = np.argmax(pts @ c.T, axis=1)
    else:
      a = np.argmin(((pts[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    for j in range(len(c)):
      members = pts[a == j]
      if len(members):
        s = members.sum(0)
        c[j] = s / np.linalg.norm(s) if spherical else members.mean(0)
  if spherical:
    a = np.argmax(pts @ c.T, axis=1)
  else:
    a = np.argmin(((pts[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
  full = np.full(len(x), -1)
  full[mask] = a
  return full, c


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_matches_numpy(spherical):
  rng = np.random.default_rng(0)
  blobs = np.concatenate([rng.normal(loc, 0.3, size=(40, 5))
                          for loc in (-2.0, 0.0, 2.0)]).astype(np.float32)
  if spherical:
    blobs /= np.linalg.norm(blobs, axis=1, keepdims=True)
  mask = rng.random(len(blobs)) < 0.8
  init = blobs[np.flatnonzero(mask)[[0, 50, 90, 3]]]
  res = jax.jit(lambda x, m, c: km.kmeans(x, m, c, num_iters=7, spherical=spherical))(
      blobs, mask, init)
  ref_assign, ref_centers = numpy_lloyd(blobs, mask, init, 7, spherical)
  np.testing.assert_array_equal(np.asarray(res.assign), ref_assign)
  np.testing.assert_allclose(np.asarray(res.centers), ref_centers, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.counts),
                                np.bincount(ref_assign[mask], minlength=4))


def test_first_argmax_matches_numpy_ties_and_infinities():
  rng = np.random.default_rng(11)
  # Small integers make ties common; the first (lowest) index must win, as in np.argmax.
  score = rng.integers(0, 4, size=(3, 50, 7)).astype(np.float32)
  score[0, 0] = 2.0                    # a row that is one long tie
  score[0, 1] = -np.inf                # all -inf
  score[0, 2, 3] = np.inf              # one +inf
  score[0, 3, [1, 5]] = np.inf         # tied +inf: the first
  got = jax.jit(km.first_argmax)(jnp.asarray(score))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(score, axis=-1))
  assert [int(v) for v in got[0, :4]] == [0, 0, 3, 1]
  for axis in (0, 1):
    np.testing.assert_array_equal(km.first_argmax(jnp.asarray(score), axis=axis),
                                  np.argmax(score, axis=axis))
  # NaN rows: a valid index (0), never K.
  nan_row = jnp.asarray([[1.0, jnp.nan, 3.0]])
  assert int(km.first_argmax(nan_row)[0]) == 0
  # No variadic (value, index) reduce, the op that XLA:CPU does not vectorise.
  prims = {e.primitive.name for e in jax.make_jaxpr(km.first_argmax)(score).eqns}
  assert "argmax" not in prims and "reduce_max" in prims and "reduce_min" in prims


def test_kmeans_empty_cluster_keeps_its_centre_and_center_mask():
  x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], np.float32)
  init = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0], [0.05, 0.0]], np.float32)
  mask = np.ones(4, bool)
  center_mask = np.array([True, True, True, False])
  res = km.kmeans(x, mask, init, num_iters=3, center_mask=center_mask)
  # Centre 2 is far from every point: it stays where it was, with no members.
  np.testing.assert_allclose(res.centers[2], [100.0, 100.0])
  # Centre 3 is the nearest to x[0] and x[1] but masked: never chosen.
  np.testing.assert_array_equal(res.assign, [0, 0, 1, 1])
  np.testing.assert_array_equal(res.counts, [2, 2, 0, 0])
  np.testing.assert_allclose(res.centers[0], [0.05, 0.0], atol=1e-6)


def test_kmeans_fewer_points_than_clusters_and_no_points():
  x = np.array([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], np.float32)
  mask = np.array([True, True, False])
  key = jax.random.key(0)
  init = km.kmeans_plusplus_init(key, x, mask, 4)
  # Only the two masked points can be centres; both are used before any repeat.
  assert {tuple(c) for c in np.asarray(init)} == {(1.0, 0.0), (0.0, 1.0)}
  res = km.kmeans(x, mask, init, num_iters=2)
  assert res.assign[2] == -1 and sorted(np.asarray(res.assign[:2]).tolist()) != [-1, -1]
  assert int(res.counts.sum()) == 2
  none = km.kmeans(x, np.zeros(3, bool), km.kmeans_plusplus_init(key, x, np.zeros(3, bool),
                                                                  2), num_iters=2)
  np.testing.assert_array_equal(none.assign, [-1, -1, -1])
  assert np.all(np.isfinite(np.asarray(none.centers)))


def test_kmeans_plusplus_prefers_far_points():
  # One far point among many near ones: D^2 sampling picks it as the 2nd centre almost
  # always (its weight is 10^4 times the others'), uniform sampling almost never would.
  x = np.concatenate([np.zeros((50, 2)), [[100.0, 0.0]]]).astype(np.float32)
  x[:50] += np.random.default_rng(0).normal(0, 0.5, (50, 2))
  mask = np.ones(51, bool)
  hits = sum(
      bool(np.any(np.all(np.asarray(km.kmeans_plusplus_init(jax.random.key(s), x, mask, 2))
                         == [100.0, 0.0], axis=1)))
      for s in range(20))
  assert hits >= 18


def test_vmapped_kmeans_sharded_equals_unsharded():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 64, 4)).astype(np.float32)
  mask = rng.random((8, 64)) < 0.7
  keys = jax.random.split(jax.random.key(3), 8)

  def run(x, mask, keys):
    init = jax.vmap(lambda k, p, m: km.kmeans_plusplus_init(k, p, m, 5))(keys, x, mask)
    return jax.vmap(lambda p, m, c: km.kmeans(p, m, c, num_iters=5))(x, mask, init)

  ref = jax.jit(run)(x, mask, keys)
  mesh = mesh_lib.make_mesh({"data": 8})  # Auto axes, as the train step uses
  shard = NamedSharding(mesh, P("data"))
  out = jax.jit(run)(jax.device_put(x, shard), jax.device_put(mask, shard),
                     jax.device_put(keys, shard))
  assert len(out.assign.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out.assign), np.asarray(ref.assign))
  np.testing.assert_allclose(np.asarray(out.centers), np.asarray(ref.centers), atol=1e-6)
  # Each image matches its own unbatched run.
  init3 = km.kmeans_plusplus_init(keys[3], x[3], mask[3], 5)
  one = km.kmeans(x[3], mask[3], init3, num_iters=5)
  np.testing.assert_array_equal(np.asarray(one.assign), np.asarray(ref.assign[3]))


def test_grid_init_assign():
  ids = np.asarray(km.grid_init_assign(4, 6, 2, 3)).reshape(4, 6)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                      [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
  ids = np.asarray(km.grid_init_assign(5, 5, 2, 2)).reshape(5, 5)
  assert set(np.unique(ids)) == {0, 1, 2, 3}
  centers, counts = km.centers_from_assign(jnp.ones((25, 2)), jnp.ones(25, bool),
                                           jnp.asarray(ids.reshape(-1)), 4)
  assert int(counts.sum()) == 25 and counts.min() >= 4


def test_fifo_enqueue_order_truncation_and_wrap():
  bank = memory.fifo_init(5, {"f": jnp.zeros((2,)), "label": jnp.zeros((), jnp.int32)})
  items = lambda vals: {"f": jnp.stack([jnp.asarray(vals, jnp.float32)] * 2, axis=1),
                        "label": jnp.asarray(vals, jnp.int32)}
  enqueue = jax.jit(memory.fifo_enqueue)
  # 3 of 4 masked: 10, 12, 13 go to slots 0..2 in order.
  bank = enqueue(bank, items([10, 11, 12, 13]), jnp.array([1, 0, 1, 1], bool))
  assert int(bank.ptr) == 3 and int(bank.count) == 3
  np.testing.assert_array_equal(bank.items["label"], [10, 12, 13, 0, 0])
  np.testing.assert_array_equal(memory.fifo_valid(bank), [1, 1, 1, 0, 0])
  # 4 more: wraps; the oldest (10, 12) are overwritten.
  bank = enqueue(bank, items([20, 21, 22, 23]), jnp.ones(4, bool))
  np.testing.assert_array_equal(bank.items["label"], [22, 23, 13, 20, 21])
  assert int(bank.ptr) == 2 and int(bank.count) == 5
  ordered, valid = memory.fifo_ordered(bank)
  np.testing.assert_array_equal(ordered["label"], [13, 20, 21, 22, 23])
  assert bool(valid.all())
  # More masked items than the capacity: only the newest 5 survive, oldest at old ptr.
  bank = enqueue(bank, items(list(range(30, 38))), jnp.ones(8, bool))
  ordered, _ = memory.fifo_ordered(bank)
  np.testing.assert_array_equal(ordered["label"], [33, 34, 35, 36, 37])
  np.testing.assert_array_equal(ordered["f"][:, 0], [33, 34, 35, 36, 37])
  # Nothing masked: unchanged.
  same = enqueue(bank, items([99, 98]), jnp.zeros(2, bool))
  np.testing.assert_array_equal(same.items["label"], bank.items["label"])
  assert int(same.ptr) == int(bank.ptr)


def test_fifo_enqueue_matches_python_deque_randomised():
  import collections
  rng = np.random.default_rng(0)
  q = 7
  bank = memory.fifo_init(q, jnp.zeros((), jnp.int32))
  ref = collections.deque(maxlen=q)
  enqueue = jax.jit(memory.fifo_enqueue)
  counter = 0
  for _ in range(12):
    m = int(rng.integers(1, 12))
    vals = np.arange(counter, counter + m)
    counter += m
    mask = rng.random(m) < 0.6
    bank = enqueue(bank, jnp.asarray(vals, jnp.int32), jnp.asarray(mask))
    ref.extend(vals[mask].tolist())
    ordered, valid = memory.fifo_ordered(bank)
    np.testing.assert_array_equal(np.asarray(ordered)[np.asarray(valid)], list(ref))


def test_per_class_banks_by_vmap_and_sampling():
  banks = jax.vmap(lambda _: memory.fifo_init(4, jnp.zeros((), jnp.int32)))(jnp.arange(3))
  keys = jnp.arange(6, dtype=jnp.int32)
  class_masks = jnp.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0] * 6], bool)
  banks = jax.vmap(memory.fifo_enqueue, in_axes=(0, None, 0))(banks, keys, class_masks)
  np.testing.assert_array_equal(banks.count, [2, 4, 0])
  np.testing.assert_array_equal(banks.items[1], [2, 3, 4, 5])
  bank0 = jax.tree.map(lambda a: a[0], banks)
  draws, ok = memory.fifo_sample(bank0, jax.random.key(0), 2000)
  assert bool(ok) and set(np.asarray(draws).tolist()) == {0, 1}
  assert abs(float(np.mean(np.asarray(draws) == 0)) - 0.5) < 0.05
  _, ok = memory.fifo_sample(jax.tree.map(lambda a: a[2], banks), jax.random.key(0), 3)
  assert not bool(ok)


def test_masked_categorical_uniform_weighted_and_empty():
  mask = jnp.array([0, 1, 0, 1, 1], bool)
  idx, ok = contrastive.masked_categorical(jax.random.key(0), mask, 6000)
  counts = np.bincount(np.asarray(idx), minlength=5) / 6000
  assert bool(ok)
  np.testing.assert_allclose(counts, [0, 1 / 3, 0, 1 / 3, 1 / 3], atol=0.025)
  logits = jnp.log(jnp.array([5.0, 1.0, 5.0, 2.0, 1.0]))
  idx, _ = contrastive.masked_categorical(jax.random.key(1), mask, 8000, logits)
  counts = np.bincount(np.asarray(idx), minlength=5) / 8000
  np.testing.assert_allclose(counts, [0, 0.25, 0, 0.5, 0.25], atol=0.025)
  idx, ok = contrastive.masked_categorical(jax.random.key(2), jnp.zeros(5, bool), 4)
  assert not bool(ok) and np.all(np.asarray(idx) == 0)


def test_info_nce_hand_value():
  a = jnp.array([[1.0, 0.0]])
  pos = jnp.array([[1.0, 0.0]])
  neg = jnp.array([[[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]])
  t = 0.5
  # Logits: positive 2, negatives 0, -2 and (masked) 2.
  expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(0) + np.exp(-2)))
  got = contrastive.info_nce(a, pos, neg, t, negative_mask=jnp.array([[1, 1, 0]], bool))
  np.testing.assert_allclose(np.asarray(got), [expected], rtol=1e-6)
  unmasked = contrastive.info_nce(a, pos, neg, t)
  np.testing.assert_allclose(
      np.asarray(unmasked), [-np.log(np.exp(2) / (2 * np.exp(2) + 1 + np.exp(-2)))], rtol=1e-6)


def test_kmeans_runs_inside_shard_map_with_per_device_inputs():
  """Under shard_map (check_vma) loop carries must vary like the per-device inputs."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 32, 3)).astype(np.float32)
  mask = rng.random((8, 32)) < 0.8
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), 8))

  def per_device(x, mask, keys):
    def one(p, m, kd):
      init = km.kmeans_plusplus_init(jax.random.wrap_key_data(kd), p, m, 4)
      return km.kmeans(p, m, init, num_iters=3).assign
    return jax.vmap(one)(x, mask, keys)

  mesh = mesh_lib.make_mesh({"data": 8})
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 3,
                                  out_specs=P("data")))(x, mask, keys)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(per_device)(x, mask,
                                                                                    keys)))
