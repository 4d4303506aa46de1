"""tfds builders that write array_record files, read back with grain, no TensorFlow.

A *prepared dataset* is one folder under the cache directory:

    <cache_dir>/<kind>/<key>/
      meta.json          class names, splits, build provenance, skipped examples (written last)
      arrays.npz         per-record statistics (image size, pixels per class) and, per split,
                         record indices into the tfds split that holds it
      <builder>/1.0.0/   the tfds dataset (features.json, dataset_info.json, *.array_record)

It is built in a hidden temporary sibling (`.tmp-<key>-*`) and renamed into place only when
complete, so a killed or failed build never leaves a folder that looks valid; a folder that
exists with its meta.json is complete. `kind` is `synthetic` or `voc`; the key encodes every
parameter that changes the content (see `synthetic_key` and `voc_builder.voc_key`).

Record features (same for every dataset; see docs/CONVENTIONS.md):
- `id`: tfds Text (bytes on read; `sources.py` makes it str),
- `image`: uint8 [H, W, 3] Tensor, zlib-encoded. JPEGs are decoded once, at build time, so
  every reader gets the same pixels whatever its JPEG decoder, and reading costs one
  zlib.decompress (measured on MSRC 213x320: ~1,000 records/s vs ~590 for PNG bytes decoded
  with PIL; 0.74 vs 0.61 of the raw size). Compression runs in worker threads
  (`_ZlibTensor`); the files are those of a plain `tfds.features.Tensor(encoding='zlib')`,
- `mask`: uint8 [H, W] Tensor, zlib-encoded (class ids, 255 = ignore),
- `labels`: uint8 [C-1] multi-hot of the foreground classes present in the mask.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable, Iterator
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from wsss_jax import fs
from wsss_jax.data import synthetic
from wsss_jax.ops import IGNORE_INDEX

# Bump when the layout of prepared folders or the record features change.
FORMAT_VERSION = 1
META_FILE = "meta.json"
ARRAYS_FILE = "arrays.npz"
# zlib level of images and masks: tfds' own default (6), so the files are byte-identical to a
# plain tfds zlib Tensor's. Measured on MSRC and 500x375 photo crops: level 1 writes ~1.5x
# faster but is 1-3 % bigger and no faster to read; writing runs in threads, reading every
# epoch, so the smaller, equally fast-to-read level wins.
ZLIB_LEVEL = 6


class BadInputError(ValueError):
  """A dataset file is missing, unreadable or inconsistent; the message names the file."""


# Appended to per-example errors in on_bad_input='error' mode: what the user can do next.
SKIP_HINT = ("to skip bad inputs like this one and count them, rerun with "
             "--config.data.on_bad_input=skip")


def bad_input_handler(on_bad_input: str, problems: list[str]) -> Callable[[str], None]:
  """`on_bad(message)` for a builder: raises BadInputError (mode 'error', with SKIP_HINT),
  or logs a warning and appends the message to `problems` (mode 'skip')."""

  def on_bad(msg: str) -> None:
    if on_bad_input != "skip":
      raise BadInputError(f"{msg}; {SKIP_HINT}")
    logging.warning("Skipping bad input: %s", msg)
    problems.append(msg)

  return on_bad


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A uint8 array already zlib-compressed (what tfds' zlib Tensor stores)."""
  data: bytes
  shape: tuple[int, ...]


def compress(array: np.ndarray) -> Compressed:
  arr = np.ascontiguousarray(array, np.uint8)
  return Compressed(zlib.compress(arr.tobytes(), ZLIB_LEVEL), tuple(arr.shape))


class _ZlibTensor(tfds.features.Tensor):
  """`tfds.features.Tensor(..., encoding='zlib')` that also takes `Compressed` values.

  Compression is the costly part of writing (3-11 ms per image); doing it in worker threads
  (zlib releases the GIL) makes builds scale with cores. What is written, and features.json,
  are exactly those of a standard zlib Tensor, so readers need nothing from this module.
  """

  @property
  def _fully_qualified_class_name(self) -> str:
    return f"{tfds.features.Tensor.__module__}.{tfds.features.Tensor.__name__}"

  def encode_example(self, example_data):
    if isinstance(example_data, Compressed):
      if len(example_data.shape) != len(self.shape):
        raise ValueError(f"rank {len(example_data.shape)} data for feature {self.shape}")
      return {"value": example_data.data, "shape": example_data.shape}
    return super().encode_example(example_data)


def record_features(num_classes: int) -> tfds.features.FeaturesDict:
  """The tfds features of every prepared dataset (C = num_classes, background included)."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": _ZlibTensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
      "mask": _ZlibTensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
      "labels": tfds.features.Tensor(shape=(num_classes - 1,), dtype=np.uint8),
  })


def encode_record(rec: dict[str, Any], num_classes: int) -> tuple[dict[str, Any], np.ndarray]:
  """(record with compressed image and mask, its statistics row). Thread-safe."""
  out = {"id": rec["id"], "image": compress(rec["image"]), "mask": compress(rec["mask"]),
         "labels": np.asarray(rec["labels"], np.uint8)}
  return out, StatsCollector.row(rec["mask"], num_classes)


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int
                ) -> Iterator[tuple[Any, Any, BaseException | None]]:
  """Ordered map over a thread pool with a bounded look-ahead (memory stays flat).

  `items` is consumed in the calling thread (so a seeded generator stays deterministic).
  Yields (item, fn(item), None), or (item, None, error) when fn raised BadInputError.
  """
  def call(item):
    try:
      return item, fn(item), None
    except BadInputError as e:
      return item, None, e

  window = 4 * workers
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending: collections.deque = collections.deque()
    it = iter(items)
    exhausted = False
    while True:
      while not exhausted and len(pending) < window:
        try:
          pending.append(pool.submit(call, next(it)))
        except StopIteration:
          exhausted = True
      if not pending:
        return
      yield pending.popleft().result()


def default_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Multi-hot uint8 [C-1] of the foreground ids present in `mask` (0 and 255 ignored)."""
  return synthetic.labels_from_mask(mask, num_classes)


class StatsCollector:
  """Per-record statistics gathered while a builder writes, per tfds split.

  For record r: `hw[r]` = (H, W) and `pixels[r, c]` = pixels of class c (c < C), with the
  last column counting ignore (255) pixels.
  """

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self._hw: dict[str, list[tuple[int, int]]] = {}
    self._pixels: dict[str, list[np.ndarray]] = {}

  @staticmethod
  def row(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C + 3]: H, W, pixels per class id 0..C-1, ignore pixels."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return np.concatenate([mask.shape[:2], counts[:num_classes],
                           counts[IGNORE_INDEX:IGNORE_INDEX + 1]]).astype(np.int64)

  def add_row(self, tfds_split: str, row: np.ndarray) -> None:
    self._hw.setdefault(tfds_split, []).append(tuple(row[:2]))
    self._pixels.setdefault(tfds_split, []).append(row[2:])

  def arrays(self) -> dict[str, np.ndarray]:
    out = {}
    for split, hw in self._hw.items():
      out[f"hw__{split}"] = np.asarray(hw, np.int64).reshape(-1, 2)
      out[f"pixels__{split}"] = np.stack(self._pixels[split]).reshape(-1, self.num_classes + 1)
    return out


# ---------------------------------------------------------------------------------------
# Prepared folders: atomic build, meta.

def is_complete(folder: str) -> bool:
  """Whether `folder` is a finished prepared dataset (it only appears via rename)."""
  return os.path.isfile(os.path.join(folder, META_FILE))


def read_meta(folder: str) -> dict[str, Any]:
  with open(os.path.join(folder, META_FILE)) as f:
    return json.load(f)


def read_arrays(folder: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(folder, ARRAYS_FILE)) as z:
    return {k: z[k] for k in z.files}


STALE_TMP_SECONDS = 24 * 3600


def _remove_stale_tmp_dirs(parent: str, key: str) -> None:
  """Removes temporary build folders of `key` left by killed processes (older than a day;
  a live build of the same key, e.g. on another host, is younger and left alone)."""
  prefix = f".tmp-{key}-"
  now = time.time()
  for name in os.listdir(parent):
    path = os.path.join(parent, name)
    try:
      if name.startswith(prefix) and now - os.path.getmtime(path) > STALE_TMP_SECONDS:
        logging.info("Removing stale temporary build folder %s", path)
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
      pass


def check_preemption() -> None:
  """Stops a build at the next example after SIGTERM (`runtime/preemption.py`).

  Local, not collective: only one process builds. The temporary folder is removed by
  `build_atomically`, so the rerun builds again from the start.
  """
  from wsss_jax.runtime import preemption  # pylint: disable=g-import-not-at-top
  if preemption.requested():
    raise preemption.Preempted("building the dataset (a rerun builds it again)")


def build_atomically(final_dir: str, build: Callable[[str], tuple[dict[str, Any],
                                                                  dict[str, np.ndarray]]]
                     ) -> None:
  """Runs `build(tmp_dir) -> (meta, arrays)` in a temporary sibling, then renames it.

  On any exception the temporary folder is removed and nothing appears at `final_dir`.
  If another process finished the same folder first, its result is kept and ours dropped.
  """
  parent = os.path.dirname(final_dir)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_tmp_dirs(parent, os.path.basename(final_dir))
  # Not tempfile.mkdtemp: its 0700 would make the prepared folder private to its builder.
  tmp = fs.create_temp_dir(parent, prefix=f".tmp-{os.path.basename(final_dir)}-")
  try:
    start = time.time()
    meta, arrays = build(tmp)
    meta["build_seconds"] = round(time.time() - start, 3)
    meta["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)  # tfds' empty dir
    np.savez(os.path.join(tmp, ARRAYS_FILE), **arrays)
    with open(os.path.join(tmp, META_FILE), "w") as f:  # the completeness marker: last
      json.dump(meta, f, indent=1)
    try:
      os.rename(tmp, final_dir)
    except OSError:
      if not is_complete(final_dir):
        raise
      logging.info("Prepared dataset %s was completed by another process; using it.",
                   final_dir)
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def run_tfds_build(builder: tfds.core.DatasetBuilder) -> None:
  """download_and_prepare as array_record, without ever looking for a GCS copy."""
  # tfds' nested per-split progress bars flood logs and CI output; our own log lines say
  # what is built and where.
  tfds.disable_progress_bar()
  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded
  # and prepared to <temporary folder>" (termcolor, not logging): nothing is downloaded and
  # the folder is renamed afterwards, so both lines mislead. Our lines name the final one.
  builder._log_download_bytes = lambda: None  # pylint: disable=protected-access
  builder._log_download_done = lambda: None  # pylint: disable=protected-access
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def short_hash(obj: Any, n: int = 10) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------
# Synthetic.

@dataclasses.dataclass(frozen=True)
class SyntheticParams:
  """`config.data.synthetic` as plain values (everything that changes the content)."""
  num_train: int
  num_val: int
  image_size: int
  seed: int
  cooccurrence: float
  max_objects: int

  @classmethod
  def from_config(cls, cfg: Any) -> SyntheticParams:
    return cls(num_train=int(cfg.num_train), num_val=int(cfg.num_val),
               image_size=int(cfg.image_size), seed=int(cfg.seed),
               cooccurrence=float(cfg.cooccurrence), max_objects=int(cfg.max_objects))


def synthetic_key(p: SyntheticParams) -> str:
  """Folder name: readable parameters + a hash of them, the generator and format versions."""
  h = short_hash([dataclasses.asdict(p), synthetic.GENERATOR_VERSION, FORMAT_VERSION])
  return (f"n{p.num_train}-{p.num_val}_s{p.image_size}_seed{p.seed}_co{p.cooccurrence:g}"
          f"_k{p.max_objects}-{h}")


class WsssSynthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The embedded synthetic benchmark (`wsss_jax.data.synthetic`), splits train and val."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums/metadata files live next to this code; tfds' lookup of them needs
  # importlib_resources for packages installed in editable mode (not in our stack).
  code_path = None

  def __init__(self, *, params: SyntheticParams, stats: StatsCollector, **kwargs):
    self._params = params
    self._stats = stats
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Digits on textures; see wsss_jax/data/synthetic.py.",
        features=record_features(synthetic.NUM_CLASSES), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    p = self._params
    return {"train": self._generate_examples("train", p.num_train),
            "val": self._generate_examples("val", p.num_val)}

  def _generate_examples(self, split: str, num: int):
    p = self._params
    records = synthetic.generate_split(split, num, p.image_size, p.seed, p.cooccurrence,
                                       p.max_objects)
    encode = lambda rec: encode_record(rec, synthetic.NUM_CLASSES)
    for i, (_, (rec, row), _) in enumerate(bounded_map(encode, records, default_workers())):
      check_preemption()
      self._stats.add_row(split, row)
      yield i, rec


def build_synthetic(folder: str, params: SyntheticParams) -> None:
  """Builds the synthetic prepared dataset into `folder` (atomically)."""
  if params.num_train < 1 or params.num_val < 1:
    raise ValueError(f"data.synthetic needs num_train >= 1 and num_val >= 1, got {params}")

  def build(tmp: str):
    stats = StatsCollector(synthetic.NUM_CLASSES)
    builder = WsssSynthetic(params=params, stats=stats, data_dir=tmp)
    run_tfds_build(builder)
    meta = {
        "format": FORMAT_VERSION, "name": "synthetic",
        "class_names": list(synthetic.SYNTHETIC_CLASSES),
        "tfds_dir": os.path.relpath(os.fspath(builder.data_path), tmp),
        "splits": {s: {"tfds_split": s, "count": n}
                   for s, n in (("train", params.num_train), ("val", params.num_val))},
        "source": {"params": dataclasses.asdict(params),
                   "generator_version": synthetic.GENERATOR_VERSION},
        "skipped": {},
    }
    return meta, stats.arrays()

  logging.info("Building synthetic dataset %s into %s", params, folder)
  build_atomically(folder, build)
