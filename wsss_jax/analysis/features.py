"""Method internals of a trained model, for the method-internals notebook: feature maps,
k-means segments, background NROIs, class prototypes and a FIFO-bank replay.

These are the building blocks the contrastive methods train with (METHODS.md §3 FBR,
§4 DSCNet-R, §5 SPML), computed here with the same `ops.kmeans` and `ops.memory`
functions on the features of any trained work directory (the CAM baseline included),
without the methods' training code:

  * segments: spherical k-means of one image's L2-normalised features (SPML, DSCNet groups);
  * NROIs: k-means centroids of the background pixels only (FBR's non-salient regions);
  * prototypes: the mean feature of each class's pixels under the pseudo-label (FBR);
  * bank replay: NROIs of successive batches pushed into a `FifoBank`, with statistics
    after each push (how full, how diverse, how old, how close to the foreground).

The replay runs the trained model's features through the bank after training: it shows
how such a bank behaves on these features, not the bank of the run itself (that one is
in the checkpoint's `extra` state, see `checkpoint_extra`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import fs
from wsss_jax.analysis import reader
from wsss_jax import methods
from wsss_jax.data import transforms
from wsss_jax.ops import kmeans as km
from wsss_jax.ops import memory
from wsss_jax.ops.norms import l2_normalize
from wsss_jax.stages import inference

Extractor = Callable[[np.ndarray], dict[str, np.ndarray]]


def model_outputs(w: reader.Workdir, stage: str = "train", scale: float = 1.0
                  ) -> Extractor:
  """`images uint8 [B, H, W, 3] -> model outputs` (numpy) of the trained model of `stage`.

  `stage='train'` is `config.method`'s model, `'baseline'` the CAM baseline's. Outputs
  follow CONVENTIONS.md (`features` [B, h, w, L] at the output stride, `cams`, ...).
  `scale` resizes the images first (bilinear): at output stride 16 a 64² image has 4x4
  features, so a scale of 2-4 gives maps fine enough to look at (as multi-scale CAM
  inference runs the model at several scales).
  """
  name = "cam" if stage == "baseline" else None
  method = methods.make_method(w.config, w.num_classes, name=name)
  variables = w.variables(stage)

  def forward(v: Any, images: jax.Array) -> dict[str, jax.Array]:
    if scale != 1.0:
      b, h, wd_, c = images.shape
      size = (b, round(h * scale), round(wd_ * scale), c)
      images = jax.image.resize(images, size, "bilinear")
    return inference.forward(method.model, v, images)

  fn = jax.jit(forward)
  return lambda images: jax.device_get(fn(variables, transforms.normalize(images)))


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of an int label map (pixel centres, half-pixel convention)."""
  h, w = labels.shape
  ys = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(int), h - 1)
  xs = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(int), w - 1)
  return labels[ys[:, None], xs[None, :]]


def kmeans_segments(features: np.ndarray, k: int, *, mask: np.ndarray | None = None,
                    spherical: bool = True, num_iters: int = 10, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """k-means of one image's feature map (`ops.kmeans`, k-means++ seeding).

  Args:
    features: float [h, w, D].
    k: clusters.
    mask: bool [h, w]: cluster only these pixels (others get -1). Default: all.
    spherical: cosine geometry on L2-normalised features (SPML/DSCNet); else Euclidean.
    num_iters: Lloyd iterations.
    seed: PRNG seed of the seeding.

  Returns:
    {'assign': int32 [h, w] (-1 outside the mask), 'centers': [k, D], 'counts': [k]}.
  """
  h, w, d = features.shape
  pts = features.reshape(-1, d).astype(np.float32)
  if spherical:
    pts = l2_normalize(pts)
  m = np.ones(h * w, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
  res = _seeded_kmeans(jax.random.key(seed), pts, m, k=k, num_iters=num_iters,
                       spherical=spherical)
  return {"assign": np.asarray(res.assign).reshape(h, w), "centers": np.asarray(res.centers),
          "counts": np.asarray(res.counts)}


@functools.partial(jax.jit, static_argnames=("k", "num_iters", "spherical"))
def _seeded_kmeans(key: jax.Array, points: jax.Array, mask: jax.Array, *, k: int,
                   num_iters: int, spherical: bool) -> km.KMeansResult:
  # One compiled program per (shape, k): the notebook calls this for every image.
  init = km.kmeans_plusplus_init(key, points, mask, k)
  if spherical:
    init = l2_normalize(init)
  return km.kmeans(points, mask, init, num_iters=num_iters, spherical=spherical)


def class_prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int
                     ) -> dict[str, np.ndarray]:
  """Mean L2-normalised feature of each class's pixels (`ops.kmeans.centers_from_assign`).

  Args:
    features: float [h, w, D].
    labels: int [h, w] class ids at the feature resolution (255 = unsure, left out).
    num_classes: C.

  Returns:
    {'prototypes': [C, D] (L2-normalised; zero for absent classes), 'counts': [C]}.
  """
  d = features.shape[-1]
  pts = l2_normalize(features.reshape(-1, d).astype(np.float32))
  lab = labels.reshape(-1).astype(np.int32)
  centers, counts = km.centers_from_assign(pts, lab < num_classes, lab, num_classes)
  return {"prototypes": np.asarray(l2_normalize(centers)), "counts": np.asarray(counts)}


def similarity_maps(features: np.ndarray, vectors: np.ndarray) -> np.ndarray:
  """Cosine similarity of every pixel to each vector: float32 [N, h, w] in [-1, 1]."""
  f = l2_normalize(features.astype(np.float32))
  return np.einsum("hwd,nd->nhw", f, l2_normalize(vectors.astype(np.float32)))


def background_mask(w: reader.Workdir, split: str, record: dict[str, Any],
                    size: tuple[int, int]) -> np.ndarray:
  """bool [h, w]: background under the pseudo-label (else the CAM at the best threshold),
  at the feature resolution `size`; FBR takes its NROIs from such pixels."""
  label = w.pseudo_label(record["id"]) if split in (w.train_split, w.sweep_split) else None
  if label is None:
    label = w.cam_prediction(split, record)
  return resize_labels(np.asarray(label), size) == 0


def bank_statistics(bank: memory.FifoBank, step: int,
                    queries: np.ndarray | None = None) -> dict[str, float]:
  """Statistics of a bank of {'feat' [Q, D], 'step' [Q]} items after batch `step`.

  Returns:
    count, fill (count / Q), mean_pairwise_cos (diversity: lower = more diverse
    negatives), mean_age (in batches), and with `queries` [M, D] (foreground
    prototypes) `fg_to_bank_cos`: the mean over queries of their highest cosine to a bank
    item (how close the nearest negative is; high = hard negatives).
  """
  valid = np.asarray(memory.fifo_valid(bank))
  n = int(valid.sum())
  out = {"count": float(n), "fill": n / valid.size, "mean_pairwise_cos": float("nan"),
         "mean_age": float("nan"), "fg_to_bank_cos": float("nan")}
  if n == 0:
    return out
  feats = l2_normalize(np.asarray(bank.items["feat"])[valid])
  ages = step - np.asarray(bank.items["step"])[valid]
  out["mean_age"] = float(ages.mean())
  if n > 1:
    sim = feats @ feats.T
    out["mean_pairwise_cos"] = float((sim.sum() - np.trace(sim)) / (n * (n - 1)))
  if queries is not None and len(queries):
    out["fg_to_bank_cos"] = float((l2_normalize(queries) @ feats.T).max(axis=1).mean())
  return out


def nroi_bank_replay(w: reader.Workdir, extract: Extractor, split: str | None = None, *,
                     num_nrois: int = 4, capacity: int = 32, batch_size: int = 4,
                     max_batches: int | None = None, seed: int = 0,
                     feature_key: str = "features") -> list[dict[str, float]]:
  """Pushes each batch's background NROIs into a FIFO bank; statistics after each batch.

  Per image: features from `extract` (output `feature_key`), background pixels
  (`background_mask`), k-means with `num_nrois` centres over them (`kmeans_segments`,
  spherical); the non-empty centroids are enqueued (`memory.fifo_enqueue`). Foreground
  prototypes of the same batch are the queries of `bank_statistics`.

  Returns:
    One dict per batch: {'batch', 'enqueued', **bank_statistics}.
  """
  split = split or w.train_split
  src = w.source(split)
  n = len(src) if max_batches is None else min(len(src), max_batches * batch_size)
  bank = None
  enqueue = jax.jit(memory.fifo_enqueue)
  history = []
  for b, start in enumerate(range(0, n, batch_size)):
    recs = [src[i] for i in range(start, min(n, start + batch_size))]
    # Images of one split may differ in size: run them one at a time.
    feats = [extract(r["image"][None])[feature_key][0] for r in recs]
    nrois, masks, queries = [], [], []
    for r, f in zip(recs, feats):
      bg = background_mask(w, split, r, f.shape[:2])
      seg = kmeans_segments(f, num_nrois, mask=bg, seed=seed + start)
      nrois.append(seg["centers"])
      masks.append(seg["counts"] > 0)
      label = w.pseudo_label(r["id"])
      if label is not None:
        protos = class_prototypes(f, resize_labels(label, f.shape[:2]), w.num_classes)
        queries.append(protos["prototypes"][1:][protos["counts"][1:] > 0])
    items = {"feat": np.concatenate(nrois).astype(np.float32),
             "step": np.full(sum(len(c) for c in nrois), b, np.int32)}
    if bank is None:
      bank = memory.fifo_init(capacity, {"feat": jnp.zeros(items["feat"].shape[1:]),
                                         "step": jnp.zeros((), jnp.int32)})
    bank = enqueue(bank, items, jnp.asarray(np.concatenate(masks)))
    q = np.concatenate(queries) if queries else None
    history.append({"batch": b, "enqueued": int(np.concatenate(masks).sum()),
                    **bank_statistics(bank, b, q)})
  return history


def checkpoint_extra(w: reader.Workdir, stage: str = "train") -> Any:
  """The method's `extra` state (EMA teacher, memory banks, prototypes) from the latest
  orbax checkpoint of `stage`, as a host pytree; None when there is none or it cannot be
  read without the method's target structure. An empty `extra` (the CAM baseline) is
  returned as it is (falsy)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  root = w.file(stage, "checkpoints")
  if not fs.isdir(root):
    root = w.file(stage)
  steps = [int(s) for s in fs.listdir(root) if s.isdigit()] if fs.isdir(root) else []
  if not steps:
    return None
  path = os.path.join(root, str(max(steps)), "state")
  try:
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore(path)
  except Exception:  # pylint: disable=broad-except  (orbax raises many types; best effort)
    return None
  return state.get("extra") if isinstance(state, dict) else getattr(state, "extra", None)


def bank_summaries(extra: Any) -> list[dict[str, Any]]:
  """One row per FIFO bank found in a checkpoint's `extra` state (any dict with `items`,
  `ptr` and `count`, as `ops.memory.FifoBank` is saved): its path, capacity, fill and
  the mean pairwise cosine of its stored feature vectors. Per-class banks (a leading
  class axis) get one row per class."""
  rows: list[dict[str, Any]] = []

  def visit(path: str, node: Any) -> None:
    if isinstance(node, dict) and {"items", "ptr", "count"} <= set(node):
      items = node["items"]
      if isinstance(items, dict):  # items stored next to their tags: take the features
        items = items.get("feat", next(iter(items.values())))
      feats = items
      feats, count = np.asarray(feats, np.float32), np.asarray(node["count"])
      per_class = count.ndim == 1
      for c in range(count.shape[0]) if per_class else [None]:
        f = feats[c] if per_class else feats
        n = int(count[c] if per_class else count)
        valid = l2_normalize(f.reshape(f.shape[0], -1)[:n])
        cos = (float(((valid @ valid.T).sum() - n) / (n * (n - 1))) if n > 1 else None)
        rows.append({"bank": path + (f"[{c}]" if per_class else ""),
                     "capacity": int(f.shape[0]), "count": n,
                     "fill": n / f.shape[0], "mean_pairwise_cos": cos})
    elif isinstance(node, dict):
      for k, v in node.items():
        visit(f"{path}/{k}" if path else str(k), v)

  visit("", extra)
  return rows
