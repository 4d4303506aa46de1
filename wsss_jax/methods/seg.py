"""Segmentation training on (pseudo-)labels: DeepLabV3+ with pixel cross-entropy.

The one segmentation stage for all methods (DESIGN.md "Decisions"). Loss: softmax
cross-entropy of the stride-4 logits upsampled (bilinear, half-pixel) to the crop size,
averaged over pixels whose label is not 255, with optional label smoothing.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.methods import base
from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import resize
from wsss_jax.ops.losses import pixel_cross_entropy

# config.seg.decoder -> models.build_model kind.
DECODERS = {"deeplabv3plus": "deeplab", "light": "light_seg"}


def make_seg_method(config: Any, num_classes: int, *,
                    model: nn.Module | None = None) -> base.Method:
  """The segmentation model (`config.model`, decoder `config.seg.decoder`: DeepLabV3+ or
  the light decoder) trained with `pixel_cross_entropy`."""
  load_pretrained = None
  if model is None:
    from wsss_jax import models
    decoder = config.seg.get("decoder", "deeplabv3plus")
    if decoder not in DECODERS:
      raise ValueError(f"config.seg.decoder={decoder!r}; expected one of {list(DECODERS)}")
    model = models.build_model(config.model, num_classes, kind=DECODERS[decoder])
    if config.model.get("pretrained", False):
      load_pretrained = lambda variables: models.load_pretrained(config.model, variables)
  smoothing = float(config.seg.get("label_smoothing", 0.0))

  def loss(params, batch_stats, extra, batch, rng, step, ctx: base.StepContext):
    del extra, step
    out, new_bs = ctx.apply(params, batch_stats, batch["image"], rngs={"dropout": rng})
    size = batch["mask"].shape[1:3]
    logits = resize.resize_bilinear(out["seg_logits"], size)
    total, count = pixel_cross_entropy(logits, batch["mask"], smoothing)
    # Global mean over labelled pixels: sums cross devices under shard_map, so both step
    # implementations give the same value even with unequal per-device counts.
    value = ctx.psum(total) / jnp.maximum(ctx.psum(count), 1.0)
    pred = jnp.argmax(logits, axis=-1)
    valid = batch["mask"] != IGNORE_INDEX
    correct = jnp.sum((pred == batch["mask"]) & valid).astype(jnp.float32)
    metrics = {"pixel_accuracy": (correct, count),
               "labelled_fraction": jnp.mean(valid.astype(jnp.float32))}
    return value, base.LossAux(metrics=metrics, batch_stats=new_bs, extra_aux=None)

  return base.Method(name="seg", model=model, loss=loss, load_pretrained=load_pretrained)
