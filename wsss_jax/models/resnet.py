"""ResNet-50/101/152 (torchvision layout, v1.5) in Linen, dilated to output stride 8/16.

Bottleneck blocks carry the stride on the 3x3 conv (v1.5, torchvision/timm). Padding is
PyTorch's symmetric padding (not TF 'SAME'), so imported torchvision/timm weights give the
same outputs as in PyTorch. Output stride 16 removes the stride of layer4, 8 those of
layer3 and layer4, replacing it by dilation as DeepLab/torchvision do: the first block of a
dilated layer keeps the previous dilation, the following blocks use the doubled one.

Parameter names mirror the torchvision keys: `conv1`, `bn1`, `layer{i}_{j}` with `conv1..3`,
`bn1..3`, `downsample_conv`, `downsample_bn`, and `fc` (see `torch_key_map`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.batch_norm import BatchNorm
from wsss_jax.models.lowering import conv_general_dilated_fn, max_pool

RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_PLANES = (64, 128, 256, 512)
_EXPANSION = 4
# Stride of each layer's output without dilation (conv1 + max pool: 4).
_LAYER_NOMINAL_STRIDES = (4, 8, 16, 32)


def _bn(train: bool, frozen: bool, dtype: Any, name: str) -> BatchNorm:
  # PyTorch BN defaults: momentum 0.1 (Flax 0.9), eps 1e-5.
  return BatchNorm(use_running_average=not train or frozen, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, *, dtype: Any,
          pointwise_impl: str, name: str) -> nn.Conv:
  pad = dilation * (kernel - 1) // 2  # PyTorch-style symmetric padding.
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=False, dtype=dtype,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                 conv_general_dilated=conv_general_dilated_fn(pointwise_impl), name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), with a projection shortcut when needed."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  frozen_bn: bool = False
  pointwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, pointwise_impl=self.pointwise_impl)
    bn = lambda name: _bn(train, self.frozen_bn, self.dtype, name)
    h = nn.relu(bn("bn1")(_conv(self.planes, 1, name="conv1", **kw)(x)))
    h = _conv(self.planes, 3, self.stride, self.dilation, name="conv2", **kw)(h)
    h = nn.relu(bn("bn2")(h))
    h = bn("bn3")(_conv(self.planes * _EXPANSION, 1, name="conv3", **kw)(h))
    if self.downsample:
      x = _conv(self.planes * _EXPANSION, 1, self.stride, name="downsample_conv", **kw)(x)
      x = bn("downsample_bn")(x)
    return nn.relu(h + x)


class ResNet(nn.Module):
  """ResNet feature extractor (torchvision layout).

  Attributes:
    depth: 50, 101 or 152.
    output_stride: 32, 16 or 8.
    frozen_bn: always use the running BN statistics (train flag ignored for BN).
    frozen_stride: freeze the stem and the layers of nominal stride <= this (0: none;
      8: conv1, layer1, layer2): running BN statistics and a `stop_gradient` after them,
      so the step has no backward pass there (`frozen_param_regex` names their params).
    num_classes: > 0 adds the ImageNet classifier `fc` (GAP -> Dense) -> `logits`.
    pointwise_impl: 1x1 convs as 'dot' (matmuls), 'conv' or 'auto' (dot on CPU;
      `models/lowering.py`).
    maxpool_impl: the stem's max pool as 'argmax', 'shift', 'window' or 'auto' (argmax on
      CPU, window elsewhere).
    dtype: compute dtype (params stay float32).

  Call: `(x [B, H, W, 3] normalised, train) -> dict` with `layer1..layer4`, `stride{s}`
  (deepest map at stride s: stride4 = layer1 [.., 256], stride8, ...), `out` = layer4
  [B, H/OS, W/OS, 2048] and `logits` [B, num_classes] if requested.
  """
  depth: int = 50
  output_stride: int = 16
  frozen_bn: bool = False
  frozen_stride: int = 0
  num_classes: int = 0
  pointwise_impl: str = "auto"
  maxpool_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if self.depth not in RESNET_LAYERS:
      raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {self.depth}")
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
    x = x.astype(self.dtype)
    x = _conv(64, 7, 2, dtype=self.dtype, pointwise_impl=self.pointwise_impl, name="conv1")(x)
    frozen = lambda nominal: nominal <= self.frozen_stride
    x = nn.relu(_bn(train, self.frozen_bn or frozen(2), self.dtype, "bn1")(x))
    x = max_pool(x, 3, 2, 1, self.maxpool_impl)
    if frozen(2):
      x = jax.lax.stop_gradient(x)
    feats, stride, dilation, in_ch = {}, 4, 1, 64
    for i, (blocks, planes) in enumerate(zip(RESNET_LAYERS[self.depth], _PLANES)):
      nominal = _LAYER_NOMINAL_STRIDES[i]
      layer_stride, first_dilation = (1 if i == 0 else 2), dilation
      if layer_stride == 2 and stride * 2 > self.output_stride:
        layer_stride, dilation = 1, dilation * 2
      for j in range(blocks):
        first = j == 0
        x = Bottleneck(
            planes, stride=layer_stride if first else 1,
            dilation=first_dilation if first else dilation,
            downsample=first and (layer_stride != 1 or in_ch != planes * _EXPANSION),
            frozen_bn=self.frozen_bn or frozen(nominal), pointwise_impl=self.pointwise_impl,
            dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
        if frozen(nominal):  # No backward pass into frozen layers (XLA drops it).
          x = jax.lax.stop_gradient(x)
        in_ch = planes * _EXPANSION
      stride *= layer_stride
      feats[f"layer{i + 1}"] = feats[f"stride{stride}"] = x
    feats["out"] = x
    if self.num_classes:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      feats["logits"] = nn.Dense(self.num_classes, name="fc")(pooled)
    return feats


def frozen_param_regex(depth: int, frozen_stride: int) -> str:
  r"""Regex (relative to the backbone) of the parameters `frozen_stride` freezes, '' = none.

  E.g. at 8: `^(conv1|bn1|layer1_\d+|layer2_\d+)(/|$)`.
  """
  del depth  # Every depth has the same four layers.
  if frozen_stride < 2:
    return ""
  names = ["conv1", "bn1"] + [rf"layer{i + 1}_\d+" for i, nominal in
                              enumerate(_LAYER_NOMINAL_STRIDES) if nominal <= frozen_stride]
  return rf"^({'|'.join(names)})(/|$)"


def torch_key_map(depth: int, with_classifier: bool) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch prefix, Linen module path, kind) for torchvision/timm ResNet checkpoints."""
  if depth not in RESNET_LAYERS:
    raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
  out = [("conv1", ("conv1",), "conv"), ("bn1", ("bn1",), "bn")]
  for i, blocks in enumerate(RESNET_LAYERS[depth]):
    for j in range(blocks):
      p, m = f"layer{i + 1}.{j}.", f"layer{i + 1}_{j}"
      for k in (1, 2, 3):
        out += [(f"{p}conv{k}", (m, f"conv{k}"), "conv"), (f"{p}bn{k}", (m, f"bn{k}"), "bn")]
      if j == 0:
        out += [(p + "downsample.0", (m, "downsample_conv"), "conv"),
                (p + "downsample.1", (m, "downsample_bn"), "bn")]
  if with_classifier:
    out.append(("fc", ("fc",), "dense"))
  return out
