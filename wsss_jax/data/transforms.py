"""Per-example augmentations and normalisation (numpy + PIL, grain transforms).

Every op takes and returns a record dict (CONVENTIONS.md):
`{'id': str, 'image': uint8 [H, W, 3], 'mask': int [H, W], 'labels': uint8 [C-1], ...}`.
Unknown keys pass through (the pipeline adds `index`).

Two ways to use them:

* `TrainTransform` / `EvalTransform`: the fused ops the pipeline uses. `TrainTransform` is
  **defined** as the composition
  `RandomScale -> RandomCrop -> RandomHorizontalFlip -> ColorJitter -> Normalize`
  drawing from the generator in that order, so `unfused_train_ops(...).random_map(ex, rng)`
  and `TrainTransform(...).random_map(ex, rng)` give the same example from equal
  generators (mask exactly; image within PIL's rounding, <= 2 grey levels = 0.035
  normalised; a test checks it). The fused version resizes only the crop window (PIL
  `box=`), jitters and normalises the crop only, as one per-pixel affine map, which is
  ~3x (128^2) to ~5x (448^2) faster than running the ops one by one.
* The separate ops (`RandomScale`, `RandomCrop`, ...) live in `augment_ops.py`.

Geometry. Images are resized with PIL bilinear (antialiased when shrinking, half-pixel
centres: the `jax.image.resize` convention); masks with an exact half-pixel nearest
neighbour in numpy (source pixel `floor((i + 0.5) * H / H')`), so a mask pixel is always
the source pixel that contains the sample centre of the matching image pixel. Measured
(one core, uint8 RGB, x0.7 / x1.3): PIL 0.10/0.18 ms at 128^2 and 1.1/2.1 ms at 448^2;
`scipy.ndimage.zoom(order=1)` and `skimage.transform.resize(order=1)` 0.66/2.2 ms and
7.8/26 ms, i.e. PIL is 7-12x faster. PIL's own NEAREST filter is not exactly half-pixel
aligned (off by up to one pixel), hence the numpy gather for masks (0.17 ms at 448^2).

Padding. Crops smaller than the crop size are placed at a random offset inside it
(IRN-style), the rest is padding: **mask 255** (ignore) and **image 0 after
normalisation** (exactly 0.0; the uint8 intermediate of the unfused `RandomCrop` holds the
rounded ImageNet mean `PAD_PIXEL` and a `valid` mask, and `Normalize` writes 0 there).

Colour jitter. torchvision `ColorJitter(b, c, s)` semantics (factors uniform in
`[max(0, 1 - s), 1 + s]`, the three ops in random order, contrast blends with the mean
grey level, saturation with the grey image) with two documented differences: (1) the ops
are composed analytically into one affine map and clipped to [0, 255] once at the end
(torchvision clips after each op; they differ only where an intermediate value leaves
[0, 255]); (2) it runs after the crop, so contrast uses the mean grey of the crop's image
pixels (not of the whole image).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from PIL import Image

from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import image as image_ops
from wsss_jax.ops import sizes
# Re-exported: the normalisation constants and its inverse live with the ops that use them.
from wsss_jax.ops.image import IMAGENET_MEAN, IMAGENET_STD, denormalize  # noqa: F401

_MEAN255 = image_ops.MEAN255
_STD255 = image_ops.STD255
_INV_STD255 = (1.0 / _STD255).astype(np.float32)
# Normalised values of the uint8 range ends: the clip bounds for fused jitter+normalise.
_NORM_LO = ((0.0 - _MEAN255) * _INV_STD255).astype(np.float32)
_NORM_HI = ((255.0 - _MEAN255) * _INV_STD255).astype(np.float32)
# uint8 padding for ops that pad before normalising: normalises to ~0 (|x| < 0.02).
PAD_PIXEL = np.round(_MEAN255).astype(np.uint8)
# ITU-R 601 luma, as torchvision's rgb_to_grayscale. Sums to 1, which the affine jitter
# composition relies on (grey(c * 1) == c).
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)

Example = dict[str, Any]


# ---------------------------------------------------------------------------------------
# Normalisation.
# ---------------------------------------------------------------------------------------
def normalize(image):
  """ImageNet mean/std normalisation in RGB order.

  Args:
    image: `[..., 3]` numpy or jax array with values in [0, 255] (uint8 or float).

  Returns:
    float32 array of the same shape (numpy in, numpy out; jax in, jax out; jittable):
    `(image / 255 - mean) / std`.
  """
  if isinstance(image, np.ndarray) and image.ndim >= 2 and image.shape[-1] == 3:
    return _normalize_np(image)
  return (image.astype(np.float32) - _MEAN255) * _INV_STD255


def _normalize_np(image: np.ndarray) -> np.ndarray:
  """Fast numpy `normalize`: a new C-contiguous float32 array.

  Broadcasting `[..., 3]` against `[3]` runs numpy's inner loop over 3 elements (~7x
  slower at 448^2); instead view rows as `[..., W * 3]` against constants tiled W times.
  """
  out = np.array(image, dtype=np.float32, order="C")
  rows = out.reshape(-1, out.shape[-2] * 3)
  w = out.shape[-2]
  rows -= np.tile(_MEAN255, w)
  rows *= np.tile(_INV_STD255, w)
  return out


# ---------------------------------------------------------------------------------------
# Resizing.
# ---------------------------------------------------------------------------------------
def _full_window(size: tuple[int, int]) -> tuple[int, int, int, int]:
  return 0, 0, int(size[0]), int(size[1])


def resize_image(image: np.ndarray, size: tuple[int, int],
                 window: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Bilinear resize of a uint8 image to `size`, optionally only a window of the result.

  Args:
    image: uint8 `[H, W, C]`.
    size: `(H', W')`, the size of the whole resized image.
    window: `(y0, x0, h, w)` in the resized frame; only that window is computed (PIL
      `box=`: same values as resizing everything and slicing, up to rounding).

  Returns:
    uint8 `[h, w, C]` (`[H', W', C]` without a window). May be a view of `image` when no
    resize is needed.
  """
  h_in, w_in = image.shape[:2]
  nh, nw = int(size[0]), int(size[1])
  y0, x0, h, w = window if window is not None else _full_window(size)
  if (nh, nw) == (h_in, w_in):
    return image[y0:y0 + h, x0:x0 + w]
  sy, sx = h_in / nh, w_in / nw
  box = (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)
  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((w, h), Image.BILINEAR, box=box))


def _nearest_index(n_in: int, n_out: int, start: int, count: int) -> np.ndarray:
  """Half-pixel nearest source indices for output pixels `start .. start+count-1`."""
  idx = np.floor((np.arange(start, start + count) + 0.5) * (n_in / n_out)).astype(np.intp)
  return np.minimum(idx, n_in - 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int],
                window: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Nearest-neighbour resize of a label mask (half-pixel centres, exact).

  Args:
    mask: integer `[H, W]`.
    size: `(H', W')`, the size of the whole resized mask.
    window: `(y0, x0, h, w)` in the resized frame; only that window is computed.

  Returns:
    `[h, w]` of `mask`'s dtype. Output pixel `(i, j)` of the full resize is source pixel
    `(floor((i + .5) H / H'), floor((j + .5) W / W'))`.
  """
  h_in, w_in = mask.shape[:2]
  nh, nw = int(size[0]), int(size[1])
  y0, x0, h, w = window if window is not None else _full_window(size)
  if (nh, nw) == (h_in, w_in):
    return mask[y0:y0 + h, x0:x0 + w]
  # Rows then columns: two 1-D gathers are ~2.5x faster than one 2-D fancy index.
  return mask[_nearest_index(h_in, nh, y0, h)][:, _nearest_index(w_in, nw, x0, w)]


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
  """`(h, w)` scaled by `scale`, each side by `ops.sizes.scaled_size`."""
  return sizes.scaled_size(h, scale), sizes.scaled_size(w, scale)


# ---------------------------------------------------------------------------------------
# Random parameters (shared by the fused and the unfused ops so both draw the same).
# ---------------------------------------------------------------------------------------
class JitterParams(NamedTuple):
  """Colour-jitter factors (1 = identity) and the order of the three ops.

  `order` is a permutation of (0, 1, 2) = (brightness, contrast, saturation).
  """
  brightness: float
  contrast: float
  saturation: float
  order: tuple[int, ...]


def draw_jitter(rng: np.random.Generator, strength: float) -> JitterParams:
  """Draws torchvision-style factors uniform in `[max(0, 1 - s), 1 + s]`."""
  f = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
  order = tuple(int(i) for i in rng.permutation(3))
  return JitterParams(float(f[0]), float(f[1]), float(f[2]), order)


def jitter_coefficients(params: JitterParams, mean_gray: float) -> tuple[float, float, float]:
  """Composes the jitter ops into `y = alpha * x + (beta * grey(x) + gamma)` per pixel.

  Each op maps the family `x -> a x + (b grey(x) + c) 1` into itself (grey weights sum
  to 1, so `grey(y) = (a + b) grey(x) + c`):
    brightness f: `y = f x`;
    contrast f:   `y = f x + (1 - f) m`, m = mean grey of the current image;
    saturation f: `y = f x + (1 - f) grey(x)`.

  Args:
    params: factors and order.
    mean_gray: mean grey level of the input pixels, in [0, 255].

  Returns:
    `(alpha, beta, gamma)`.
  """
  a, b, c = 1.0, 0.0, 0.0
  factors = (params.brightness, params.contrast, params.saturation)
  for op in params.order:
    f = factors[op]
    if op == 0:    # brightness
      a, b, c = f * a, f * b, f * c
    elif op == 1:  # contrast
      m = (a + b) * mean_gray + c
      a, b, c = f * a, f * b, f * c + (1.0 - f) * m
    else:          # saturation
      a, b = f * a, f * b + (1.0 - f) * (a + b)
  return a, b, c


class _AxisWindow(NamedTuple):
  src: int   # offset in the rescaled image
  dst: int   # offset in the crop
  size: int  # extent (crop size, or the rescaled length when shorter)


def _draw_axis(rng: np.random.Generator, n: int, crop: int) -> _AxisWindow:
  if n >= crop:
    return _AxisWindow(int(rng.integers(0, n - crop + 1)), 0, crop)
  return _AxisWindow(0, int(rng.integers(0, crop - n + 1)), n)


def draw_crop(rng: np.random.Generator, h: int, w: int,
              crop: int) -> tuple[_AxisWindow, _AxisWindow]:
  """Random crop window per axis (y, then x): a random window when the image is at least
  `crop` long on that axis, else the whole axis at a random offset inside the crop."""
  return _draw_axis(rng, h, crop), _draw_axis(rng, w, crop)


def check_example(ex: Example) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(image, mask)` after checking shapes and dtypes.

  Raises:
    ValueError: naming the record id, on a non-uint8 or non-RGB image, or a mask whose
      shape differs from the image's.
  """
  image, mask = ex["image"], ex["mask"]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"Record {ex.get('id')!r}: image must be uint8 [H, W, 3], got "
                     f"{image.dtype} {image.shape}")
  if mask.shape != image.shape[:2]:
    raise ValueError(f"Record {ex.get('id')!r}: mask shape {mask.shape} != image shape "
                     f"{image.shape[:2]}")
  return image, mask


def gray(x: np.ndarray) -> np.ndarray:
  """Grey level `[...]` float32 of a `[..., 3]` array (no BLAS, see `_jitter_normalize`)."""
  return x[..., 0] * _GRAY[0] + x[..., 1] * _GRAY[1] + x[..., 2] * _GRAY[2]


def _jitter_normalize(image: np.ndarray, params: JitterParams | None) -> np.ndarray:
  """`normalize(clip(jitter(image), 0, 255))` of a uint8 image, as new float32 `[h, w, 3]`.

  Jitter and normalisation are one affine map per pixel, `y_c = A_c x_c + B_c grey + b_c`,
  evaluated channel by channel straight from the uint8 planes. No BLAS: OpenBLAS threads
  on an `[N, 3] @ [3, 3]` product were 50x slower on a loaded 2-core host (measured).
  """
  if params is None:
    return _normalize_np(image)
  h, w = image.shape[:2]
  gray = image[..., 0] * _GRAY[0]
  gray += image[..., 1] * _GRAY[1]
  gray += image[..., 2] * _GRAY[2]
  alpha, beta, gamma = jitter_coefficients(params, float(gray.mean(dtype=np.float64)))
  scale = (alpha * _INV_STD255).astype(np.float32)
  gscale = (beta * _INV_STD255).astype(np.float32)
  bias = ((gamma - _MEAN255) * _INV_STD255).astype(np.float32)
  out = np.empty((h, w, 3), np.float32)
  tmp = np.empty((h, w), np.float32)
  for c in range(3):
    plane = out[..., c]
    np.multiply(image[..., c], scale[c], out=plane)
    np.multiply(gray, gscale[c], out=tmp)
    tmp += bias[c]
    plane += tmp
  rows = out.reshape(h, w * 3)
  np.minimum(rows, np.tile(_NORM_HI, w), out=rows)
  np.maximum(rows, np.tile(_NORM_LO, w), out=rows)
  return out


# ---------------------------------------------------------------------------------------
# Fused transforms used by the pipeline.
# ---------------------------------------------------------------------------------------
def _passthrough(ex: Example) -> Example:
  out = {"labels": np.asarray(ex["labels"], np.float32)}
  if "index" in ex:
    out["index"] = np.int32(ex["index"])
  return out


class TrainTransform(grain.transforms.RandomMap):
  """Random rescale, crop/pad, flip, colour jitter and normalisation of one record.

  Output: `{'image': float32 [S, S, 3] (normalised, 0 in padding), 'mask': int32 [S, S]
  (255 in padding), 'valid': bool [S, S] (True on image pixels, False on padding),
  'labels': float32 [C-1]}` plus `'index': int32` when the input has it. The id is
  dropped (strings do not batch onto devices). `valid` is separate from `mask != 255`
  because ground-truth masks also hold 255 on image pixels (VOC boundaries), and methods
  that read "background" from CAMs must not count the zero padding as background.

  Attributes:
    crop_size: S.
    scale_range: `(lo, hi)`; the scale is uniform in it, applied to both sides.
    flip: horizontal flip with probability 1/2.
    color_jitter: brightness/contrast/saturation strength; 0 disables.
    extra_maps: keys of further per-pixel integer maps `[H, W]` (e.g. SPML's
      `superpixels`) resized, cropped and flipped exactly like `mask` and returned as
      int32 `[S, S]` with 0 in padding (keys absent from a record are skipped).
  """

  def __init__(self, crop_size: int, scale_range: Sequence[float] = (1.0, 1.0),
               flip: bool = True, color_jitter: float = 0.0,
               extra_maps: Sequence[str] = ()):
    if crop_size <= 0:
      raise ValueError(f"crop_size must be positive, got {crop_size}")
    lo, hi = (float(s) for s in scale_range)
    if not 0 < lo <= hi:
      raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
    if color_jitter < 0:
      raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    self.crop_size = int(crop_size)
    self.scale_range = (lo, hi)
    self.flip = bool(flip)
    self.color_jitter = float(color_jitter)
    self.extra_maps = tuple(extra_maps)

  @classmethod
  def from_config(cls, data_cfg) -> TrainTransform:
    """From `config.data` (crop_size, scale_range, flip, color_jitter; optional
    extra_maps)."""
    return cls(data_cfg.crop_size, tuple(data_cfg.scale_range), data_cfg.flip,
               data_cfg.color_jitter, tuple(getattr(data_cfg, "extra_maps", ()) or ()))

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    image, mask = check_example(ex)
    s = self.crop_size
    h, w = image.shape[:2]
    # Draw order = RandomScale, RandomCrop, RandomHorizontalFlip, ColorJitter.
    nh, nw = scaled_size(h, w, rng.uniform(*self.scale_range))
    wy, wx = draw_crop(rng, nh, nw, s)
    flip = self.flip and rng.random() < 0.5
    jitter = draw_jitter(rng, self.color_jitter) if self.color_jitter > 0 else None

    window = (wy.src, wx.src, wy.size, wx.size)
    img = resize_image(image, (nh, nw), window)
    msk = resize_mask(mask, (nh, nw), window)
    extras = {}
    for key in (k for k in self.extra_maps if k in ex):  # other sources lack them
      if np.shape(ex[key]) != mask.shape:
        raise ValueError(f"Record {ex.get('id')!r}: {key} shape {np.shape(ex[key])} != "
                         f"mask shape {mask.shape}")
      extras[key] = resize_mask(np.asarray(ex[key]), (nh, nw), window)
    dx = wx.dst
    if flip:  # Flip the crop and mirror its offset: same as flipping the padded crop.
      img, msk, dx = img[:, ::-1], msk[:, ::-1], s - wx.dst - wx.size
      extras = {k: v[:, ::-1] for k, v in extras.items()}

    out_img = np.zeros((s, s, 3), np.float32)
    out_msk = np.full((s, s), IGNORE_INDEX, np.int32)
    ys, xs = slice(wy.dst, wy.dst + wy.size), slice(dx, dx + wx.size)
    out_img[ys, xs] = _jitter_normalize(img, jitter)
    out_msk[ys, xs] = msk
    valid = np.zeros((s, s), bool)
    valid[ys, xs] = True
    out = {"image": out_img, "mask": out_msk, "valid": valid, **_passthrough(ex)}
    for key, value in extras.items():
      out[key] = np.zeros((s, s), np.int32)
      out[key][ys, xs] = value
    return out


def _id_str(record_id) -> str:
  if isinstance(record_id, (bytes, np.bytes_)):  # tfds string features come as bytes
    return record_id.decode("utf-8")
  return str(record_id)


class EvalTransform(grain.transforms.Map):
  """Whole image, normalised, padded bottom/right to `[P, P]`.

  `map(ex)` output: `{'image': float32 [P, P, 3] (0 in padding), 'mask': int32 [P, P]
  (255 in padding), 'valid': bool [P, P] (True on image pixels), 'size': int32 [2] (h, w
  of the image pixels), 'labels': float32 [C-1], 'index': int32 (input's, else -1),
  'id': str}`.

  The pipeline instead maps `compact` (unpadded) per example and pads in `collate`,
  straight into the batch arrays: padded per-example arrays cost a second full copy
  (`np.stack`) and fresh pages for each, and made the eval pipeline ~1.8x slower at
  P = 544 (measured).

  Attributes:
    pad_size: P.
    oversize: what to do with an image with a side longer than P: `'error'` (default)
      raises a ValueError naming the id and the sizes; `'resize'` shrinks it (bilinear,
      mask nearest) so its longer side is P, and `size` then holds the resized size, so
      predictions and metrics for that image are at the reduced resolution.
  """

  def __init__(self, pad_size: int, oversize: str = "error"):
    if pad_size <= 0:
      raise ValueError(f"pad_size must be positive, got {pad_size}")
    if oversize not in ("error", "resize"):
      raise ValueError(f"oversize must be 'error' or 'resize', got {oversize!r}")
    self.pad_size = int(pad_size)
    self.oversize = oversize

  def compact(self, ex: Example) -> Example:
    """The unpadded example: `image` float32 `[h, w, 3]` (normalised), `mask` `[h, w]`,
    `size`, `labels`, `index`, `id` as in `map`.

    Raises:
      ValueError: for an image longer than P with `oversize='error'`, naming the id.
    """
    image, mask = check_example(ex)
    p = self.pad_size
    h, w = image.shape[:2]
    if h > p or w > p:
      if self.oversize == "error":
        raise ValueError(
            f"Eval record {ex.get('id')!r} (index {ex.get('index', '?')}) is {h}x{w}, "
            f"larger than the eval pad size {p}x{p}. Set data.eval_pad_size >= {max(h, w)} "
            f"(0 = the split's largest side) or use oversize='resize'.")
      h, w = scaled_size(h, w, p / max(h, w))
      h, w = min(h, p), min(w, p)
      image, mask = resize_image(image, (h, w)), resize_mask(mask, (h, w))
    return {"image": _normalize_np(image), "mask": mask,
            "size": np.array([h, w], np.int32),
            "labels": np.asarray(ex["labels"], np.float32),
            "index": np.int32(ex.get("index", -1)), "id": _id_str(ex.get("id", ""))}

  def padding_example(self, num_labels: int) -> Example:
    """A `compact` example with no pixels (batch padding): index -1, id ''."""
    return {"image": np.zeros((0, 0, 3), np.float32), "mask": np.zeros((0, 0), np.uint8),
            "size": np.zeros(2, np.int32), "labels": np.zeros(num_labels, np.float32),
            "index": np.int32(-1), "id": ""}

  def collate(self, examples: Sequence[Example]) -> Example:
    """Batches `compact` examples into `[b, P, P, ...]` arrays (`map`'s layout with a
    leading batch axis; `id` becomes a numpy str array `[b]`)."""
    b, p = len(examples), self.pad_size
    image = np.zeros((b, p, p, 3), np.float32)
    mask = np.full((b, p, p), IGNORE_INDEX, np.int32)
    valid = np.zeros((b, p, p), bool)
    for j, ex in enumerate(examples):
      h, w = (int(v) for v in ex["size"])
      image[j, :h, :w] = ex["image"]
      mask[j, :h, :w] = ex["mask"]
      valid[j, :h, :w] = True
    return {"image": image, "mask": mask, "valid": valid,
            "size": np.stack([ex["size"] for ex in examples]).astype(np.int32),
            "labels": np.stack([ex["labels"] for ex in examples]).astype(np.float32),
            "index": np.array([ex["index"] for ex in examples], np.int32),
            "id": np.array([ex["id"] for ex in examples], dtype=str)}

  def map(self, ex: Example) -> Example:
    out = {k: v[0] for k, v in self.collate([self.compact(ex)]).items()}
    out["id"], out["index"] = str(out["id"]), np.int32(out["index"])
    return out
