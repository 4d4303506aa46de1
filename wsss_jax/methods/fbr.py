"""FBR: fine-grained background representation, a plug-in on the CAM baseline (§3).

Per train step (METHODS.md §3.2; the paper's semantics unless `code_compat`):

1. The CAM baseline loss (multi-label soft margin) on `logits` (GAP or TAP pooling).
2. Seeds (detached): M = label-masked, max-normalised ReLU(CAMs); Y^ = argmax class where
   max M > `seed_bg_threshold` (0.10 as in the released code), else background.
3. FG prototypes p_c (Eq. 3): CAM-weighted mean of the top-K pixels of M_c over the global
   batch, K = h*w // `proto_topk_div` (the code's hw/16), on detached Z_fg; optionally an
   EMA across steps (`proto_ema`, 0 = off = the paper).
4. Queries (Eq. 4): pixels with Y^ = c and M_c < 0.4, for classes c present in the batch
   (`query_rule='threshold'`).
5. NROIs: per-image k-means (K = 8, k-means++ seeding, `kmeans_iters` Lloyd iterations) on
   the background pixels (Y^ = 0) of detached Z_bg, gathered over devices and pushed into a
   FIFO bank (50k); empty clusters are not pushed, so an image with fewer than 8 background
   pixels pushes its pixels themselves. Each NROI is stored with the step that pushed it,
   so the step logs the bank's fill and the mean age of the NROIs it draws.
6. L_FB (Eq. 7): InfoNCE of each query against its prototype (positive) and 256 NROIs drawn
   uniformly from the bank (after this step's push), cosine / tau_FB.
7. Active sampling (Eq. 8) + L_IF (Eq. 9): per query, 256 negatives: a class c' ~ softmax
   over the other present classes of cos(p_c, p_c') / 0.5, then a uniform pixel with Y^ = c'
   in the global batch (detached features); cosine / tau_IF.
8. L_seg (Eq. 6): BCE of the BG predictor against [sum_c M_c < 0.05].

Both contrastive losses are means over classes of the mean over that class's queries
(numerators and counts summed over devices). Positives and negatives are detached (as in
the released code and ReCo); gradients reach the queries, i.e. Z_fg and the backbone.

`code_compat=True` reproduces the released PPC-variant code (METHODS.md §3.3, §3.7): L_FB
anchors are detached (no gradient), lambda_FB / lambda_IF = 0.01 / 0.1, tau_FB = tau_IF = 0.5,
lambda_seg = 0.1, the cosine decorrelation L_sim (weight 0.1) between Z_fg and the BG
branch's BN -> ReLU activation (`proj_bg_bn`, as the released code), and the
percentile/entropy "unsure" queries (`query_rule='unsure'`, rate 0.1: not in the top
40 % of their class's CAM values in the image and above the image's 10 % entropy quantile).
Not reproduced: the wrong-axis cosine of L_FB (with detached anchors it has no gradient, so
it would only change the logged value), PPC/EPS/SEAM's own losses and the second view.

Randomness (k-means++ seeds, bank draws, negative draws) comes from a key that depends only
on `config.seed` and the step, drawn for the global batch and sliced per device, so the
shard_map step equals the jit step (with `fbr.bg_dropout = 0`; dropout uses the per-device
step key).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.methods import base
from wsss_jax.methods import cam
from wsss_jax.ops import losses
from wsss_jax.ops import fbr_losses as F
from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import memory
from wsss_jax.ops import resize
from wsss_jax.ops import prototypes as proto_ops
from wsss_jax.ops.norms import l2_normalize

# Loss weights and temperatures: the paper's (Eq. 10, §IV-A) and the released code's.
PAPER = dict(lambda_fb=0.1, lambda_if=0.01, lambda_seg=0.01, lambda_sim=0.0, tau_fb=0.5,
             tau_if=0.1)
CODE = dict(lambda_fb=0.01, lambda_if=0.1, lambda_seg=0.1, lambda_sim=0.1, tau_fb=0.5,
            tau_if=0.5)


@dataclasses.dataclass(frozen=True)
class FBRSettings:
  """Resolved `config.fbr` (see `fbr_config` for the meaning of each field)."""
  code_compat: bool = False
  proj_dim: int = 128
  num_clusters: int = 8
  kmeans_iters: int = 10
  bank_size: int = 50000
  bank_frac: float = 0.0
  num_bank_negatives: int = 256
  num_fg_negatives: int = 256
  query_threshold: float = 0.4
  query_rule: str = "threshold"
  seed_bg_threshold: float = 0.1
  bg_label_threshold: float = 0.05
  proto_topk_div: int = 16
  proto_ema: float = 0.0
  active_temperature: float = 0.5
  bg_dropout: float = 0.5
  lambda_fb: float = PAPER["lambda_fb"]
  lambda_if: float = PAPER["lambda_if"]
  lambda_seg: float = PAPER["lambda_seg"]
  lambda_sim: float = PAPER["lambda_sim"]
  tau_fb: float = PAPER["tau_fb"]
  tau_if: float = PAPER["tau_if"]


def fbr_config() -> dict[str, Any]:
  """Defaults of the `config.fbr` block (configs put it in a ConfigDict).

  Weights / temperatures < 0 mean "the mode's default" (PAPER, or CODE with code_compat).
  """
  return dict(
      code_compat=False,        # True: the released code's behaviour (module docstring)
      proj_dim=128,             # D of the FG and BG projections
      num_clusters=8,           # NROIs per image (k-means K)
      kmeans_iters=10,          # Lloyd iterations after k-means++ seeding
      bank_size=50000,          # FIFO NROI bank capacity (VOC; COCO 200k)
      bank_frac=0.0,            # > 0: capacity = this share of the training's NROIs
                                # (`bank_size_for_schedule`), overriding bank_size
      num_bank_negatives=256,   # NROIs drawn from the bank per step (shared by queries)
      num_fg_negatives=256,     # active FG negatives per query
      query_threshold=0.4,      # tau_q: queries are pixels of c with M_c < this
      query_rule="",            # threshold (paper, M_c < tau_q) | unsure (code); '' = mode's
      seed_bg_threshold=0.1,    # constant background score of the seed Y^
      bg_label_threshold=0.05,  # BG pseudo-label: sum_c M_c < this
      proto_topk_div=16,        # prototype top-K = h*w // this (pixels over the batch)
      proto_ema=0.0,            # EMA momentum of class prototypes across steps; 0 = off
      active_temperature=0.5,   # softmax temperature of the prototype graph (Eq. 8)
      bg_dropout=0.5,           # dropout of the BG predictor
      lambda_fb=-1.0, lambda_if=-1.0, lambda_seg=-1.0, lambda_sim=-1.0,
      tau_fb=-1.0, tau_if=-1.0)


# The paper's bank relative to its schedule: 50k NROIs = 8 NROIs x batch 8 x ~781 steps of
# 20,000 on VOC (METHODS.md §3.4), i.e. the bank holds about 3.9 % of the training's NROIs.
PAPER_BANK_FRAC = 50000 / (8 * 8 * 20000)


def bank_size_for_schedule(num_steps: int, batch_size: int, num_clusters: int,
                           frac: float = PAPER_BANK_FRAC) -> int:
  """Bank capacity holding `frac` of the NROIs a training pushes at most.

  Args:
    num_steps: train steps of the method.
    batch_size: global batch size (images per step).
    num_clusters: NROIs per image (k-means K).
    frac: share of all pushed NROIs the bank holds (the paper's ~3.9 % by default).

  Returns:
    max(num_clusters * batch_size, round(frac * num_steps * batch_size * num_clusters)):
    at least one step's NROIs, so a step never overwrites its own push.
  """
  per_step = int(batch_size) * int(num_clusters)
  return max(per_step, int(round(float(frac) * int(num_steps) * per_step)))


def settings_from_config(config: Any) -> FBRSettings:
  """Resolves and validates `config.fbr` (missing keys take `fbr_config` defaults).

  With `fbr.bank_frac > 0` the bank size comes from `config.train.num_steps` and
  `config.data.batch_size` (`bank_size_for_schedule`), so it follows command-line
  overrides of the schedule.

  Raises:
    ValueError: naming the offending `fbr.<key>`.
  """
  raw = dict(fbr_config())
  given = config.get("fbr", None) if hasattr(config, "get") else None
  for k, v in dict(given or {}).items():
    if k not in raw:
      raise ValueError(f"Unknown config key fbr.{k}; accepted: {sorted(raw)}")
    raw[k] = v
  mode = CODE if raw["code_compat"] else PAPER
  raw["query_rule"] = raw["query_rule"] or ("unsure" if raw["code_compat"] else "threshold")
  if raw["query_rule"] not in ("threshold", "unsure"):
    raise ValueError(f"fbr.query_rule must be 'threshold' or 'unsure', got "
                     f"{raw['query_rule']!r}")
  for k, default in mode.items():
    if float(raw[k]) < 0:
      raw[k] = default
  for k in ("proj_dim", "num_clusters", "kmeans_iters", "bank_size", "num_bank_negatives",
            "num_fg_negatives", "proto_topk_div"):
    if int(raw[k]) < 1:
      raise ValueError(f"fbr.{k} must be >= 1, got {raw[k]}")
  for k in ("tau_fb", "tau_if", "active_temperature"):
    if float(raw[k]) <= 0:
      raise ValueError(f"fbr.{k} must be > 0, got {raw[k]}")
  if not 0.0 <= float(raw["proto_ema"]) < 1.0:
    raise ValueError(f"fbr.proto_ema must be in [0, 1), got {raw['proto_ema']}")
  if not 0.0 <= float(raw["bg_dropout"]) < 1.0:
    raise ValueError(f"fbr.bg_dropout must be in [0, 1), got {raw['bg_dropout']}")
  if float(raw["bank_frac"]) < 0:
    raise ValueError(f"fbr.bank_frac must be >= 0, got {raw['bank_frac']}")
  if float(raw["bank_frac"]) > 0:
    raw["bank_size"] = bank_size_for_schedule(
        int(config.train.num_steps), int(config.data.batch_size), int(raw["num_clusters"]),
        float(raw["bank_frac"]))
  types = {f.name: f.type for f in dataclasses.fields(FBRSettings)}
  cast = {"bool": bool, "int": int, "float": float, "str": str}
  return FBRSettings(**{k: cast[types[k]](v) for k, v in raw.items()})


def init_bank(s: FBRSettings) -> memory.FifoBank:
  """The empty NROI bank: items {'feat' [Q, D] float32, 'step' [Q] int32 (push step)}."""
  return memory.fifo_init(s.bank_size, {"feat": jnp.zeros((s.proj_dim,), jnp.float32),
                                        "step": jnp.zeros((), jnp.int32)})


def bank_draw_stats(bank: memory.FifoBank, drawn_steps: jax.Array, ok: jax.Array,
                    step: jax.Array) -> dict[str, jax.Array]:
  """Turnover metrics of the bank: fill (count / Q) and the mean age in steps
  (`step` - push step) of the drawn NROIs (0 when the bank is empty)."""
  age = jnp.mean((step - drawn_steps).astype(jnp.float32))
  return {"fbr/bank_fill": bank.count.astype(jnp.float32) / memory.capacity(bank),
          "fbr/bank_age": jnp.where(ok, age, 0.0)}


def fbr_terms(s: FBRSettings, out: dict[str, jax.Array], labels: jax.Array, extra: Any,
              key: jax.Array, ctx: base.StepContext, step: jax.Array | int = 0,
              valid: jax.Array | None = None, gt: jax.Array | None = None
              ) -> tuple[dict, dict, dict]:
  """The FBR losses of one step from the model outputs.

  Args:
    s: settings.
    out: model outputs (`cams`, `proj_fg`, `proj_bg`, `bg_logit`; `proj_bg_bn` when
      lambda_sim > 0), this device's batch.
    labels: [B, K] multi-hot.
    extra: `{'bank': FifoBank, 'protos': [K, D], 'proto_valid': [K]}`.
    key: a PRNG key identical on every device.
    ctx: step context (collectives).
    step: the train step (stamps the pushed NROIs; their age at draw time is logged).
    valid: [B, h, w] bool, feature pixels on the image (False on crop padding) or None
      (all). Padding is never a seed of any class (so never background: no NROI, no BG
      positive), never a query, prototype pixel or negative, and leaves L_seg and L_sim.
    gt: [B, h, w] int ground-truth labels (255 = unknown) or None; only for the
      diagnostics `fbr/query_gt_bg` (share of queries that are ground-truth background)
      and `fbr/bg_seed_gt_bg` (share of background seeds that are).

  Returns:
    (losses {fb, if, seg, sim} float32 scalars (global values), metrics, new extra).
  """
  b, h, w, k = out["cams"].shape
  n, hw = b * h * w, h * w
  ok_px = (jnp.ones((n,), bool) if valid is None else valid.reshape(n).astype(bool))
  # M = 0 on padding: no class there, no prototype weight, no query.
  m = jax.lax.stop_gradient(F.seed_cams(out["cams"], labels)).reshape(n, k)
  m = m * ok_px[:, None].astype(m.dtype)
  # Padding gets label -1 (neither background nor a class): pool, NROIs and queries skip it.
  seeds = jnp.where(ok_px, F.seed_labels(m, s.seed_bg_threshold), -1)     # [n]
  z_fg = out["proj_fg"].reshape(n, -1)
  d = z_fg.shape[-1]
  q = l2_normalize(z_fg)                                              # anchors (grad)
  z_bg = jax.lax.stop_gradient(out["proj_bg"]).reshape(b, hw, d)

  k_km, k_bank, k_uc, k_up = jax.random.split(key, 4)
  g = ctx.all_gather_invariant({"z": jax.lax.stop_gradient(z_fg), "m": m, "seeds": seeds,
                                "z_bg": z_bg})
  n_global = g["seeds"].shape[0]
  b_global = n_global // hw
  # NROIs of every image of the global batch. Each device clusters the whole gathered
  # batch (< 1 GFLOP even for 16 VOC crops of 32x32 features) rather than its own images: the result is then identical on every
  # device (as the replicated bank needs) without a second gather, and the k-means loops
  # only see device-invariant values under shard_map's check_vma.
  centers, c_valid = F.extract_nrois(g["z_bg"], (g["seeds"] == 0).reshape(b_global, hw),
                                     jax.random.split(k_km, b_global),
                                     num_clusters=s.num_clusters,
                                     num_iters=s.kmeans_iters)

  # Prototypes (Eq. 3) over the global batch, optionally EMA-smoothed across steps.
  protos, p_valid = proto_ops.topk_weighted_prototypes(g["z"], g["m"],
                                                       max(1, hw // s.proto_topk_div))
  if s.proto_ema > 0:
    protos, p_valid = proto_ops.prototype_ema(extra["protos"], extra["proto_valid"],
                                              protos, p_valid, s.proto_ema)
  pool_cls = jnp.maximum(g["seeds"] - 1, -1)                 # -1 = background / padding
  has_pixels = jnp.sum(jax.nn.one_hot(pool_cls, k, dtype=jnp.int32), axis=0) > 0
  c_ok = p_valid & has_pixels
  p = l2_normalize(protos)
  qc = jnp.maximum(seeds - 1, 0)
  seeds0 = jnp.maximum(seeds, 0)  # the query rules' 0..K labels (padding has M = 0 anyway)
  if s.query_rule == "unsure":
    is_q = F.unsure_query_mask(m.reshape(b, hw, k), seeds0.reshape(b, hw),
                               bg_score=s.seed_bg_threshold).reshape(n)
  else:
    is_q = F.query_mask(m, seeds0, s.query_threshold)
  is_q = is_q & c_ok[qc] & ok_px

  # L_FB (Eq. 7) against NROIs of the bank after this step's push.
  step = jnp.asarray(step, jnp.int32)
  bank = memory.fifo_enqueue(
      extra["bank"], {"feat": centers.reshape(-1, d),
                      "step": jnp.full(c_valid.size, step, jnp.int32)}, c_valid.reshape(-1))
  drawn, ok = memory.fifo_sample(bank, k_bank, s.num_bank_negatives)
  negs = drawn["feat"]
  a_fb = jax.lax.stop_gradient(q) if s.code_compat else q
  pos_fb = jnp.sum(a_fb * p[qc], axis=-1) / s.tau_fb
  neg_fb = a_fb @ l2_normalize(negs).T / s.tau_fb
  l_fb = F.info_nce_from_logits(pos_fb, neg_fb, jnp.broadcast_to(ok, (s.num_bank_negatives,)))
  fb_sum, fb_cnt = ctx.psum(F.class_sums(l_fb, qc, is_q, k))

  # Active sampling (Eq. 8) + L_IF (Eq. 9) against detached pixels of the global batch.
  probs = F.active_class_probs(p, c_ok, s.active_temperature)
  shape = (n_global, s.num_fg_negatives)
  u_c = ctx.local_rows(jax.random.uniform(k_uc, shape), n)
  u_p = ctx.local_rows(jax.random.uniform(k_up, shape), n)
  idx, _, ok_if = F.sample_active_negatives(probs[qc], pool_cls, u_c, u_p)
  # One [n, n_global] similarity matrix instead of gathering [n, M, D] negatives (39 MB for
  # 16 MSRC crops of 14x14; 1 GB for 16 VOC crops of 32x32 under jit).
  sim = q @ l2_normalize(g["z"]).T
  neg_if = jnp.take_along_axis(sim, idx, axis=1) / s.tau_if
  pos_if = jnp.sum(q * p[qc], axis=-1) / s.tau_if
  l_if = F.info_nce_from_logits(pos_if, neg_if, ok_if)
  if_sum, if_cnt = ctx.psum(F.class_sums(l_if, qc, is_q & jnp.any(ok_if, axis=-1), k))

  # Global means over the valid pixels (sums across devices, as the contrastive terms).
  global_mean = lambda sc: (lambda t, c: t / jnp.maximum(c, 1.0))(*ctx.psum(sc))
  seg_sc = F.bg_seg_sums(out["bg_logit"].reshape(n), F.bg_seg_targets(
      m, s.bg_label_threshold), ok_px)
  losses = {"fb": F.mean_of_class_means(fb_sum, fb_cnt),
            "if": F.mean_of_class_means(if_sum, if_cnt),
            "seg": global_mean(seg_sc),
            "sim": (global_mean(F.decorrelation_sums(
                out["proj_fg"].reshape(n, d), out["proj_bg_bn"].reshape(n, d), ok_px))
                    if s.lambda_sim > 0 else jnp.zeros((), jnp.float32))}
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))
  n_ok = f32(ok_px)
  metrics = {"fbr/query_frac": (f32(is_q), n_ok),
             "fbr/bg_frac": (f32(seeds == 0), n_ok),
             "fbr/nrois_per_image": f32(c_valid) / b_global,
             "fbr/classes": jnp.sum(c_ok.astype(jnp.float32)),
             **bank_draw_stats(bank, drawn["step"], ok, step)}
  if gt is not None:  # Diagnostics only: labels never enter a loss.
    gt = gt.reshape(n)
    known = gt != IGNORE_INDEX
    metrics["fbr/query_gt_bg"] = (f32(is_q & (gt == 0)), f32(is_q & known))
    metrics["fbr/bg_seed_gt_bg"] = (f32((seeds == 0) & (gt == 0)), f32((seeds == 0) & known))
  new_extra = {"bank": bank, "protos": protos, "proto_valid": p_valid}
  return losses, metrics, new_extra


def make_fbr_method(config: Any, num_classes: int, *,
                    model: nn.Module | None = None) -> base.Method:
  """FBR on the CAM baseline as a `Method` (module docstring).

  Args:
    config: full config: `config.model` (backbone, pool 'gap'|'tap', norm, ...),
      `config.fbr` (`fbr_config`), `config.seed`.
    num_classes: C, background included.
    model: override (tests); must return `logits`, `cams`, `proj_fg`, `proj_bg`,
      `bg_logit` (and `proj_bg_bn` with L_sim on). Default: `models.fbr_net.FBRNet` on `build_backbone(config.model)`.

  Returns:
    The Method; extra state = NROI bank + running prototypes.
  """
  s = settings_from_config(config)
  load_pretrained = None
  if model is None:
    from wsss_jax import models  # Local import, as methods/cam.py.
    from wsss_jax.models import fbr_net, registry
    mc = config.model
    model = fbr_net.FBRNet(registry.build_backbone(mc), num_classes,
                           pool=mc.get("pool", "gap"),
                           tap_threshold=float(mc.get("tap_threshold", 0.1)),
                           proj_dim=s.proj_dim, norm=mc.get("norm", "batch"),
                           bg_dropout=s.bg_dropout, dtype=registry.compute_dtype(mc))
    if mc.get("pretrained", False):
      load_pretrained = lambda variables: models.load_pretrained(mc, variables)
  k = num_classes - 1
  seed_key = jax.random.fold_in(jax.random.key(int(config.get("seed", 0))), 0xFB2)

  def init_extra(rng, variables):
    del rng, variables
    return {"bank": init_bank(s),
            "protos": jnp.zeros((k, s.proj_dim), jnp.float32),
            "proto_valid": jnp.zeros((k,), bool)}

  def loss(params, batch_stats, extra, batch, rng, step, ctx: base.StepContext):
    kw = {"rngs": {"dropout": rng}} if s.bg_dropout > 0 else {}
    out, new_bs = ctx.apply(params, batch_stats, batch["image"], **kw)
    logits, labels = out["logits"], batch["labels"]
    l_cls = jnp.mean(losses.multilabel_soft_margin_loss(logits, labels))
    size = out["cams"].shape[1:3]
    # A feature pixel is on the image when the crop pixel at its centre is (half-pixel
    # nearest); batches without `valid` (tests, benchmarks) have no padding.
    valid = (resize.resize_nearest(batch["valid"], size) if "valid" in batch else None)
    gt = resize.resize_nearest(batch["mask"], size) if "mask" in batch else None
    terms, fbr_metrics, new_extra = fbr_terms(s, out, labels, extra,
                                              jax.random.fold_in(seed_key, step), ctx,
                                              step=step, valid=valid, gt=gt)
    value = (l_cls + s.lambda_fb * terms["fb"] + s.lambda_if * terms["if"]
             + s.lambda_seg * terms["seg"] + s.lambda_sim * terms["sim"])
    metrics = {**cam.cam_metrics(logits, labels), **fbr_metrics, "loss_cls": l_cls,
               **{f"loss_{name}": v for name, v in terms.items()}}
    return value, base.LossAux(metrics=metrics, batch_stats=new_bs, extra_aux=new_extra)

  def update_extra(extra, params, batch_stats, extra_aux, step, ctx):
    del extra, params, batch_stats, step, ctx
    return extra_aux

  return base.Method(name="fbr", model=model, loss=loss, init_extra=init_extra,
                     update_extra=update_extra, load_pretrained=load_pretrained)
