"""Micro-benchmarks of the kernels the methods add, against their CPU references.

  python -m wsss_jax.bench --what=kernels

* per-image k-means (vmapped over the batch, fixed iterations) vs scikit-learn `KMeans`
  run image by image on the same points with the same initial centres, `n_init=1`,
  `tol=0` and the same iteration count (what the reference code does per image, minus its
  k-means++ restarts), at the sizes FBR, SPML and DSCNet-R use;
* the jitted dense CRF vs pydensecrf (when installed) at 320^2 and 512^2;
* FIFO memory-bank enqueue and sampling at FBR/CSRM sizes;
* the InfoNCE loss at CSRM's anchor/negative counts.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.bench import timing
from wsss_jax.ops import contrastive
from wsss_jax.ops import crf
from wsss_jax.ops import kmeans as km
from wsss_jax.ops import memory

# (name, images per batch, points per image, feature dim, clusters, iterations, spherical)
KMEANS_CASES = (
    ("fbr_nroi", 16, 196, 128, 8, 10, False),     # 224 crop, OS16 BG pixels, K=8
    ("spml_segments", 16, 3136, 34, 36, 10, True),  # 224 crop, OS4, 32-d + 2 loc, 6x6 grid
    ("dscnet_groups", 16, 196, 256, 21, 10, True),  # K <= C groups on normalised features
)


def _cpu_reference_times(fn, repeats: int) -> dict[str, float]:
  samples = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - t)
  return {"ref_time_median_s": float(np.median(samples)), "ref_time_min_s": min(samples)}


def bench_kmeans(name: str, batch: int, n: int, d: int, k: int, iters: int,
                 spherical: bool, repeats: int = 3) -> dict[str, Any]:
  """Jitted vmapped k-means vs scikit-learn on identical data and initial centres."""
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(batch, k, d)).astype(np.float32)
  points = (centers[np.arange(batch)[:, None], rng.integers(0, k, (batch, n))]
            + 0.5 * rng.normal(size=(batch, n, d))).astype(np.float32)
  if spherical:
    points /= np.linalg.norm(points, axis=-1, keepdims=True)
  mask = np.ones((batch, n), bool)
  keys = jax.random.split(jax.random.key(0), batch)
  init = jax.jit(jax.vmap(lambda key, p, m: km.kmeans_plusplus_init(key, p, m, k)))(
      keys, points, mask)
  fn = jax.jit(jax.vmap(lambda p, m, c: km.kmeans(p, m, c, num_iters=iters,
                                                  spherical=spherical)))
  compiled, compile_s, flops = timing.compile_timed(fn, points, mask, init)
  times = timing.time_calls(lambda: compiled(points, mask, init).centers, warmup=1,
                            steps=5, repeats=repeats)
  init_np = np.asarray(init)

  def sklearn_batch():
    for i in range(batch):
      KMeans(k, init=init_np[i], n_init=1, max_iter=iters, tol=0.0,
             algorithm="lloyd").fit(points[i])

  ref = _cpu_reference_times(sklearn_batch, repeats)
  return {"kernel": f"kmeans[{name}]", "batch": batch, "points": n, "dim": d, "k": k,
          "iters": iters, "spherical": spherical, "compile_s": compile_s, **times,
          "reference": "sklearn.KMeans per image (euclidean; n_init=1, tol=0)", **ref,
          "speedup_vs_reference": ref["ref_time_median_s"] / times["time_median_s"],
          "platform": jax.default_backend()}


def bench_crf(size: int, num_labels: int = 21, iters: int = 10, repeats: int = 3
              ) -> dict[str, Any]:
  """The jitted dense CRF (LABEL_CRF preset) vs pydensecrf on a size x size image."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  image = np.stack([(xx * 255 // size), (yy * 255 // size), ((xx + yy) * 127 // size)],
                   -1).astype(np.uint8)
  image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
  probs = rng.dirichlet(np.ones(num_labels), (size, size)).astype(np.float32)
  unary = np.asarray(crf.unary_from_softmax(probs))
  fn = jax.jit(lambda u, im: crf.dense_crf(u, im, crf.LABEL_CRF, iters))
  t = time.perf_counter()
  jax.block_until_ready(fn(unary, image))
  first_call_s = time.perf_counter() - t
  times = timing.time_calls(lambda: fn(unary, image), warmup=1, steps=3, repeats=repeats)
  record = {"kernel": f"dense_crf[{size}x{size}]", "labels": num_labels, "iters": iters,
            "first_call_s": first_call_s, **times, "platform": jax.default_backend()}
  if importlib.util.find_spec("pydensecrf") is None:
    return {**record, "reference": None}
  ref = _cpu_reference_times(lambda: crf.dense_crf_reference(unary, image, crf.LABEL_CRF,
                                                             iters), repeats)
  return {**record, "reference": "pydensecrf (1 CPU thread)", **ref,
          "speedup_vs_reference": ref["ref_time_median_s"] / times["time_median_s"]}


def bench_memory_bank(capacity: int = 50_000, dim: int = 256, new: int = 16 * 196,
                      draws: int = 256 * 50, repeats: int = 3) -> list[dict[str, Any]]:
  """Enqueue `new` masked keys into a `capacity`-slot bank; draw `draws` samples."""
  bank = memory.fifo_init(capacity, jnp.zeros((dim,), jnp.float32))
  keys = jax.random.normal(jax.random.key(0), (new, dim))
  mask = jax.random.bernoulli(jax.random.key(1), 0.7, (new,))
  enqueue = jax.jit(memory.fifo_enqueue, donate_argnums=0)
  holder = {"bank": enqueue(bank, keys, mask)}

  def call():
    holder["bank"] = enqueue(holder["bank"], keys, mask)
    return holder["bank"].ptr

  enq = timing.time_calls(call, warmup=1, steps=10, repeats=repeats)
  sample = jax.jit(lambda b, k: memory.fifo_sample(b, k, draws)[0])
  smp = timing.time_calls(lambda: sample(holder["bank"], jax.random.key(2)), warmup=1,
                          steps=10, repeats=repeats)
  common = {"capacity": capacity, "dim": dim, "platform": jax.default_backend()}
  return [{"kernel": "fifo_enqueue", "new_keys": new, **common, **enq},
          {"kernel": "fifo_sample", "draws": draws, **common, **smp}]


def bench_info_nce(anchors: int = 256 * 20, negatives: int = 50, dim: int = 256,
                   repeats: int = 3) -> dict[str, Any]:
  """Forward + backward of InfoNCE with CSRM's counts (256 anchors x 20 classes, 50 negs)."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(k1, (anchors, dim))
  p = jax.random.normal(k2, (anchors, dim))
  n = jax.random.normal(k3, (anchors, negatives, dim))
  fn = jax.jit(jax.value_and_grad(
      lambda a: jnp.mean(contrastive.info_nce(a, p, n, 0.5))))
  times = timing.time_calls(lambda: fn(a)[0], warmup=1, steps=10, repeats=repeats)
  return {"kernel": "info_nce_fwd_bwd", "anchors": anchors, "negatives": negatives,
          "dim": dim, **times, "platform": jax.default_backend()}


def run_all(repeats: int = 3) -> list[dict[str, Any]]:
  """Every kernel benchmark, one record each."""
  records = [bench_kmeans(*case, repeats=repeats) for case in KMEANS_CASES]
  records += [bench_crf(size, repeats=repeats) for size in (320, 512)]
  records += bench_memory_bank(repeats=repeats)
  records.append(bench_info_nce(repeats=repeats))
  return records
