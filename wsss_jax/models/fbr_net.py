"""FBR network (METHODS.md §3.1): CAM classifier + FG/BG projection heads + BG predictor.

  features f = backbone(images)['out']                      [B, h, w, L]
  logits, cams = CAMHead(f)  (GAP or TAP pooling)           [B, C-1], [B, h, w, C-1]
  Z_fg = ReLU(conv1x1_fg(f))                                [B, h, w, D]   (D = 128)
  Z_bg = ReLU(conv1x1_bg(f))                                [B, h, w, D]
  Z_bg' = ReLU(BN(conv1x1_bg(f)))                           [B, h, w, D]   (L_sim's BG side)
  bg_logit = conv1x1(Dropout(Z_bg'))                        [B, h, w]

The projections are 1x1 convolutions without bias followed by ReLU (paper: "a
convolutional layer followed by ReLU"); the BG predictor follows the released PPC-variant
code (BN -> ReLU -> Dropout 0.5 -> 1x1 conv on the pre-ReLU BG projection), and the
released code's L_sim (`code_compat`) compares Z_fg with that BN -> ReLU activation Z_bg'
(METHODS.md §3.1), not with Z_bg, which feeds the NROIs. Parameters:
`backbone` (pretrained), `cam_head`, `proj_fg`, `proj_bg`, `bg_norm`, `bg_classifier`
(scratch "head" group), so the shared stages and optimizer groups work unchanged; at
inference only `logits` and `cams` are used.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.heads import CAMHead, Norm, backbone_pointwise_impl

_HEAD_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # Kaiming (ReLU).


class FBRNet(nn.Module):
  """Backbone + CAM head + FBR projections.

  Attributes:
    backbone: module `(images, train) -> {'out': [B, h, w, L], ...}`.
    num_classes: C (background included).
    pool: 'gap' | 'tap' (FBR's thresholded average pooling, Eq. 11).
    tap_threshold: TAP threshold (fraction of the channel max).
    proj_dim: D of both projections.
    norm: 'batch' | 'group' for the BG predictor's norm layer.
    bg_dropout: dropout rate of the BG predictor (0 disables; train mode then needs no
      'dropout' rng).

  Call: (images [B, H, W, 3], train) -> {'logits', 'cams', 'features', 'proj_fg',
  'proj_bg', 'proj_bg_bn' [B, h, w, D], 'bg_logit' [B, h, w]} (float32).
  """
  backbone: nn.Module
  num_classes: int
  pool: str = "gap"
  tap_threshold: float = 0.1
  proj_dim: int = 128
  norm: str = "batch"
  bg_dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    feats = self.backbone(images, train=train)["out"]
    out = CAMHead(self.num_classes - 1, self.pool, self.tap_threshold, self.dtype,
                  backbone_pointwise_impl(self.backbone), name="cam_head")(feats)
    conv = lambda name: nn.Conv(self.proj_dim, (1, 1), use_bias=False, dtype=self.dtype,
                                kernel_init=_HEAD_INIT, name=name)
    z_fg = nn.relu(conv("proj_fg")(feats))
    z_bg_pre = conv("proj_bg")(feats)
    z_bg_bn = nn.relu(Norm(self.norm, dtype=self.dtype, name="bg_norm")(z_bg_pre, train))
    h = nn.Dropout(self.bg_dropout, deterministic=not train)(z_bg_bn)
    bg_logit = nn.Conv(1, (1, 1), dtype=self.dtype, name="bg_classifier")(h)[..., 0]
    return {**out, "features": feats.astype(jnp.float32),
            "proj_fg": z_fg.astype(jnp.float32),
            "proj_bg": nn.relu(z_bg_pre).astype(jnp.float32),
            "proj_bg_bn": z_bg_bn.astype(jnp.float32),
            "bg_logit": bg_logit.astype(jnp.float32)}
