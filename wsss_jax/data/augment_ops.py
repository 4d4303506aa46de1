"""Unfused augmentation ops: the building blocks of `transforms.TrainTransform`.

`TrainTransform` applies rescale -> crop -> flip -> colour jitter -> normalise in one fused
pass; these ops apply the same steps one at a time, drawing their random numbers in the
same order, so tests can check the fused transform against its definition and users can
compose their own chains.
"""
from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from wsss_jax.data import transforms as T


class RandomScale(grain.transforms.RandomMap):
  """Rescales image (bilinear) and mask (nearest) by a factor uniform in `scale_range`."""

  def __init__(self, scale_range: Sequence[float]):
    self.scale_range = tuple(float(s) for s in scale_range)

  def random_map(self, ex: T.Example, rng: np.random.Generator) -> T.Example:
    image, mask = T.check_example(ex)
    size = T.scaled_size(*image.shape[:2], rng.uniform(*self.scale_range))
    return {**ex, "image": T.resize_image(image, size), "mask": T.resize_mask(mask, size)}


class RandomCrop(grain.transforms.RandomMap):
  """Random `crop_size` crop; shorter sides are placed at a random offset and padded.

  Image padding is `T.PAD_PIXEL` (uint8 ImageNet mean), mask padding 255. Adds `'valid'`:
  bool `[S, S]`, True on image pixels (`Normalize` writes exact 0 elsewhere).
  """

  def __init__(self, crop_size: int):
    self.crop_size = int(crop_size)

  def random_map(self, ex: T.Example, rng: np.random.Generator) -> T.Example:
    image, mask = T.check_example(ex)
    s = self.crop_size
    wy, wx = T.draw_crop(rng, *image.shape[:2], s)
    out_img = np.empty((s, s, 3), np.uint8)
    out_img[...] = T.PAD_PIXEL
    out_msk = np.full((s, s), T.IGNORE_INDEX, mask.dtype)
    valid = np.zeros((s, s), bool)
    dst = (slice(wy.dst, wy.dst + wy.size), slice(wx.dst, wx.dst + wx.size))
    src = (slice(wy.src, wy.src + wy.size), slice(wx.src, wx.src + wx.size))
    out_img[dst] = image[src]
    out_msk[dst] = mask[src]
    valid[dst] = True
    return {**ex, "image": out_img, "mask": out_msk, "valid": valid}


class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Flips image, mask (and `valid` if present) together with probability `prob`."""

  def __init__(self, prob: float = 0.5):
    self.prob = float(prob)

  def random_map(self, ex: T.Example, rng: np.random.Generator) -> T.Example:
    if not rng.random() < self.prob:
      return ex
    out = dict(ex)
    for key in ("image", "mask", "valid"):
      if key in ex:
        out[key] = np.ascontiguousarray(ex[key][:, ::-1])
    return out


class ColorJitter(grain.transforms.RandomMap):
  """Brightness/contrast/saturation jitter of strength `strength` (module docstring).

  Output image: float32 in [0, 255]. Only `valid` pixels (all without a `valid` key) are
  changed and enter the contrast mean. `strength == 0` is the identity and draws nothing.
  """

  def __init__(self, strength: float):
    self.strength = float(strength)

  def random_map(self, ex: T.Example, rng: np.random.Generator) -> T.Example:
    if self.strength <= 0:
      return ex
    params = T.draw_jitter(rng, self.strength)
    x = ex["image"].astype(np.float32)
    valid = ex.get("valid")
    px = x[valid] if valid is not None else x.reshape(-1, 3)  # [N, 3]
    if not px.size:
      return {**ex, "image": x}
    gray = T.gray(px)
    alpha, beta, gamma = T.jitter_coefficients(params, float(gray.mean()))
    y = np.clip(alpha * px + (beta * gray + gamma)[:, None], 0.0, 255.0)
    if valid is not None:
      x[valid] = y
    else:
      x = y.reshape(x.shape)
    return {**ex, "image": x.astype(np.float32)}


class Normalize(grain.transforms.Map):
  """`T.normalize` the image (exact 0 where `valid` is False); mask -> int32, labels ->
  float32. Other keys, `valid` included, pass through."""

  def map(self, ex: T.Example) -> T.Example:
    image = T.normalize(ex["image"])
    if "valid" in ex:
      image[~ex["valid"]] = 0.0
    out = {**ex, "image": image, "mask": np.asarray(ex["mask"], np.int32)}
    if "labels" in ex:
      out["labels"] = np.asarray(ex["labels"], np.float32)
    return out


class Compose(grain.transforms.RandomMap):
  """Applies `ops` in order with one generator (so the draws are sequential)."""

  def __init__(self, ops: Sequence[grain.transforms.Map | grain.transforms.RandomMap]):
    self.ops = tuple(ops)

  def random_map(self, ex: T.Example, rng: np.random.Generator) -> T.Example:
    for op in self.ops:
      if isinstance(op, grain.transforms.RandomMap):
        ex = op.random_map(ex, rng)
      else:
        ex = op.map(ex)
    return ex


def unfused_train_ops(crop_size: int, scale_range: Sequence[float] = (1.0, 1.0),
                      flip: bool = True, color_jitter: float = 0.0) -> Compose:
  """The op-by-op chain that `transforms.TrainTransform` fuses (reference and building block)."""
  ops = [RandomScale(scale_range), RandomCrop(crop_size)]
  if flip:
    ops.append(RandomHorizontalFlip(0.5))
  ops += [ColorJitter(color_jitter), Normalize()]
  return Compose(ops)
