"""The real `wsss` command with a tiny backbone, for test_preemption's subprocesses.

  python preempt_worker.py --config=... --workdir=... [--config.KEY=VALUE ...]

Everything is `wsss_jax.main` (signal handling, stages, checkpoints, exit codes) except
`models.registry.build_backbone`, which returns a two-convolution network with the same
outputs (`stride4`, `out` at output stride 16) so the compiles that dominate a CPU run of
EfficientNet take a second instead of a minute.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax import main
from wsss_jax.models import registry


class TinyBackbone(nn.Module):
  """Conv/4 + BN + ReLU (`stride4`), conv/4 + ReLU (`out`, stride 16)."""
  width: int = 8

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    x = nn.Conv(self.width, (4, 4), strides=(4, 4), name="conv1")(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    out = nn.relu(nn.Conv(2 * self.width, (4, 4), strides=(4, 4), name="conv2")(x))
    return {"stride4": x, "out": out.astype(jnp.float32)}


def tiny_backbone(model_cfg: Any, include_head: bool = True) -> nn.Module:
  del model_cfg, include_head
  return TinyBackbone()


if __name__ == "__main__":
  registry.build_backbone = tiny_backbone
  main.run()
