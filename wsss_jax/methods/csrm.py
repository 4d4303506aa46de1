"""CSRM: cross-supervision and contrasting of pixel-level pseudo-labels (METHODS.md §2).

A second training stage on top of a CAM model (warm start: the pipeline's `baseline` stage
and `config.train.init_from='baseline'`). Student and EMA teacher of `models/csrm_net`
(classification branch, DeepLabV3+ with C classes, representation head); one step:

  X = the step's images, "L" and "U" roles interleaved (even rows L, odd rows U; see
      `config.csrm.unlabeled`)
  1. teacher (eval) on X -> class maps A_t, seg logits S_t
  2. CAM pseudo masks Y_cam from A_t: double threshold (+ on-device label CRF)
  3. ClassMix (p = 0.5) of X, Y_cam, labels, S_t
  4. P_t = label-masked softmax(S_t)
  5. student (train) on mixed X -> A_s, S_s, R_s
  6. teacher second pass on mixed X (train mode = dropout, as the reference) -> S_t4, R_t
  7. L = w_c L_c + w_c2s L_c2s + w_s2c(e) L_s2c + [e >= w] (w_u L_u + w_contra L_contra)
  8. (update_extra) EMA teacher; per-class FIFO queues of teacher negatives

Everything runs inside the one jitted step. Cross-example statistics (entropy percentiles,
class prototypes, queue contents, ClassMix partners, anchor sampling) are computed on the
*global* batch: under shard_map the method all-gathers the (small or detached) maps it needs
and draws every random choice from a key kept in `extra` (replicated), so both step
implementations compute the same update. Student anchor features are gathered by global
index with a psum (gradient flows back to the owning device). Cost under shard_map: the
ClassMix inputs (images, pseudo masks, full-resolution teacher logits) and the teacher
representations are all-gathered.

Reference discrepancies (METHODS.md §2.8) as `config.csrm` flags, reference value first:
  1 epoch length: `steps_per_epoch` (46 for VOC), schedules use the integer epoch.
  2 teacher modes: `teacher_pass2` = 'train' (dropout on, a second forward) | 'eval' |
    'none' (reuse the first pass, ClassMix-ed like S_t; one forward less).
  3 warm-up off-by-one: `ema_copy_inclusive` True (copy while epoch <= warmup).
  4 "unlabeled" images use their labels: `unlabeled_use_labels` True (label masking of
    P_t and the "not in the image label" negatives for U images).
  5 contrast normaliser: `contrast_norm` = 'valid' (all classes with low pixels) | 'used'.
  8 device placement: everything is on device here (the reference's CPU queue is a speed
    artefact, not a behaviour).
  Further (issue 28), reference value first:
  - `ema_batch_stats` False: the teacher averages (and during warm-up copies) parameters
    only, its `batch_stats` stay those of the initial copy, as the reference's
    `teacher.parameters()` loop. True also averages `batch_stats` (needed with BatchNorm in
    the scratch heads, `head_norm='batch'`, which the reference does not have).
  - `ema_count_current` True: the EMA decay counts the update it follows (the reference
    reads the optimizer's step counter after its increment); False: the count before it.
  - `contrast_premix_labels` True: L_contra's "not in the image label" negatives use the
    image labels before ClassMix (reference); False: the mixed labels (union with the
    pasted classes).
The exported model (`export` = 'teacher' | 'student'): the reference validates, checkpoints
and infers with the EMA teacher after warm-up (§2.1; during warm-up the teacher equals the
student), so the CAM, sweep and pseudo stages use the teacher by default.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.methods import base
from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import classmix as classmix_ops
from wsss_jax.ops import image as image_ops
from wsss_jax.ops import csrm_losses as L
from wsss_jax.ops import memory
from wsss_jax.ops import resize
from wsss_jax.ops.contrastive import masked_categorical

UNLABELED = ("split", "duplicate")
TEACHER_PASS2 = ("train", "eval", "none")
CONTRAST_NORM = ("valid", "used")
EXPORT = ("teacher", "student")


def _check(cfg: Any) -> None:
  for key, allowed in (("unlabeled", UNLABELED), ("teacher_pass2", TEACHER_PASS2),
                       ("contrast_norm", CONTRAST_NORM), ("export", EXPORT)):
    if cfg[key] not in allowed:
      raise ValueError(f"config.csrm.{key}={cfg[key]!r}; expected one of {allowed}")
  for key in ("steps_per_epoch", "num_queries", "num_negatives", "bank_size_fg",
              "bank_size_bg"):
    if int(cfg[key]) <= 0:
      raise ValueError(f"config.csrm.{key} must be > 0, got {cfg[key]}")
  if cfg.head_norm == "batch" and not bool(cfg.ema_batch_stats):
    raise ValueError("config.csrm.head_norm='batch' needs config.csrm.ema_batch_stats=True: "
                     "otherwise the teacher keeps the heads' initial BatchNorm statistics")
  if not 1 <= int(cfg.low_rank) < int(cfg.high_rank):
    raise ValueError(f"config.csrm.low_rank/high_rank must satisfy 1 <= low < high, got "
                     f"{cfg.low_rank}, {cfg.high_rank}")


def _gather_rows(ctx: base.StepContext, local: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows `idx` (global indices, any shape) of a row-sharded [N_local, D] array.

  Under shard_map each device contributes the rows it owns and a psum assembles them, so
  the gradient reaches the owner; under jit it is a plain gather.
  """
  if ctx.axis_name is None:
    return local[idx]
  n = local.shape[0]
  rel = idx - jax.lax.axis_index(ctx.axis_name) * n
  mine = (rel >= 0) & (rel < n)
  rows = jnp.where(mine[..., None], local[jnp.clip(rel, 0, n - 1)], 0.0)
  return jax.lax.psum(rows, ctx.axis_name)


@dataclasses.dataclass(frozen=True)
class CSRMSettings:
  """`config.csrm` resolved for the pure functions below (see `default_csrm_config`), with
  the class count and the number of epochs of the schedule."""
  num_classes: int
  num_epochs: int
  unlabeled: str
  unlabeled_use_labels: bool
  steps_per_epoch: int
  warmup_epochs: int
  fg_threshold: float
  bg_threshold: float
  use_crf: bool
  crf_iters: int
  crf_gt_prob: float
  label_smoothing: float
  s2c_threshold: float
  classmix_prob: float
  w_c: float
  w_c2s: float
  w_s2c: float
  w_u: float
  w_contra: float
  low_rank: int
  high_rank: int
  positive_threshold: float
  negative_threshold: float
  temperature: float
  num_queries: int
  num_negatives: int
  bank_size_fg: int
  bank_size_bg: int
  rep_dim: int
  contrast_norm: str
  teacher_pass2: str
  ema_copy_inclusive: bool
  ema_max_decay: float
  ema_batch_stats: bool
  ema_count_current: bool
  contrast_premix_labels: bool
  align_corners: bool
  export: str


def csrm_settings(config: Any, num_classes: int) -> CSRMSettings:
  """Validates `config.csrm` and resolves it (`config.train.num_steps` gives the epochs)."""
  cfg = config.csrm
  _check(cfg)
  spe = int(cfg.steps_per_epoch)
  cast = {"int": int, "float": float, "bool": bool, "str": str}
  values = {f.name: cast[f.type](cfg[f.name]) for f in dataclasses.fields(CSRMSettings)
            if f.name not in ("num_classes", "num_epochs")}
  return CSRMSettings(num_classes=num_classes,
                      num_epochs=max(-(-int(config.train.num_steps) // spe), 1), **values)


def init_extra(s: CSRMSettings, rng: jax.Array, variables: Any) -> Any:
  """Teacher = a copy of the initial student; empty banks; the shared random key."""
  c = s.num_classes
  dim = int(s.rep_dim)
  item = jnp.zeros((dim,), jnp.float32)
  fg = jax.vmap(lambda _: memory.fifo_init(int(s.bank_size_fg), item))(jnp.arange(c - 1))
  return {"teacher": {"params": variables["params"],
                      "batch_stats": variables["batch_stats"]},
          "bank_bg": memory.fifo_init(int(s.bank_size_bg), item), "bank_fg": fg,
          "key": jax.random.key_data(rng)}


def loss(s: CSRMSettings, params: Any, batch_stats: Any, extra: Any,
         batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array,
         ctx: base.StepContext) -> tuple[jax.Array, base.LossAux]:
  """The CSRM loss of one step (steps 1-7 of the module docstring); see `base.Method`."""
  c, spe, num_epochs, warmup = (s.num_classes, s.steps_per_epoch, s.num_epochs,
                                s.warmup_epochs)
  ls, nq, nn_, ac = s.label_smoothing, s.num_queries, s.num_negatives, s.align_corners
  images, labels = batch["image"], batch["labels"].astype(jnp.float32)
  valid = batch.get("valid")  # crop padding (False) is never background (issue 29)
  if s.unlabeled == "duplicate":  # every image once as L and once as U, interleaved
    images = jnp.repeat(images, 2, axis=0)
    labels = jnp.repeat(labels, 2, axis=0)
    valid = None if valid is None else jnp.repeat(valid, 2, axis=0)
  nb = images.shape[0]
  if nb % 2:
    raise ValueError(f"config.data.batch_size: CSRM's L/U split needs an even batch per "
                     f"device, got {nb} (or use config.csrm.unlabeled='duplicate')")
  size = images.shape[1:3]
  # Row parity is the same for local and global indices (even per-device batches).
  is_u = (jnp.arange(nb) % 2) == 1
  sched = L.schedule(step, spe, num_epochs, warmup)
  key = jax.random.fold_in(jax.random.wrap_key_data(extra["key"]), step)
  k_mix, k_anchor, k_neg = jax.random.split(key, 3)
  k_drop_s, k_drop_t = jax.random.split(rng)
  teacher = jax.lax.stop_gradient(extra["teacher"])
  up = lambda x: resize.resize_bilinear(x, size, align_corners=ac)

  # 1-2. Teacher (eval) -> CAM pseudo masks.
  t1, _ = ctx.apply(teacher["params"], teacher["batch_stats"], images, train=False)
  rgb = image_ops.denormalize(images, as_uint8=False)
  y_cam = L.cam_pseudo_masks(t1["class_cams"], labels, rgb, float(s.fg_threshold),
                             float(s.bg_threshold), use_crf=bool(s.use_crf),
                             crf_iters=int(s.crf_iters), gt_prob=float(s.crf_gt_prob),
                             align_corners=ac)
  s_t = up(t1["seg_logits"])

  labels_premix = labels
  # 3. ClassMix on the global batch (shared key), then back to this device's rows.
  extras = {"s_t": s_t}
  if valid is not None:  # padding: no CAM label; ClassMix moves `valid` with the pixels
    y_cam = jnp.where(valid, y_cam, IGNORE_INDEX)
    extras["valid"] = valid
  if s.teacher_pass2 == "none":
    extras.update(s_t4=t1["seg_logits"], r_t=t1["rep"])
  g = ctx.all_gather_invariant((images, y_cam, labels, extras))
  g_img, g_y, g_lab, g_ext, paste = classmix_ops.classmix(
      k_mix, *g, num_classes=c, prob=float(s.classmix_prob))
  images, y_cam, labels, extras = jax.tree.map(lambda x: ctx.local_rows(x, nb),
                                               (g_img, g_y, g_lab, g_ext))
  s_t, valid = extras["s_t"], extras.get("valid")

  # 4. Label-masked teacher probabilities.
  mask_labels = labels if s.unlabeled_use_labels else jnp.where(
      is_u[:, None], 1.0, labels)
  p_t = L.label_masked_probs(s_t, mask_labels)
  yhat_t = jnp.argmax(p_t, axis=-1).astype(jnp.int32)
  if valid is not None:  # no teacher target (L_u, L_contra) on padding
    yhat_t = jnp.where(valid, yhat_t, IGNORE_INDEX)

  # 5. Student.
  s_out, new_bs = ctx.apply(params, batch_stats, images, train=True,
                            rngs={"dropout": k_drop_s})
  s_s = up(s_out["seg_logits"])

  # 6. Teacher second pass (train mode: dropout, batch statistics not kept).
  if s.teacher_pass2 == "none":
    s_t4, r_t = extras["s_t4"], extras["r_t"]
  else:
    t2, _ = ctx.apply(teacher["params"], teacher["batch_stats"], images,
                      train=s.teacher_pass2 == "train", rngs={"dropout": k_drop_t})
    s_t4, r_t = t2["seg_logits"], t2["rep"]
  s_t4, r_t = jax.lax.stop_gradient((s_t4, r_t))
  prob_t4 = jax.nn.softmax(s_t4, axis=-1)

  # 7a. L_c (all images, smoothed labels), L_c2s (L images), L_s2c (all images).
  l_c = jnp.mean(L.classification_loss(s_out["logits"], labels, ls))
  gmean = lambda sc: ctx.psum(sc[0]) / jnp.maximum(ctx.psum(sc[1]), 1.0)
  l_c2s = gmean(L.ce_sum_count(s_s, L.c2s_targets(y_cam, ~is_u), ls))
  z, y_s2c = L.s2c_logits_targets(s_s, s_out["class_cams"], p_t,
                                  float(s.s2c_threshold), ac)
  if valid is not None:
    y_s2c = jnp.where(valid, y_s2c, IGNORE_INDEX)
  l_s2c = gmean(L.ce_sum_count(z, y_s2c, ls))

  # 7b. L_u: U images, the keep_percent % lowest-entropy pixels of the global batch.
  ent_full = (L.entropy(jax.nn.softmax(up(s_t4), axis=-1))
              if s.teacher_pass2 != "none" else L.entropy(jax.nn.softmax(s_t, axis=-1)))
  g_yhat, g_ent, g_u = ctx.all_gather_invariant((yhat_t, ent_full, is_u))
  y_u, weight_u = L.unsup_targets(g_yhat, g_ent, g_u, sched.keep_percent)
  y_u = ctx.local_rows(y_u, nb)
  l_u = weight_u * gmean(L.ce_sum_count(s_s, y_u))

  # 7c. L_contra at stride 4 on the global batch.
  h4 = s_t4.shape[1:3]
  lab4 = jnp.where(is_u[:, None, None], yhat_t, y_cam)
  lab4 = resize.resize_nearest(lab4, h4, half_pixel=False)
  ent4 = L.entropy(prob_t4)
  # "Not in the image label" negatives: the labels before ClassMix (reference) or after.
  neg_labels = labels_premix if s.contrast_premix_labels else labels
  g_lab4, g_prob4, g_ent4, g_labels, g_rt = ctx.all_gather_invariant(
      (lab4, prob_t4, ent4, neg_labels, r_t))
  masks = L.contrast_masks(g_lab4, g_prob4, g_ent4, g_u, g_labels, sched.alpha_percent,
                           low_rank=int(s.low_rank), high_rank=int(s.high_rank),
                           positive_threshold=float(s.positive_threshold),
                           negative_threshold=float(s.negative_threshold),
                           unlabeled_use_labels=bool(s.unlabeled_use_labels))
  dim = g_rt.shape[-1]
  keys_flat = g_rt.reshape(-1, dim)
  proto_count = jnp.sum(masks.proto, axis=1)
  protos = (masks.proto.astype(jnp.float32) @ keys_flat) / jnp.maximum(
      proto_count, 1)[:, None]
  # Queues: enqueue this step's negatives (after warm-up), then sample from them (U²PL
  # samples after the enqueue).
  active = sched.active > 0

  def enqueue(bank, neg):
    # Only the newest Q masked keys can survive: move Q features, not all N.
    sel, ok = L.newest_masked(neg, memory.capacity(bank))
    return memory.fifo_enqueue(bank, keys_flat[sel], ok & active)

  bank_bg = enqueue(extra["bank_bg"], masks.negative[0])
  bank_fg = jax.vmap(enqueue)(extra["bank_fg"], masks.negative[1:])
  kb, kf = jax.random.split(k_neg)
  neg_bg, ok_bg = memory.fifo_sample(bank_bg, kb, nq * nn_)
  neg_fg, ok_fg = jax.vmap(lambda b, k: memory.fifo_sample(b, k, nq * nn_))(
      bank_fg, jax.random.split(kf, c - 1))
  negatives = jnp.concatenate([neg_bg[None], neg_fg], axis=0).reshape(c, nq, nn_, dim)
  neg_ok = jnp.concatenate([ok_bg[None], ok_fg])
  idx, anchor_ok = jax.vmap(lambda m, k: masked_categorical(k, m, nq))(
      masks.anchor, jax.random.split(k_anchor, c))
  r_s = s_out["rep"].reshape(-1, dim)
  anchors = _gather_rows(ctx, r_s, idx)
  class_valid = proto_count > 0
  used = class_valid & anchor_ok & neg_ok
  l_con = L.contrast_loss(anchors, anchor_ok, protos, class_valid, negatives, neg_ok,
                          float(s.temperature))
  if s.contrast_norm == "used":
    n_valid = jnp.sum(class_valid).astype(jnp.float32)
    l_con = l_con * n_valid / jnp.maximum(jnp.sum(used).astype(jnp.float32), 1.0)

  total = (s.w_c * l_c + s.w_c2s * l_c2s + s.w_s2c * sched.w_s2c * l_s2c
           + sched.active * (s.w_u * l_u + s.w_contra * l_con))
  labelled = (y_cam != IGNORE_INDEX)
  metrics = {
      "l_c": l_c, "l_c2s": l_c2s, "l_s2c": l_s2c, "l_u": l_u, "l_contra": l_con,
      "w_s2c": sched.w_s2c, "active": sched.active, "keep_percent": sched.keep_percent,
      "alpha_percent": sched.alpha_percent,
      "mixed": jnp.any(paste).astype(jnp.float32),
      "cam_labelled_fraction": jnp.mean(labelled.astype(jnp.float32)),
      "cam_fg_fraction": jnp.mean((labelled & (y_cam > 0)).astype(jnp.float32)),
      "u_kept_fraction": (jnp.sum(y_u != IGNORE_INDEX).astype(jnp.float32),
                          jnp.sum(jnp.broadcast_to(is_u[:, None, None], y_u.shape))
                          .astype(jnp.float32)),
      "contrast_valid_classes": jnp.sum(class_valid).astype(jnp.float32),
      "contrast_used_classes": jnp.sum(used).astype(jnp.float32),
      "bank_fill_fg": jnp.mean(bank_fg.count / int(s.bank_size_fg)),
      "bank_fill_bg": bank_bg.count / int(s.bank_size_bg),
  }
  aux = {"bank_bg": bank_bg, "bank_fg": bank_fg}
  return total, base.LossAux(metrics=metrics, batch_stats=new_bs, extra_aux=aux)


def update_extra(s: CSRMSettings, extra: Any, params: Any, batch_stats: Any, extra_aux: Any,
                 step: jax.Array, ctx: base.StepContext) -> Any:
  """EMA teacher (after the student's update) and the enqueued banks."""
  del ctx
  d = L.ema_decay(step, s.steps_per_epoch, s.warmup_epochs, s.ema_copy_inclusive,
                  s.ema_max_decay, count_current=s.ema_count_current)
  ema = lambda t, x: (d * t + (1.0 - d) * x).astype(t.dtype)
  old = extra["teacher"]
  teacher = {"params": jax.tree.map(ema, old["params"], params),
             "batch_stats": (jax.tree.map(ema, old["batch_stats"], batch_stats)
                             if s.ema_batch_stats else old["batch_stats"])}
  return {**extra, "teacher": teacher, "bank_bg": extra_aux["bank_bg"],
          "bank_fg": extra_aux["bank_fg"]}


def export_variables(s: CSRMSettings, params: Any, batch_stats: Any, extra: Any
                     ) -> dict[str, Any]:
  """The EMA teacher (`export='teacher'`, the reference) or the student."""
  if s.export == "teacher":
    return dict(extra["teacher"])
  return {"params": params, "batch_stats": batch_stats}


def make_csrm_method(config: Any, num_classes: int, *,
                     model: nn.Module | None = None) -> base.Method:
  """CSRM as a `Method` (reads `config.csrm`, `config.model`, `config.train.num_steps`)."""
  cfg = config.csrm
  s = csrm_settings(config, num_classes)
  load_pretrained = None
  if model is None:
    from wsss_jax import models  # pylint: disable=import-outside-toplevel
    from wsss_jax.models import csrm_net  # pylint: disable=import-outside-toplevel
    model = csrm_net.build_csrm_net(
        config.model, num_classes, cams_from=cfg.cams_from, rep_dim=int(cfg.rep_dim),
        norm=cfg.head_norm, head_width=int(cfg.head_width))
    if config.model.get("pretrained", False):
      load_pretrained = lambda variables: models.load_pretrained(config.model, variables)
  return base.Method(name="csrm", model=model, loss=functools.partial(loss, s),
                     init_extra=functools.partial(init_extra, s),
                     update_extra=functools.partial(update_extra, s),
                     load_pretrained=load_pretrained,
                     export_variables=functools.partial(export_variables, s))


def default_csrm_config() -> dict[str, Any]:
  """`config.csrm` defaults: the reference VOC values (METHODS.md §2.3, §2.4)."""
  return dict(
      unlabeled="split",          # split: even rows L, odd rows U | duplicate: each twice
      unlabeled_use_labels=True,  # §2.8.4 (reference: True)
      steps_per_epoch=46, warmup_epochs=1,
      fg_threshold=0.30, bg_threshold=0.05, use_crf=True, crf_iters=10, crf_gt_prob=0.7,
      label_smoothing=0.1, s2c_threshold=0.5, classmix_prob=0.5,
      w_c=1.0, w_c2s=1.0, w_s2c=1.0, w_u=1.0, w_contra=1.0,
      low_rank=3, high_rank=6, positive_threshold=0.3, negative_threshold=1.0,
      temperature=0.5, num_queries=256, num_negatives=50,
      bank_size_fg=30000, bank_size_bg=50000, rep_dim=256,
      head_norm="group",          # scratch heads: GroupNorm(4) (reference use_gn)
      head_width=256,             # decoder / rep-head channels (reference 256)
      contrast_norm="valid",      # §2.8.5 (reference: 'valid')
      teacher_pass2="train",      # §2.8.2 (reference: 'train')
      ema_copy_inclusive=True,    # §2.8.3 (reference: True)
      ema_max_decay=0.99,
      ema_batch_stats=False,      # reference: EMA of the parameters only (see above)
      ema_count_current=True,     # reference: decay counts the update it follows
      contrast_premix_labels=True,  # reference: L_contra negatives from pre-ClassMix labels
      align_corners=True,         # CSRM/PNOC resize CAMs and logits with align_corners
      cams_from="class",          # pipeline CAMs: 'class' (reference) | 'seg'
      export="teacher",           # variables of the later stages: 'teacher' (reference)
  )
