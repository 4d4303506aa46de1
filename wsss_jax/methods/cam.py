"""CAM baseline (METHODS.md §1.1 S1): a multi-label classifier whose class maps are CAMs.

Loss: PyTorch's `MultiLabelSoftMarginLoss`, i.e. for logits z [B, K] and multi-hot
labels y [B, K] (K = C-1 foreground classes)

  loss_b = -(1/K) sum_k [ y_bk log s(z_bk) + (1 - y_bk) log(1 - s(z_bk)) ],  s = sigmoid,

averaged over the batch. `logits` are the pooled class maps the model returns.

Images without any foreground label (CONVENTIONS.md; MSRC has 45 in train): they are legal
and, by default, train as all-negative examples (every class pushed towards "absent"),
which is what the loss above does with y = 0. The reference repos skip them instead
(METHODS.md §1.4, `ignore_bg_images`); `ignore_bg_images=True` reproduces that by giving
them zero weight (the loss is then the mean over the images that have a foreground label;
0 when none has).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.methods import base
from wsss_jax.ops.losses import multilabel_soft_margin_loss


def cam_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, Any]:
  """Classification metrics at the 0-logit (p = 0.5) threshold.

  Returns scalars (batch means) and `(num, den)` pairs (ratios summed over the batch), so
  they reduce exactly across devices (see `base.reduce_metrics`).
  """
  y = labels.astype(jnp.float32) > 0.5
  pred = logits.astype(jnp.float32) > 0.0
  tp = jnp.sum(pred & y).astype(jnp.float32)
  fp = jnp.sum(pred & ~y).astype(jnp.float32)
  fn = jnp.sum(~pred & y).astype(jnp.float32)
  exact = jnp.all(pred == y, axis=-1).astype(jnp.float32)
  return {
      "accuracy": jnp.mean((pred == y).astype(jnp.float32)),  # per-label accuracy
      "exact_match": jnp.mean(exact),
      "precision": (tp, tp + fp),
      "recall": (tp, tp + fn),
      "no_fg_fraction": jnp.mean((~jnp.any(y, axis=-1)).astype(jnp.float32)),
  }


def make_cam_method(config: Any, num_classes: int, *, model: nn.Module | None = None,
                    ignore_bg_images: bool | None = None) -> base.Method:
  """The CAM baseline as a `Method`.

  Args:
    config: the full config (`config.model` builds the model; optional
      `config.cam_train.ignore_bg_images`).
    num_classes: C, background included; the model predicts C-1 foreground logits.
    model: override the model (tests); default
      `wsss_jax.models.build_model(config.model, num_classes, kind='cam')`.
    ignore_bg_images: skip images without a foreground label (default: train them as
      all-negative; see the module docstring).

  Returns:
    The Method (no extra state).
  """
  load_pretrained = None
  if model is None:
    from wsss_jax import models  # Local import: models/ is optional for tests.
    model = models.build_model(config.model, num_classes, kind="cam")
    if config.model.get("pretrained", False):
      load = getattr(models, "load_pretrained", None)
      if load is not None:
        load_pretrained = lambda variables: load(config.model, variables)
  if ignore_bg_images is None:
    ignore_bg_images = bool(config.get("cam_train", {}).get("ignore_bg_images", False))

  def loss(params, batch_stats, extra, batch, rng, step, ctx: base.StepContext):
    del extra, rng, step
    out, new_bs = ctx.apply(params, batch_stats, batch["image"])
    logits, labels = out["logits"], batch["labels"]
    per_image = multilabel_soft_margin_loss(logits, labels)
    if ignore_bg_images:
      w = jnp.any(labels > 0.5, axis=-1).astype(jnp.float32)
      # Global weighted mean: numerator and count are summed across devices so the
      # shard_map step equals the jit step even when devices hold unequal counts (the
      # value is then the same on every device and the step's pmean leaves it unchanged).
      num, den = ctx.psum(jnp.sum(w * per_image)), ctx.psum(jnp.sum(w))
      value = num / jnp.maximum(den, 1.0)
    else:
      value = jnp.mean(per_image)
    metrics = cam_metrics(logits, labels)
    return value, base.LossAux(metrics=metrics, batch_stats=new_bs, extra_aux=None)

  return base.Method(name="cam", model=model, loss=loss, load_pretrained=load_pretrained)
