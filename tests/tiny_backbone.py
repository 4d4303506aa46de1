"""A two-convolution stand-in for `models.registry.build_backbone` (cheap compiles).

Same outputs as the real backbones (`stride4`, `stride8`, `out` at output stride 16), so
every model of the pipeline (CAM heads, DeepLabV3+, the light decoder) builds on it. Used by `preempt_worker.py` (the
real command line) and by in-process tests; importing it defines no absl flags.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyBackbone(nn.Module):
  """Conv/4 + BN + ReLU (`stride4`), its 2x2 average (`stride8`, no parameters), conv/4 +
  ReLU (`out`, stride 16)."""
  width: int = 8

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    x = nn.Conv(self.width, (4, 4), strides=(4, 4), name="conv1")(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    out = nn.relu(nn.Conv(2 * self.width, (4, 4), strides=(4, 4), name="conv2")(x))
    stride8 = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return {"stride4": x, "stride8": stride8, "out": out.astype(jnp.float32)}


def tiny_backbone(model_cfg: Any, include_head: bool = True) -> nn.Module:
  del model_cfg, include_head
  return TinyBackbone()
