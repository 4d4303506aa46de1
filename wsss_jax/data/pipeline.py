"""grain input pipelines: sharded, resumable train stream and exact-once eval batches.

Train (`train_dataset`), MaxText style (JAX_NOTES §3.2(d)):

  MapDataset.source(src)[.map_with_index]   # optional: attach the source index
    .seed(seed) -> EpochShuffle             # = .shuffle().repeat(None) (shuffle BEFORE
                                            # repeat: a new permutation per epoch, epochs
                                            # never mix), O(1) per element
    .random_map(TrainTransform)             # per-element rng = f(seed, global position)
    [process_index::process_count]          # this process's shard of the global stream
    .batch(local_batch, drop_remainder=True)
    .to_iter_dataset(ReadOptions(threads))  # thread prefetch (PIL/numpy release the GIL)
    [.mp_prefetch(num_workers)]             # when data.num_workers > 0

The global stream is one shuffled epoch after another; global batch t is positions
`[t*B, (t+1)*B)` of it, process p taking every `process_count`-th element. Augmentation is
drawn before the shard slice, so the augmented global stream does not depend on the number
of processes. One epoch is `len(source) // B` global steps (approximately, when B does not
divide the length: a batch may straddle two epochs; nothing is dropped or repeated).

Resume: the iterator's `get_state()` (a small dict) restores with `set_state()` to the
exact next batch; the training loop stores it in the checkpoint (orbax
`grain.checkpoint.CheckpointSave`).

Eval (`eval_dataset`): deterministic order; global batch t holds records `[t*B, (t+1)*B)`
(process p the slots `[p*b, (p+1)*b)` of it), every record exactly once over all
processes. Every process yields `num_batches_eval(len(source), B)` batches of the same
static shape; slots past the end are padding records (`index` -1, `valid` False, `mask`
255, `image` 0, `size` 0, `id` '').
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from wsss_jax.data import augment_ops
from wsss_jax.data import transforms
from wsss_jax.runtime import mesh as mesh_lib

DATA_AXIS = mesh_lib.DATA_AXIS
PAD_MULTIPLE = 32


# ---------------------------------------------------------------------------------------
# Helpers: processes, batch sizes, read options.
# ---------------------------------------------------------------------------------------
def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pidx = jax.process_index() if process_index is None else int(process_index)
  pcount = jax.process_count() if process_count is None else int(process_count)
  if pcount < 1 or not 0 <= pidx < pcount:
    raise ValueError(f"Bad process_index/process_count: {pidx}/{pcount}")
  return pidx, pcount


def local_batch_size(global_batch_size: int, process_count: int | None = None, *,
                     mesh=None, name: str = "batch size") -> int:
  """Per-process batch size `global_batch_size // process_count`, with checks.

  Args:
    global_batch_size: batch size over all processes.
    process_count: defaults to `jax.process_count()`.
    mesh: optional; the global batch must also divide by its `data` axis size.
    name: what to call the batch size in errors (e.g. 'data.batch_size').

  Raises:
    ValueError: when the batch size does not divide by the process count or by the
      mesh's data-parallel size.
  """
  pcount = jax.process_count() if process_count is None else int(process_count)
  if pcount < 1:
    raise ValueError(f"process_count must be positive, got {pcount}")
  if global_batch_size < 1:
    raise ValueError(f"{name}={global_batch_size} must be positive")
  if global_batch_size % pcount:
    raise ValueError(f"{name}={global_batch_size} must be divisible by the number of "
                     f"processes ({pcount}); each process loads {name} / processes.")
  if mesh is not None:
    data_size, _ = mesh_lib.data_shards(mesh)
    if global_batch_size % data_size:
      raise ValueError(f"{name}={global_batch_size} must be divisible by the mesh's "
                       f"'{DATA_AXIS}' axis size ({data_size}), the batch is split "
                       "evenly over those devices.")
  return global_batch_size // pcount


def _cfg(data_cfg, key: str, default: Any) -> Any:
  return getattr(data_cfg, key, default) if data_cfg is not None else default


def _read_options(data_cfg) -> grain.ReadOptions:
  """Thread prefetch in each process (or each worker): elements are whole batches."""
  workers = int(_cfg(data_cfg, "num_workers", 0))
  cpus = os.cpu_count() or 1
  default_threads = max(1, min(16, cpus // max(1, workers)))
  threads = int(_cfg(data_cfg, "num_threads", 0) or default_threads)
  prefetch = int(_cfg(data_cfg, "prefetch", 2))
  # The buffer counts batches; it must hold >= `threads` so all threads stay busy.
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))


def _ensure_absl_flags() -> None:
  """grain workers read absl flags (JAX_NOTES P8); outside `app.run` use the defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_ignores_ctrl_c(worker_index: int, worker_count: int) -> None:
  """Grain worker start-up: ignore SIGINT. A terminal's Ctrl-C goes to the whole process
  group; the main process handles it (checkpoint, exit 75: `train/preemption.py`) and
  ends its workers, which would otherwise die first, each with a traceback."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finish(ds: grain.MapDataset, data_cfg) -> grain.IterDataset:
  it_ds = ds.to_iter_dataset(_read_options(data_cfg))
  workers = int(_cfg(data_cfg, "num_workers", 0))
  if workers > 0:
    _ensure_absl_flags()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, int(_cfg(data_cfg, "prefetch", 2)))),
                              worker_init_fn=_worker_ignores_ctrl_c)
  return it_ds


class EpochShuffle(grain.MapDataset):
  """Infinite stream of epochs, each a new permutation of the parent's elements.

  The semantics of grain's `shuffle().repeat(None)` (epoch e is a permutation seeded by
  (seed, e); epochs never mix) at O(1) per element: grain's `index_shuffle` costs
  ~400/140/90/35 us per element for 64/276/400/1464 records (it cycle-walks a large
  domain), comparable to the whole 128^2 augmentation. Here each epoch's permutation is
  a numpy array (n int64: ~1 MB for COCO's 118k images), made once per epoch and cached
  for the last few epochs. Random access, so iterator state is just the position.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, *, seed: int | None = None):
    super().__init__(parent)
    seed = self._default_seed if seed is None else seed
    if seed is None:
      raise ValueError("EpochShuffle needs a seed: ds.seed(s) upstream or seed=s")
    self._seed = int(seed)
    self._n = len(parent)
    if not 0 < self._n < sys.maxsize:
      raise ValueError(f"EpochShuffle needs a finite, non-empty parent, got {self._n}")
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: int `[n]`, a permutation of `range(n)`."""
    perm = self._perms.get(epoch)
    if perm is None:  # Threads may race here; both compute the same array.
      perm = np.random.default_rng((self._seed, epoch)).permutation(self._n)
      self._perms[epoch] = perm
      for old in [e for e in list(self._perms) if e < epoch - 2]:
        self._perms.pop(old, None)
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(int(index), self._n)
    return self._parent[int(self.permutation(epoch)[i])]


class _AttachIndex(grain.transforms.MapWithIndex):
  """Adds the source index (modulo the length, in case a caller repeats upstream)."""

  def __init__(self, num_records: int):
    self.num_records = num_records

  def map_with_index(self, index: int, ex: dict) -> dict:
    return {**ex, "index": index % self.num_records}


# ---------------------------------------------------------------------------------------
# Train.
# ---------------------------------------------------------------------------------------
def train_dataset(source, data_cfg, *, seed: int, process_index: int | None = None,
                  process_count: int | None = None, with_index: bool = False,
                  mesh=None) -> grain.IterDataset:
  """Infinite, shuffled, augmented stream of this process's train batches.

  Args:
    source: random-access source of records (`__len__`, `__getitem__`).
    data_cfg: `config.data` (crop_size, scale_range, flip, color_jitter, batch_size,
      num_workers, prefetch; optional num_threads).
    seed: shuffle and augmentation seed (same on every process).
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    with_index: also yield `index` int32 `[b]`, the source index of each example.
    mesh: optional; checks that `data_cfg.batch_size` divides by its data axis.

  Returns:
    IterDataset of dicts with b = `data_cfg.batch_size // process_count`:
    `image` float32 `[b, S, S, 3]`, `mask` int32 `[b, S, S]` (255 = ignore / padding),
    `valid` bool `[b, S, S]` (True on image pixels, False on crop padding), `labels`
    float32 `[b, C-1]` (+ `index` int32 `[b]`). Per-epoch reshuffle (module
    docstring). `iter(ds)` gives an iterator with `get_state()`/`set_state()`.
  """
  pidx, pcount = _process_info(process_index, process_count)
  b = local_batch_size(int(data_cfg.batch_size), pcount, mesh=mesh, name="data.batch_size")
  if len(source) == 0:
    raise ValueError("train_dataset: the source is empty")
  ds = grain.MapDataset.source(source)
  if with_index:  # Before the shuffle, so the index is the source index.
    ds = ds.map_with_index(_AttachIndex(len(source)))
  ds = EpochShuffle(ds.seed(int(seed)))  # = .shuffle().repeat(None), O(1) per element
  ds = ds.random_map(transforms.TrainTransform.from_config(data_cfg))
  ds = ds[pidx::pcount].batch(b, drop_remainder=True)
  return _finish(ds, data_cfg)


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
  """Global steps in one pass over the train split (at least 1)."""
  return max(1, num_records // global_batch_size)


# ---------------------------------------------------------------------------------------
# Eval.
# ---------------------------------------------------------------------------------------
def num_batches_eval(num_records: int, global_batch_size: int) -> int:
  """Batches every process yields in `eval_dataset`: `ceil(num_records / B)`."""
  return -(-num_records // global_batch_size)


class _EvalLoad(grain.transforms.Map):
  """Local slot k -> unpadded eval example (`EvalTransform.compact`), or batch padding
  past the end; `EvalTransform.collate` pads into the batch."""

  def __init__(self, source, transform: transforms.EvalTransform, pidx: int, b: int,
               global_b: int, num_labels: int):
    self.source = source
    self.transform = transform
    self.pidx, self.b, self.global_b = pidx, b, global_b
    self.n = len(source)
    self.pad = transform.padding_example(num_labels)

  def map(self, k: int) -> dict:
    step, slot = divmod(int(k), self.b)
    index = step * self.global_b + self.pidx * self.b + slot
    if index >= self.n:
      return self.pad  # read-only use in collate, so sharing it is safe
    ex = dict(self.source[index])
    ex["index"] = index
    return self.transform.compact(ex)


def eval_dataset(source, data_cfg, *, pad_size: int, batch_size: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 oversize: str = "error", mesh=None) -> grain.IterDataset:
  """Every record exactly once over all processes, in order, in static-shape batches.

  Args:
    source: random-access source of records.
    data_cfg: `config.data` (eval_batch_size, num_workers, prefetch).
    pad_size: P (see `eval_pad_size`).
    batch_size: global batch size; default `data_cfg.eval_batch_size`.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    oversize: `'error'` or `'resize'` for images longer than P (`EvalTransform`).
    mesh: optional; checks that the batch size divides by its data axis.

  Returns:
    IterDataset of `num_batches_eval(len(source), batch_size)` dicts, b = batch_size //
    process_count: `image` float32 `[b, P, P, 3]` (0 in padding), `mask` int32
    `[b, P, P]` (255 in padding), `valid` bool `[b, P, P]`, `size` int32 `[b, 2]`
    (image h, w), `labels` float32 `[b, C-1]`, `index` int32 `[b]` (source index, -1 for
    batch padding), `id` str `[b]` (host only; `runtime.mesh.to_global` leaves it out).
  """
  pidx, pcount = _process_info(process_index, process_count)
  global_b = int(batch_size or data_cfg.eval_batch_size)
  b = local_batch_size(global_b, pcount, mesh=mesh, name="eval batch size")
  n = len(source)
  if n == 0:
    raise ValueError("eval_dataset: the source is empty")
  num_labels = int(np.asarray(source[0]["labels"]).shape[-1])
  transform = transforms.EvalTransform(pad_size, oversize)
  load = _EvalLoad(source, transform, pidx, b, global_b, num_labels)
  ds = grain.MapDataset.range(num_batches_eval(n, global_b) * b).map(load)
  ds = ds.batch(b, batch_fn=transform.collate)
  return _finish(ds, data_cfg)


def image_sizes(source, *, num_threads: int = 8) -> np.ndarray:
  """`(h, w)` of every record, int `[N, 2]`.

  Uses `source.image_sizes()` when the source has it (cheap: from metadata); otherwise
  reads every record (threaded).
  """
  fn = getattr(source, "image_sizes", None)
  if callable(fn):
    return np.asarray(fn(), np.int64).reshape(-1, 2)

  def size(i: int) -> tuple[int, int]:
    return tuple(np.shape(source[i]["image"])[:2])

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return np.array(list(pool.map(size, range(len(source)))), np.int64).reshape(-1, 2)


def eval_pad_size(source, data_cfg, *, multiple: int = PAD_MULTIPLE) -> int:
  """`data_cfg.eval_pad_size` if set (> 0), else the split's longest image side rounded
  up to `multiple` (few distinct shapes -> few compilations; 32 also suits stride 16/32
  backbones)."""
  fixed = int(_cfg(data_cfg, "eval_pad_size", 0) or 0)
  if fixed > 0:
    return fixed
  sizes = image_sizes(source)
  if not len(sizes):
    raise ValueError("eval_pad_size: the source is empty")
  return int(math.ceil(int(sizes.max()) / multiple) * multiple)


# ---------------------------------------------------------------------------------------
# Throughput benchmark: `python -m wsss_jax.data.pipeline [--crop 128,448]`.
# ---------------------------------------------------------------------------------------
def synthetic_records(n: int, *, min_side: int, max_side: int, num_classes: int = 21,
                      seed: int = 0) -> list[dict]:
  """`n` records with random sizes and content (tests and benchmarks)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    out.append({"id": f"img{i:05d}", "image": rng.integers(0, 256, (h, w, 3), np.uint8),
                "mask": rng.integers(0, num_classes, (h, w), np.uint8),
                "labels": rng.integers(0, 2, num_classes - 1).astype(np.uint8)})
  return out


def benchmark(crop_size: int, *, batch_size: int = 16, num_batches: int = 16,
              num_threads: int | None = None, seed: int = 0) -> dict[str, float]:
  """Throughput on random images with sides uniform in [0.75, 1.15] x `crop_size`.

  `*_example_*`: one transform call at a time, images per CPU-second (one core).
  `*_pipeline_*`: the `train_dataset`/`eval_dataset` iterators (threads, batching),
  wall-clock images/s, first batch excluded. Single process, no workers.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  records = synthetic_records(64, min_side=int(0.75 * crop_size),
                              max_side=int(1.15 * crop_size), seed=seed)
  cfg = ml_collections.ConfigDict(dict(
      crop_size=crop_size, scale_range=(0.5, 1.5), flip=True, color_jitter=0.3,
      batch_size=batch_size, eval_batch_size=batch_size, num_workers=0, prefetch=2,
      eval_pad_size=0, num_threads=num_threads or 0))
  res = {}

  def per_example(fn) -> float:
    reps = max(32, 4096 * 128 * 128 // crop_size ** 2 // 8)
    for i in range(4):
      fn(records[i], i)
    # CPU time of this (single-threaded) loop: images per core-second, robust to other
    # load on the host.
    t0 = time.process_time()
    for i in range(reps):
      fn(records[i % len(records)], i)
    return reps / (time.process_time() - t0)

  train_t = transforms.TrainTransform.from_config(cfg)
  unfused = augment_ops.unfused_train_ops(crop_size, cfg.scale_range, True, cfg.color_jitter)
  pad = eval_pad_size(records, cfg)
  eval_t = transforms.EvalTransform(pad)
  res["train_example_img_s"] = per_example(
      lambda ex, i: train_t.random_map(ex, np.random.default_rng(i)))
  res["train_example_unfused_img_s"] = per_example(
      lambda ex, i: unfused.random_map(ex, np.random.default_rng(i)))
  res["eval_example_img_s"] = per_example(lambda ex, i: eval_t.map(ex))

  def per_batch(name: str, it) -> None:
    next(it)  # Start-up (threads, first batch) is not steady state.
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      next(it)
    n = num_batches * batch_size
    res[f"{name}_pipeline_img_s"] = n / (time.perf_counter() - t0)
    # All threads of this process: what the pipeline costs per image, load or not.
    res[f"{name}_pipeline_img_per_cpu_s"] = n / (time.process_time() - c0)

  per_batch("train", iter(train_dataset(records, cfg, seed=seed, process_index=0,
                                        process_count=1)))
  big = records * (-(-(num_batches + 1) * batch_size // len(records)))
  per_batch("eval", iter(eval_dataset(big, cfg, pad_size=pad, process_index=0,
                                      process_count=1)))
  res["eval_pad_size"] = pad
  return res


def _main(argv: Sequence[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--crop", default="128,448", help="comma list of crop sizes")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_batches", type=int, default=16)
  parser.add_argument("--num_threads", type=int, default=0, help="0 = one per CPU")
  args = parser.parse_args(argv)
  print(f"cpus={os.cpu_count()}")
  for crop in (int(c) for c in args.crop.split(",")):
    res = benchmark(crop, batch_size=args.batch_size, num_batches=args.num_batches,
                    num_threads=args.num_threads or None)
    print(f"crop={crop} " + " ".join(
        f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
        flush=True)


if __name__ == "__main__":
  _main(sys.argv[1:])
