"""SPML's network (`methods/spml.py`, METHODS.md §5): ASPP-L embedding + softmax classifier
on the detached embedding."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models.batch_norm import BatchNorm
from wsss_jax.ops.norms import l2_normalize


class SPMLNet(nn.Module):
  """Embedding network + softmax classifier on the detached embedding (module docstring).

  Call: (images [B, H, W, 3], train) -> {'embedding': [B, h4, w4, D] unit norm,
  'seg_logits': [B, h4, w4, C], 'cams': [B, h4, w4, C-1], 'logits': [B, C-1]} (float32;
  h4 = the backbone's stride-4 size). With `train=True` it needs `rngs={'dropout': key}`.
  `freeze_embedding`: the backbone runs in inference mode even when `train=True` (its
  BatchNorm statistics stay fixed), so only the classifier trains (SPML's bootstrapped
  classifiers on a trained embedding, `stages/spml_bootstrap.py`).
  """
  backbone: nn.Module
  num_classes: int
  embedding_dim: int = 64
  aspp_rates: Sequence[int] = (6, 12, 18, 24)
  classifier_hidden: int = 128
  classifier_dropout: float = 0.75
  dtype: Any = jnp.float32
  freeze_embedding: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    feats = self.backbone(images, train=train and not self.freeze_embedding)
    high, low = feats["out"], feats["stride4"]
    emb = None
    for i, r in enumerate(self.aspp_rates):  # ASPP-L: summed atrous branches, no norm
      y = nn.Conv(self.embedding_dim, (3, 3), padding=((r, r), (r, r)),
                  kernel_dilation=(r, r), dtype=self.dtype, name=f"embed_aspp{i}")(high)
      emb = y if emb is None else emb + y
    b, h, w = low.shape[:3]
    emb = jax.image.resize(emb.astype(jnp.float32), (b, h, w, self.embedding_dim),
                           "bilinear")
    emb = l2_normalize(emb)
    # Classifier on the detached embedding: it never changes the metric space (§5.1).
    x = nn.Conv(self.classifier_hidden, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                dtype=self.dtype, name="classifier_conv")(jax.lax.stop_gradient(emb))
    x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                  dtype=self.dtype, name="classifier_bn")(x)
    x = nn.Dropout(self.classifier_dropout, deterministic=not train)(nn.relu(x))
    seg_logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                         name="classifier_out")(x).astype(jnp.float32)
    cams = seg_logits[..., 1:] - seg_logits[..., :1]
    return {"embedding": emb, "seg_logits": seg_logits, "cams": cams,
            "logits": jnp.mean(cams, axis=(1, 2))}
