"""Heads on top of a backbone: CAM classifier, DeepLabV3+ decoder, projection head.

Heads train from scratch; their norm layers are `norm='batch'` (BatchNorm, batch statistics
while training) or `norm='group'` (GroupNorm with `num_groups` groups, 4 in CSRM), see
METHODS.md §1.4 and §2.1. Every head returns float32 outputs whatever its compute dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.batch_norm import BatchNorm
from wsss_jax.models.lowering import conv_general_dilated_fn

_HEAD_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # Kaiming (ReLU).


def backbone_pointwise_impl(backbone: nn.Module) -> str:
  """The backbone's `pointwise_impl` ('auto' for backbones without one), so that a CAM head
  lowers its 1x1 conv as the backbone does (`model.pointwise_impl`)."""
  return getattr(backbone, "pointwise_impl", "auto")


def tap_pool(features: jax.Array, threshold: float = 0.1) -> jax.Array:
  """Thresholded average pooling (TAP; FBR/PPC, METHODS.md §3.1).

  Per image and channel l, with f >= 0 (post-ReLU features):
    t_l = threshold * max_{h,w} f[h, w, l]
    tap_l = sum_{h,w} f[h, w, l] * [f > t_l] / max(1, sum_{h,w} [f > t_l])
  i.e. the mean over the above-threshold positions only. Gradients flow through the
  selected values (the selection itself is piecewise constant).

  Args:
    features: [B, h, w, L].
    threshold: fraction of the per-channel maximum.

  Returns:
    [B, L] float32.
  """
  f = features.astype(jnp.float32)
  t = threshold * jnp.max(f, axis=(1, 2), keepdims=True)
  keep = (f > jax.lax.stop_gradient(t)).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(keep, axis=(1, 2)), 1.0)
  return jnp.sum(f * keep, axis=(1, 2)) / count


class Norm(nn.Module):
  """BatchNorm or GroupNorm, chosen by name."""
  kind: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == "batch":
      return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name="bn")(x)
    if self.kind == "group":
      return nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=self.dtype,
                          name="gn")(x)
    raise ValueError(f"norm must be 'batch' or 'group', got {self.kind!r}")


class ConvNormReLU(nn.Module):
  features: int
  kernel: int = 1
  dilation: int = 1
  norm: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = self.dilation * (self.kernel - 1) // 2
    x = nn.Conv(self.features, (self.kernel,) * 2, padding=((pad, pad), (pad, pad)),
                kernel_dilation=(self.dilation,) * 2, use_bias=False, dtype=self.dtype,
                kernel_init=_HEAD_INIT, name="conv")(x)
    return nn.relu(Norm(self.norm, self.num_groups, self.dtype, name="norm")(x, train))


class CAMHead(nn.Module):
  """1x1 conv (no bias) to the foreground classes, pooled to image logits.

  Attributes:
    num_fg: C-1 foreground classes.
    pool: 'gap' (mean of the class maps) or 'tap' (class weights applied to `tap_pool`
      of the features; the CAMs themselves stay un-thresholded).
    tap_threshold: TAP threshold (fraction of the channel max).
    pointwise_impl: the classifier as 'dot', 'conv' or 'auto' (`models/lowering.py`;
      `backbone_pointwise_impl` gives the backbone's).

  Call: features [B, h, w, L] -> {'logits': [B, C-1], 'cams': [B, h, w, C-1]} (float32;
  `cams` are the raw class maps before ReLU).
  """
  num_fg: int
  pool: str = "gap"
  tap_threshold: float = 0.1
  dtype: Any = jnp.float32
  pointwise_impl: str = "auto"

  @nn.compact
  def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
    # As a matmul on CPU: XLA:CPU's weight gradient of this 1x1 conv over the 1280/2048
    # backbone channels transposed the features first (models/lowering.py).
    conv = nn.Conv(self.num_fg, (1, 1), use_bias=False, dtype=self.dtype,
                   kernel_init=nn.initializers.xavier_uniform(), name="classifier",
                   conv_general_dilated=conv_general_dilated_fn(self.pointwise_impl))
    cams = conv(features).astype(jnp.float32)
    if self.pool == "gap":
      logits = jnp.mean(cams, axis=(1, 2))  # = classifier(GAP(features)): it is linear.
    elif self.pool == "tap":
      pooled = tap_pool(features, self.tap_threshold)  # [B, L]
      logits = conv(pooled[:, None, None, :].astype(features.dtype))[:, 0, 0]
      logits = logits.astype(jnp.float32)
    else:
      raise ValueError(f"pool must be 'gap' or 'tap', got {self.pool!r}")
    return {"logits": logits, "cams": cams}


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous, image pooling; 256 ch out."""
  rates: Sequence[int] = (6, 12, 18)
  features: int = 256
  norm: str = "batch"
  num_groups: int = 4
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(norm=self.norm, num_groups=self.num_groups, dtype=self.dtype)
    branches = [ConvNormReLU(self.features, 1, name="branch0", **kw)(x, train)]
    for i, rate in enumerate(self.rates):
      branches.append(ConvNormReLU(self.features, 3, rate, name=f"branch{i + 1}",
                                   **kw)(x, train))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = ConvNormReLU(self.features, 1, name="image_pool", **kw)(pooled, train)
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = ConvNormReLU(self.features, 1, name="project", **kw)(
        jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabV3PlusHead(nn.Module):
  """DeepLabV3+ decoder (METHODS.md §2.1).

  ASPP(high) -> bilinear up to the stride-4 size (half-pixel, `jax.image.resize`) ++
  48-ch projection of the stride-4 features = (width + 48)-ch `features`; then two 3x3
  conv-norm-ReLU (width) with dropout 0.1 and a 1x1 conv (with bias) to `num_classes`.

  Attributes:
    num_classes: C (background included).
    output_stride: 16 -> ASPP rates (6, 12, 18); 8 -> (12, 24, 36).
    width: ASPP and decoder channels; 256 is the published DeepLabV3+. Narrower only to
      fit CPU budgets: on EfficientNet-Lite0 the 256-ch stride-4 decoder costs ~15x the
      backbone (13.5 of 14 GFLOP per 224² forward), and CSRM runs it three times a step.

  Call: (high [B, h, w, Ch] at stride OS, low [B, H/4, W/4, Cl], train) ->
    {'seg_logits': [B, H/4, W/4, C], 'features': [B, H/4, W/4, width + 48]} (float32).
  """
  num_classes: int
  output_stride: int = 16
  norm: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32
  width: int = 256

  @nn.compact
  def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> dict[str, jax.Array]:
    if self.output_stride not in (8, 16):
      raise ValueError(f"DeepLabV3+ needs output_stride 8 or 16, got {self.output_stride}")
    rates = (6, 12, 18) if self.output_stride == 16 else (12, 24, 36)
    kw = dict(norm=self.norm, num_groups=self.num_groups, dtype=self.dtype)
    y = ASPP(rates, self.width, name="aspp", **kw)(high, train)
    b, h, w, _ = low.shape
    y = jax.image.resize(y, (b, h, w, y.shape[-1]), "bilinear")
    low = ConvNormReLU(48, 1, name="low_proj", **kw)(low, train)
    feats = jnp.concatenate([y.astype(low.dtype), low], axis=-1)
    z = feats
    for i in range(2):
      z = ConvNormReLU(self.width, 3, name=f"decoder{i}", **kw)(z, train)
      z = nn.Dropout(0.1, deterministic=not train)(z)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(z)
    return {"seg_logits": logits.astype(jnp.float32), "features": feats.astype(jnp.float32)}


class LightSegHead(nn.Module):
  """A light DeepLabV3+-style decoder (no ASPP), the segmenter of ../shared/CALIBRATION.md.

  high 1x1 conv-norm-ReLU -> `high_width`; low 1x1 conv-norm-ReLU -> 48; high resized
  (bilinear, half-pixel) to the low map's size, concatenated; 3x3 conv-norm-ReLU -> `width`;
  1x1 conv (with bias) -> `num_classes`. On EfficientNet-Lite0 at 256² with high = the
  1280-ch head conv (stride 16) and low = the stride-8 map it costs ~0.5 GFLOP per image,
  against ~12 for the 256-ch DeepLabV3+ decoder at stride 4.

  Call: (high [B, h, w, Ch], low [B, H/8, W/8, Cl], train) ->
    {'seg_logits': [B, H/8, W/8, C], 'features': [B, H/8, W/8, high_width + 48]} (float32).
  """
  num_classes: int
  norm: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32
  high_width: int = 256
  width: int = 128

  @nn.compact
  def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> dict[str, jax.Array]:
    kw = dict(norm=self.norm, num_groups=self.num_groups, dtype=self.dtype)
    y = ConvNormReLU(self.high_width, 1, name="high_proj", **kw)(high, train)
    b, h, w, _ = low.shape
    y = jax.image.resize(y, (b, h, w, y.shape[-1]), "bilinear")
    low = ConvNormReLU(48, 1, name="low_proj", **kw)(low, train)
    feats = jnp.concatenate([y.astype(low.dtype), low], axis=-1)
    z = ConvNormReLU(self.width, 3, name="fuse", **kw)(feats, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(z)
    return {"seg_logits": logits.astype(jnp.float32), "features": feats.astype(jnp.float32)}


class ProjectionHead(nn.Module):
  """3x3 conv-norm-ReLU (hidden) then 1x1 conv (with bias) to `dim`.

  Call: (x [B, h, w, Cin], train) -> [B, h, w, dim] float32 (not normalised).
  """
  dim: int = 256
  hidden: int = 256
  norm: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvNormReLU(self.hidden, 3, norm=self.norm, num_groups=self.num_groups,
                     dtype=self.dtype, name="hidden")(x, train)
    x = nn.Conv(self.dim, (1, 1), dtype=self.dtype, name="out")(x)
    return x.astype(jnp.float32)
