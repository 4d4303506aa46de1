"""CSRM network (METHODS.md §2.1): classification branch + DeepLabV3+ branch + rep head.

Parameter tree (Linen variables), chosen so a CAM-baseline checkpoint (`registry.CAMNet`)
warm-starts it by path and shape (`config.train.init_from='baseline'`):

  params/backbone/...   the backbone exactly as in CAMNet (EfficientNet keeps its head conv)
  params/cam_head/...   the CAM classifier exactly as in CAMNet (1x1 conv, no bias)
  params/decoder/...    DeepLabV3+ (ASPP, low_proj, decoder{0,1}, classifier -> C classes)
  params/rep_head/...   representation head 304 -> 256 (3x3, norm, ReLU) -> 256 (1x1)

Deviation from the reference (documented): the reference feeds the same stride-16 map to the
classifier and to ASPP. For EfficientNet-Lite the classifier pools the 1280-ch head conv (as
our CAM baseline, so the warm start is exact) while ASPP reads the 320-ch last block, as the
registry's DeepLabV3+ does (3 M instead of 11 M decoder parameters). ResNets have no head
conv, so both read the same map there, as in the reference.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import registry
from wsss_jax.models.heads import (CAMHead, DeepLabV3PlusHead, ProjectionHead,
                                   backbone_pointwise_impl)

CAMS_FROM = ("class", "seg")


class CSRMNet(nn.Module):
  """Backbone + CAM classifier + DeepLabV3+ (C+1 = `num_classes`) + representation head.

  Attributes:
    backbone: module `(images, train) -> {'out': [B, h, w, L], 'stride4': ..., 'strideOS':
      ...}` (`registry.build_backbone`).
    num_classes: C, background included.
    output_stride: backbone output stride (ASPP rates).
    norm, num_groups: norm of the scratch heads (CSRM: GroupNorm with 4 groups).
    rep_dim: representation size (256).
    head_width: channels of the decoder and of the rep head's hidden layer (256 = the
      reference DeepLabV3+; smaller only to fit CPU budgets, see `DeepLabV3PlusHead`).
    cams_from: what the `cams` output holds, which is what the pipeline's `cams` stage
      turns into CAMs and pseudo-labels: 'class' (the classification branch, as the
      reference) or 'seg' (softmax of the segmentation branch, foreground channels,
      stride 4). The losses always read `class_cams`.

  Call: (images [B, H, W, 3], train) -> dict of float32:
    logits [B, C-1]         GAP of the class maps
    class_cams [B, h, w, C-1]  raw class maps at stride OS (before ReLU)
    cams                    = class_cams, or seg softmax [B, H/4, W/4, C-1] ('seg')
    seg_logits [B, H/4, W/4, C]
    rep [B, H/4, W/4, rep_dim] (not normalised)
  With train=True the decoder's dropout needs `rngs={'dropout': key}`.
  """
  backbone: nn.Module
  num_classes: int
  output_stride: int = 16
  norm: str = "group"
  num_groups: int = 4
  rep_dim: int = 256
  head_width: int = 256
  cams_from: str = "class"
  aspp_key: str = ""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if self.cams_from not in CAMS_FROM:
      raise ValueError(f"csrm.cams_from must be one of {CAMS_FROM}, got {self.cams_from!r}")
    feats = self.backbone(images, train=train)
    cam = CAMHead(self.num_classes - 1, "gap", dtype=self.dtype,
                  pointwise_impl=backbone_pointwise_impl(self.backbone), name="cam_head")(
                      feats["out"])
    high = feats[self.aspp_key or f"stride{self.output_stride}"]
    dec = DeepLabV3PlusHead(self.num_classes, self.output_stride, self.norm, self.num_groups,
                            self.dtype, width=self.head_width, name="decoder")(
                                high, feats["stride4"], train)
    rep = ProjectionHead(self.rep_dim, self.head_width, self.norm, self.num_groups, self.dtype,
                         name="rep_head")(dec["features"].astype(self.dtype), train)
    out = {"logits": cam["logits"], "class_cams": cam["cams"], "cams": cam["cams"],
           "seg_logits": dec["seg_logits"], "rep": rep}
    if self.cams_from == "seg":
      out["cams"] = jax.nn.softmax(dec["seg_logits"], axis=-1)[..., 1:]
    return out


def build_csrm_net(model_cfg: Any, num_classes: int, *, cams_from: str = "class",
                   rep_dim: int = 256, norm: str = "group",
                   head_width: int = 256) -> CSRMNet:
  """CSRMNet from `config.model` (backbone with its head conv, like CAMNet).

  `norm` is the heads' norm (`config.csrm.head_norm`; CSRM: 'group'), kept apart from
  `config.model.norm` so the shared segmentation stage is unchanged.
  """
  get = registry._cfg  # pylint: disable=protected-access
  backbone = registry.build_backbone(model_cfg, include_head=True)
  os_ = int(get(model_cfg, "output_stride", 16))
  # EfficientNet: ASPP on the last block (stride OS), not the 1280-ch head conv.
  aspp_key = f"stride{os_}" if str(get(model_cfg, "backbone")).startswith(
      "efficientnet_") else "out"
  return CSRMNet(backbone, num_classes, output_stride=os_, norm=norm,
                 num_groups=int(get(model_cfg, "num_groups", 4)), rep_dim=rep_dim,
                 head_width=head_width, cams_from=cams_from, aspp_key=aspp_key,
                 dtype=registry.compute_dtype(model_cfg))
