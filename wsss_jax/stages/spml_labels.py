"""`spml_labels` stage: SPML inference -> pseudo-labels for the shared segmentation stage.

Also home of `training_source`, the record source the `train` stage feeds SPML with.

Pseudo-labels (METHODS.md §5.5), per image of the train and sweep splits, with the trained
SPML embedding (`workdir/train`):

1. Random walk ("cam_rw"): embeddings at scale 1 (+ flip), resized to stride
   `rw_stride`, affinity a_ij = exp(rw_scale (e_i.e_j - 1)) averaged over the flips,
   raised to `rw_beta`, column-normalised -> T; scores v <- v T repeated 2^`rw_logt` times
   (= v T^(2^logt), without forming the matrix power). Scores: for tags the baseline's
   CAMs (`workdir/cams`, the image's classes) with a constant background plane at the
   sweep's best threshold (our CAMs' background rule; SEAM's (1-max)^6 does not apply to
   them); for points/scribbles/boxes the SPML classifier's softmax (flip-averaged).
   Optional DeepLab CRF (`rw_crf`). Argmax -> cam_rw labels.
2. Nearest-prototype propagation ("cam_nn", tags only, `propagation='nn'`): per image,
   spherical k-means (`nn_grid`^2 grid init) on the location-augmented embedding; each
   cluster's prototype is labelled with its majority cam_rw label; all training-set
   prototypes form the memory. Each cluster of each image retrieves its `nn_topk` nearest
   memory prototypes; their label histogram is the cluster's class distribution. Tag
   classes are divided by max(their max, `nn_min_norm`); classes absent from the tags are
   zeroed (`nn_mask_absent`, our choice; the reference code leaves them). DeepLab CRF
   (`nn_crf`), argmax.

Scale 1 + flip only (the reference uses 0.5-2 and sliding windows: CPU budget). The
reference then trains two bootstrapped softmax classifiers on these labels: the
`spml_bootstrap` stage (`stages/spml_bootstrap.py`, in the full configs), whose labels the
`seg` stage then trains on; without it the `seg` stage trains on these labels
(`--config.seg.pseudo_dir=spml/pseudo`). SPML's own jointly trained classifier is scored
on `data.val_split` directly (`spml_classifier_miou`, scale 1 + flip, no CRF).

Writes `workdir/spml/pseudo/<id>.png` and reports `spml_rw_miou`, `spml_pseudo_miou`
(sweep split, as the pseudo stage scores), `spml_classifier_miou`.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax.data import palette
from wsss_jax.data import sources
from wsss_jax.data import superpixels
from wsss_jax.data import transforms
from wsss_jax.data import weak_labels
from wsss_jax.methods import spml
from wsss_jax.ops import kmeans as kmeans_ops
from wsss_jax.ops import metrics
from wsss_jax.ops import resize
from wsss_jax.ops import seg_inference
from wsss_jax.ops import segments as seg_ops
from wsss_jax.stages import cam_store
from wsss_jax.stages import inference
from wsss_jax.stages import pseudo as pseudo_stage
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import mesh as mesh_lib

OUT_DIR = "spml"          # labels in workdir/spml/pseudo/<id>.png (pseudo-stage layout)
PROPAGATIONS = ("nn", "rw")
SCORE_SOURCES = ("cams", "softmax", "bootstrap")


def default_config() -> mlc.ConfigDict:
  """The `config.spml_labels` block."""
  return mlc.ConfigDict(dict(
      propagation="",            # nn | rw; '' = nn for tags, rw for the other weak labels
      train_labels="pseudo",     # folder of the CAM pseudo-labels SPML trains on (tags)
      flip=True,
      rw_stride=8, rw_scale=5.0, rw_beta=20.0, rw_logt=6, rw_crf=False,
      max_classes=8,             # classes per image carried through the random walk
      nn_grid=12, nn_iters=10, nn_topk=20, nn_min_norm=0.15, nn_mask_absent=True,
      nn_crf=True, eval_classifier=True))


# ---------------------------------------------------------------------------------------
# Training source.
# ---------------------------------------------------------------------------------------
class SPMLTrainSource:
  """Records whose `mask` is SPML's training label and that carry `superpixels`.

  `mask`: for tags, the CAM pseudo-label PNG with its "unsure" 255 pixels mapped to the
  SPML "unlabeled" id C; otherwise the weak label derived from the GT mask
  (`data/weak_labels.py`). `superpixels`: uint16 [H, W] (when `sp_dir`). Picklable.
  """

  def __init__(self, base: Any, num_classes: int, weak_label: str, label_dir: str | None,
               sp_dir: str | None):
    self.base, self.num_classes, self.weak_label = base, num_classes, weak_label
    self.label_dir, self.sp_dir = label_dir, sp_dir

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.base[index])
    shape = record["mask"].shape
    if self.weak_label == "tags":
      path = os.path.join(self.label_dir, f"{record['id']}.png")
      if not fs.exists(path):
        raise FileNotFoundError(f"{path}: CAM pseudo-label missing; run the pseudo stage "
                                "(on the baseline's CAMs) before training SPML")
      label = pseudo_stage.read_label(path)
      label = np.where(label == pseudo_stage.pseudo_labels.IGNORE, self.num_classes, label)
    else:
      label = weak_labels.weak_label(record["mask"], self.weak_label, self.num_classes)
    if label.shape != shape:
      raise ValueError(f"label of {record['id']} is {label.shape}, image is {shape}")
    record["mask"] = label.astype(np.uint8)
    if self.sp_dir is not None:
      sp = superpixels.read(self.sp_dir, record["id"])
      if sp.shape != shape:
        raise ValueError(f"superpixels of {record['id']} are {sp.shape}, image is {shape}")
      record["superpixels"] = sp
    return record


def training_source(config: mlc.ConfigDict, workdir: str, base: Any) -> SPMLTrainSource:
  """The train stage's source for `method='spml'` (computes superpixels once if needed)."""
  meta = sources.get_meta(config.data)
  weak = config.data.get("weak_label", "tags")
  if weak not in spml.WEAK_LABELS:
    raise ValueError(f"config.data.weak_label={weak!r}; expected one of {spml.WEAK_LABELS}")
  sp_cfg = config.spml.superpixels
  sp_dir = (None if sp_cfg.method == "none" else
            superpixels.ensure(config.data, sp_cfg, config.data.train_split))
  label_dir = os.path.join(workdir, config.spml_labels.train_labels)
  return SPMLTrainSource(base, meta.num_classes, weak, label_dir, sp_dir)


# ---------------------------------------------------------------------------------------
# Pure pieces (jittable).
# ---------------------------------------------------------------------------------------
def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def random_walk(scores: jax.Array, embeddings: jax.Array, valid: jax.Array, *,
                scale: float, beta: float, logt: int) -> jax.Array:
  """Propagates per-pixel scores with embedding affinities (PSA/SPML random walk).

  Args:
    scores: [B, N, R] scores of R classes at N pixels.
    embeddings: [F, B, N, D] unit embeddings of F views (e.g. image and flip), averaged
      as affinities.
    valid: [B, N] bool; invalid pixels neither send nor receive.
    scale, beta: a_ij = exp(scale (e_i.e_j - 1)) ** beta.
    logt: number of squarings of T: the walk has 2^logt steps.

  Returns:
    [B, N, R] scores times T^(2^logt) (T column-normalised).
  """
  aff = jnp.mean(jnp.exp(scale * (jnp.einsum("fbid,fbjd->fbij", embeddings, embeddings)
                                   - 1.0)), axis=0)
  m = valid.astype(jnp.float32)
  aff = (aff ** beta) * m[:, :, None] * m[:, None, :]
  t = aff / jnp.maximum(jnp.sum(aff, axis=1, keepdims=True), 1e-12)   # columns sum to 1
  return jax.lax.fori_loop(0, 2 ** logt, lambda _, v: jnp.einsum("bir,bij->bjr", v, t),
                           scores.astype(jnp.float32))


def nn_class_scores(queries: jax.Array, query_valid: jax.Array, memory: jax.Array,
                    memory_labels: jax.Array, memory_valid: jax.Array, num_classes: int,
                    k: int) -> jax.Array:
  """Class histogram of the `k` nearest memory prototypes of each query.

  Args:
    queries: [Q, D] unit; query_valid: [Q] bool.
    memory: [M, D] unit; memory_labels: [M] int; memory_valid: [M] bool.

  Returns:
    [Q, C] fractions of the k neighbours per class (0 rows for invalid queries).
  """
  sims = jnp.where(memory_valid[None, :], queries @ memory.T, -jnp.inf)
  _, idx = jax.lax.top_k(sims, k)
  ok = jnp.take(memory_valid, idx)
  hist = jnp.sum(jax.nn.one_hot(jnp.take(memory_labels, idx), num_classes)
                 * ok[..., None], axis=-2)
  return jnp.where(query_valid[:, None], hist / k, 0.0)


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------
def _propagation(config: mlc.ConfigDict) -> str:
  mode = config.spml_labels.propagation or (
      "nn" if config.data.get("weak_label", "tags") == "tags" else "rw")
  if mode not in PROPAGATIONS:
    raise ValueError(f"config.spml_labels.propagation={mode!r}; expected one of "
                     f"{PROPAGATIONS} or ''")
  return mode


def bootstrap_scores(logits: jax.Array, valid: jax.Array, present: jax.Array) -> jax.Array:
  """Class scores of a bootstrapped classifier (the reference's `pseudo_softmax.py`).

  Args:
    logits: float [B, H, W, C] classifier logits (already averaged over scales/flips).
    valid: bool [B, H, W] image pixels (not padding).
    present: bool [B, C] background + the image's tags.

  Returns:
    float32 [B, H, W, C]: softmax divided by each class's maximum over the valid pixels;
    classes absent from the tags are 0.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  peak = jnp.max(jnp.where(valid[..., None], probs, 0.0), axis=(1, 2), keepdims=True)
  return jnp.where(present[:, None, None, :], probs / jnp.maximum(peak, 1e-5), 0.0)


def _first_pass_fn(config: mlc.ConfigDict, model: Any, num_classes: int, bg: float,
                   score_source: str, logt: int, scales: tuple[float, ...] = (1.0,)):
  """(variables, batch) -> cam_rw labels, cluster ids, prototypes and their labels.

  `score_source` (SCORE_SOURCES): 'cams' = the batch's CAMs with a constant background `bg`;
  'softmax' = the SPML classifier's softmax (scale 1, flip-averaged); 'bootstrap' =
  `bootstrap_scores` of the classifier's logits averaged over `scales` (+ flip). The walk
  has 2^`logt` steps.
  """
  lc = config.spml_labels
  grid, r = int(lc.nn_grid), min(int(lc.max_classes), num_classes)

  def fn(variables, batch):
    images, valid = batch["image"], batch["valid"]
    b, p = images.shape[:2]
    x = jnp.concatenate([images, images[:, :, ::-1]]) if lc.flip else images
    out = inference.forward(model, variables, x)
    emb = out["embedding"]
    views = [emb[:b]] + ([emb[b:, :, ::-1]] if lc.flip else [])
    present = present_classes(batch["labels"])
    if score_source == "cams":
      scores = jnp.concatenate([jnp.full(batch["cams"].shape[:3] + (1,), bg),
                                 batch["cams"]], axis=-1)
    elif score_source == "softmax":
      logits = out["seg_logits"]
      scores = jax.nn.softmax(logits[:b], -1)
      if lc.flip:
        scores = 0.5 * (scores + jax.nn.softmax(logits[b:, :, ::-1], -1))
    else:
      # Its scale-1 pass repeats the forward above on the same input; XLA's CSE merges
      # the two inside this one jitted function.
      logits = seg_inference.multiscale_logits(
          lambda y: inference.forward(model, variables, y)["seg_logits"], images, scales,
          bool(lc.flip))
      scores = bootstrap_scores(logits, valid, present)
    # Random walk on the R most relevant classes (the present ones first).
    _, cls = jax.lax.top_k(present.astype(jnp.float32) + 1e-3 * jnp.arange(
        num_classes, 0, -1), r)
    s = int(lc.rw_stride)
    hr, wr = p // s, p // s
    sel = jnp.take_along_axis(jax.image.resize(scores, (b, hr, wr, num_classes), "bilinear"),
                              cls[:, None, None, :], axis=-1)
    sel = sel * jnp.take_along_axis(present, cls, axis=-1)[:, None, None, :]
    e_r = jnp.stack([_normalize(jax.image.resize(e, (b, hr, wr, e.shape[-1]), "bilinear"))
                     for e in views]).reshape(len(views), b, hr * wr, -1)
    v_r = resize.resize_nearest(valid, (hr, wr)).reshape(b, -1)
    walked = random_walk(sel.reshape(b, hr * wr, r), e_r, v_r, scale=float(lc.rw_scale),
                         beta=float(lc.rw_beta), logt=logt)
    full = jnp.full((b, hr * wr, num_classes), -1.0).at[
        jnp.arange(b)[:, None, None], jnp.arange(hr * wr)[None, :, None],
        cls[:, None, :]].set(walked)
    full = jnp.where(present[:, None, :], full, -1.0)
    up = resize.resize_bilinear(full.reshape(b, hr, wr, num_classes), (p, p))
    if lc.rw_crf:
      up = crf_probs(jnp.maximum(up, 0.0) * present[:, None, None, :], images, valid)
      up = jnp.where(present[:, None, None, :], up, -1.0)
    rw_label = jnp.argmax(up, axis=-1).astype(jnp.int32)
    # Clusters and their prototypes (memory for the nearest-neighbour step).
    e = _normalize(sum(views))
    h4, w4 = e.shape[1:3]
    v4 = resize.resize_nearest(valid, (h4, w4)).reshape(b, -1)
    lab4 = resize.resize_nearest(rw_label, (h4, w4)).reshape(b, -1)

    def cluster(e_img, m, lab):
      loc = seg_ops.location_features(h4, w4)
      pts = _normalize(jnp.concatenate([e_img.reshape(-1, e_img.shape[-1]), loc], -1))
      init, counts = kmeans_ops.centers_from_assign(
          pts, m, kmeans_ops.grid_init_assign(h4, w4, grid, grid), grid * grid,
          spherical=True)
      res = kmeans_ops.kmeans(pts, m, init, num_iters=int(lc.nn_iters), spherical=True,
                              center_mask=counts > 0)
      protos = seg_ops.segment_means(e_img.reshape(-1, e_img.shape[-1]), res.assign,
                                     grid * grid)
      plab, votes = seg_ops.segment_mode(lab, res.assign, grid * grid, num_classes, m)
      return res.assign.reshape(h4, w4), protos, plab, votes > 0

    ids, protos, plab, pval = jax.vmap(cluster)(e, v4, lab4)
    return {"rw_label": rw_label, "ids": ids, "protos": protos, "proto_label": plab,
            "proto_valid": pval}

  return fn


def present_classes(labels: jax.Array) -> jax.Array:
  """bool [B, C]: background (always) + the image tags `labels` [B, C-1] (0/1)."""
  return jnp.concatenate([jnp.ones((labels.shape[0], 1)), labels], axis=-1) > 0.5


def crf_probs(scores: jax.Array, images: jax.Array, valid: jax.Array) -> jax.Array:
  """DeepLab CRF marginals [B, H, W, C] of non-negative `scores` [B, H, W, C] (normalised
  per pixel here) on the normalised `images` [B, H, W, 3]; `valid` [B, H, W] bool."""
  prob = scores / jnp.maximum(jnp.sum(scores, -1, keepdims=True), 1e-6)
  images255 = jnp.clip(transforms.denormalize(images, as_uint8=False), 0, 255)
  return seg_inference.crf_refine_probs(prob, images255, valid)


def _nn_fn(config: mlc.ConfigDict, num_classes: int):
  """(memory, batch + first-pass outputs) -> cam_nn labels [B, P, P]."""
  lc = config.spml_labels

  def fn(memory, batch):
    images, valid = batch["image"], batch["valid"]
    b, p = images.shape[:2]
    hist = jax.vmap(lambda q, qv: nn_class_scores(
        q, qv, memory["features"], memory["labels"], memory["valid"], num_classes,
        int(lc.nn_topk)))(batch["protos"], batch["proto_valid"])        # [B, K, C]
    ids = batch["ids"]
    pix = jnp.take_along_axis(hist, jnp.maximum(ids, 0).reshape(b, -1, 1), axis=1)
    pix = jnp.where((ids >= 0).reshape(b, -1, 1), pix, 0.0)
    pix = pix.reshape(ids.shape + (num_classes,))
    up = resize.resize_bilinear(pix, (p, p))
    present = present_classes(batch["labels"])
    peak = jnp.max(jnp.where(valid[..., None], up, 0.0), axis=(1, 2), keepdims=True)
    up = jnp.where(present[:, None, None, :], up / jnp.maximum(peak, float(lc.nn_min_norm)),
                   up)
    if lc.nn_mask_absent:
      up = jnp.where(present[:, None, None, :], up, 0.0)
    if lc.nn_crf:
      up = crf_probs(up, images, valid)
      if lc.nn_mask_absent:
        up = jnp.where(present[:, None, None, :], up, -1.0)
    return {"label": jnp.argmax(up, axis=-1).astype(jnp.int32)}

  return fn


def write_label(out_root: str, image_id: str, label: np.ndarray) -> None:
  """Writes `label` [H, W] (class ids) to `out_root/pseudo/<id>.png`, atomically."""
  with wd.atomic_path(pseudo_stage.label_path(out_root, image_id)) as tmp:
    palette.save_palette_png(tmp, label.astype(np.uint8))


def classifier_miou(config: mlc.ConfigDict, model: Any, variables: Any, mesh: Any,
                    num_classes: int, scales: tuple[float, ...] = (1.0,),
                    crf: bool = False) -> float:
  """mIoU of an SPML softmax classifier on `data.val_split`: softmax averaged over
  `scales` (+ flip when `spml_labels.flip`), optional DeepLab CRF; no tags are used."""
  def fn(variables, batch):
    probs = seg_inference.multiscale_probs(
        lambda x: inference.forward(model, variables, x)["seg_logits"], batch["image"],
        scales, bool(config.spml_labels.flip))
    if crf:
      probs = crf_probs(probs, batch["image"], batch["valid"])
    return {"pred": jnp.argmax(probs, -1).astype(jnp.int32)}

  conf = np.zeros((num_classes, num_classes), np.int64)
  for record, out in inference.predict_split(config, config.data.val_split, fn, mesh,
                                             variables=variables):
    h, w = record["mask"].shape
    conf += metrics.confusion_matrix_np(record["mask"], out["pred"][:h, :w], num_classes)
  return float(metrics.iou_from_confusion_np(conf)[1])


def propagate(config: mlc.ConfigDict, workdir: str, model: Any, variables: Any, mesh: Any,
              out_root: str, *, score_source: str, logt: int, bg: float = 0.0,
              scales: tuple[float, ...] = (1.0,)) -> float:
  """Steps 1-2 of the module docstring over the train and sweep splits.

  Writes `out_root/pseudo/<id>.png` (nearest-prototype labels, or the random walk's when
  the propagation is 'rw'); returns the random-walk labels' mIoU on the sweep split.
  `score_source`, `logt`, `scales`: see `_first_pass_fn` ('cams' reads `workdir/cams`).
  """
  if score_source not in SCORE_SOURCES:
    raise ValueError(f"score_source={score_source!r}; expected one of {SCORE_SOURCES}")
  c = sources.get_meta(config.data).num_classes
  mode = _propagation(config)
  first = _first_pass_fn(config, model, c, bg, score_source, logt, scales)
  splits = list(dict.fromkeys([config.data.train_split, config.data.sweep_split]))
  cache: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  rw_conf = np.zeros((c, c), np.int64)
  for split in splits:
    add = (functools.partial(pseudo_stage.dense_cams_batch,
                             cam_dir=cam_store.split_dir(workdir, split), num_fg=c - 1)
           if score_source == "cams" else None)
    cache[split] = {}
    for record, out in inference.predict_split(config, split, first, mesh,
                                               variables=variables, add_inputs=add):
      h, w = record["mask"].shape
      rw = out.pop("rw_label")[:h, :w]
      if split == config.data.sweep_split:
        rw_conf += metrics.confusion_matrix_np(record["mask"], rw, c)
      if mode == "rw":
        write_label(out_root, record["id"], rw)
      else:
        cache[split][record["id"]] = out
  if mode == "nn":
    train = cache[config.data.train_split]
    memory = {"features": np.concatenate([o["protos"] for o in train.values()]),
              "labels": np.concatenate([o["proto_label"] for o in train.values()]),
              "valid": np.concatenate([o["proto_valid"] for o in train.values()])}
    nn = _nn_fn(config, c)
    for split in splits:
      def add(batch, split=split):
        keys = ("ids", "protos", "proto_valid")
        ref = next(iter(cache[split].values()))
        out = {k: np.zeros((len(batch["id"]),) + ref[k].shape, ref[k].dtype) for k in keys}
        for j, image_id in enumerate(batch["id"]):
          if str(image_id) in cache[split]:
            for k in keys:
              out[k][j] = cache[split][str(image_id)][k]
        out["ids"] = np.where(np.asarray(batch["index"])[:, None, None] >= 0, out["ids"], -1)
        return out
      for record, out in inference.predict_split(config, split, nn, mesh, variables=memory,
                                                 add_inputs=add):
        h, w = record["mask"].shape
        write_label(out_root, record["id"], out["label"][:h, :w])
  return float(metrics.iou_from_confusion_np(rw_conf)[1])


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  if jax.process_count() > 1:
    # The prototype memory of step 2 needs every image's clusters in one process; the
    # multi-process gather (train/distributed.py) is not wired in here yet.
    raise ValueError("the spml_labels stage runs in a single process; run it without "
                     "--num_processes (the train stage may use several)")
  meta = sources.prepare(config.data)
  c = meta.num_classes
  mode = _propagation(config)
  use_cams = config.data.get("weak_label", "tags") == "tags"
  out_root = os.path.join(workdir, OUT_DIR)
  marker = os.path.join(out_root, "complete.json")
  bg = pseudo_stage.foreground_threshold(config, workdir) if use_cams else 0.0
  settings = {"labels": config.spml_labels.to_dict(), "mode": mode, "bg": bg,
              "weak_label": config.data.get("weak_label", "tags")}
  if fs.exists(marker) and wd.read_json(marker).get("settings") == settings:
    return wd.read_json(marker)["scores"]
  model = spml.build_model(config, c)
  variables = inference.load_variables(
      os.path.join(workdir, "train", inference.VARIABLES_FILE))
  mesh = mesh_lib.make_mesh(config.mesh)
  scores = {"spml_rw_miou": propagate(
      config, workdir, model, variables, mesh, out_root,
      score_source="cams" if use_cams else "softmax", logt=int(config.spml_labels.rw_logt),
      bg=bg)}
  scored = pseudo_stage.score(config, out_root, config.data.sweep_split)
  scores.update({f"spml_{k}": v for k, v in scored.items()})
  if config.spml_labels.eval_classifier:
    scores["spml_classifier_miou"] = classifier_miou(config, model, variables, mesh, c)
  wd.write_json(os.path.join(out_root, "pseudo", "settings.json"), settings)
  wd.write_json(marker, {"settings": settings, "scores": scores})
  return scores
