"""The embedded synthetic WSSS benchmark: handwritten digits pasted on real texture photos.

Everything comes from files shipped inside installed wheels (nothing is downloaded):
- objects: the 1,797 real handwritten digits of scikit-learn `load_digits` (8x8, 0..16),
  upsampled once with cubic splines to 40x40 and then drawn with a random size, aspect,
  rotation and position by bilinear sampling; ink = samples >= `INK_THRESHOLD`, so the mask
  is exact by construction (a pixel is class k iff it was painted with digit k's ink and no
  later object covered it);
- backgrounds: crops of real photos from scikit-image / scikit-learn (`TEXTURES`).

Classes: 0 = background, 1..10 = digits 0..9 (`SYNTHETIC_CLASSES`, num_classes 11).

What it exercises (the reasons WSSS methods exist):
- co-occurrence bias: class k prefers texture `preferred_texture(k)`. With probability
  `cooccurrence`, an image whose first object is class k is drawn on that texture; otherwise
  on a uniformly chosen *other* texture. So the measured rate equals `cooccurrence` exactly
  in expectation, and a classifier can use the background as evidence for k.
- incomplete activation: objects span 25-60 % of the image side, large enough that a part
  suffices for classification.
- 1..`max_objects` objects of distinct classes, occlusion (later objects over earlier ones,
  each object keeps >= `MIN_VISIBLE` of its ink visible), partial truncation at the border,
  random ink colour with shading, random background scale/flip/brightness.

Train and val use different seeds (`split_seed`) and disjoint handwriting instances
(`digit_pool`: 80 % / 20 % of the sklearn digits), so val measures generalisation to new
writers and new background crops.
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import Any, Iterator

import numpy as np
from PIL import Image

from wsss_jax.data import palette

SYNTHETIC_CLASSES = ("background", "zero", "one", "two", "three", "four", "five", "six",
                     "seven", "eight", "nine")
NUM_CLASSES = len(SYNTHETIC_CLASSES)  # 11 with background

# Bump when the generator's output changes: prepared datasets are keyed by it.
GENERATOR_VERSION = 1

INK_THRESHOLD = 0.35      # on the [0, 1] digit intensity; > 0.5 thins, < 0.25 blobs strokes
SIZE_RANGE = (0.25, 0.60)  # object height as a fraction of the image side
ASPECT_RANGE = (0.75, 1.25)  # width / height
MAX_ROTATION_DEG = 20.0
MIN_VISIBLE = 0.4          # an object keeps at least this fraction of its ink visible
MIN_INK_FRACTION = 0.005   # and at least this fraction of the image area
_UP = 40                   # the (padded 10x10) digits are upsampled once to _UP x _UP
_GLYPH_SPAN = _UP * 8 / 10  # where the original 8x8 lies in that grid
_GLYPH_OFFSET = _UP * 1 / 10

# (name, loader, tint). Grey photos get a fixed RGB tint so that all textures differ in
# colour as well as structure. The first 10 are the preferred textures of classes 1..10;
# the last two are nobody's preference (they only appear as "other" backgrounds).
TEXTURES = (
    ("brick", "skimage:brick", (1.00, 0.62, 0.48)),
    ("grass", "skimage:grass", (0.55, 0.95, 0.45)),
    ("gravel", "skimage:gravel", (1.0, 1.0, 1.0)),
    ("coffee", "skimage:coffee", None),
    ("china", "sklearn:china.jpg", None),
    ("flower", "sklearn:flower.jpg", None),
    ("hubble", "skimage:hubble_deep_field", None),
    ("ihc", "skimage:immunohistochemistry", None),
    ("rocket", "skimage:rocket", None),
    ("chelsea", "skimage:chelsea", None),
    ("moon", "skimage:moon", (0.65, 0.75, 1.00)),
    ("astronaut", "skimage:astronaut", None),
)
_TEXTURE_SCALES = (0.35, 0.5, 0.7, 1.0)  # background zoom levels (of the photo's size)


def preferred_texture(class_id: int) -> int:
  """Index into `TEXTURES` of the background that foreground class `class_id` prefers."""
  if not 1 <= class_id < NUM_CLASSES:
    raise ValueError(f"class_id must be in 1..{NUM_CLASSES - 1}, got {class_id}")
  return class_id - 1


def split_seed(seed: int, split: str) -> int:
  """The generator seed of `split` derived from the dataset seed (different per split)."""
  return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


@functools.lru_cache(maxsize=None)
def _texture_photo(index: int) -> np.ndarray:
  """uint8 [H, W, 3] photo of TEXTURES[index] (tinted if it is grey)."""
  _, source, tint = TEXTURES[index]
  lib, name = source.split(":")
  if lib == "skimage":
    import skimage.data  # pylint: disable=g-import-not-at-top
    img = getattr(skimage.data, name)()
  else:
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
    img = load_sample_image(name)
  img = np.asarray(img)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  img = img[..., :3].astype(np.float32)
  if tint is not None:
    img = img * np.asarray(tint, np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _texture_pyramid(image_size: int) -> tuple[tuple[np.ndarray, ...], ...]:
  """Per texture, the photo at each zoom level, every level at least image_size a side."""
  out = []
  for t in range(len(TEXTURES)):
    photo = _texture_photo(t)
    h, w = photo.shape[:2]
    min_scale = image_size / min(h, w)
    levels = []
    for s in sorted({max(min_scale, f) for f in _TEXTURE_SCALES}):
      size = (max(image_size, round(w * s)), max(image_size, round(h * s)))
      levels.append(np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC)))
    out.append(tuple(levels))
  return tuple(out)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, _UP, _UP] in [0, 1], targets int [N]) from sklearn load_digits."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from skimage.transform import resize  # pylint: disable=g-import-not-at-top
  d = load_digits()
  small = d.images.astype(np.float32) / 16.0  # [N, 8, 8]
  # Pad one empty pixel so the spline falls to zero at the glyph border instead of
  # being clamped (edge mode would smear border ink into a hard straight edge).
  small = np.pad(small, ((0, 0), (1, 1), (1, 1)))
  up = resize(small.transpose(1, 2, 0), (_UP, _UP), order=3, mode="constant", cval=0.0,
              anti_aliasing=False)  # trailing axis (N) is kept
  return np.clip(up.transpose(2, 0, 1), 0.0, 1.0).astype(np.float32), d.target.astype(np.int64)


def _digit_indices(pool: str) -> tuple[np.ndarray, ...]:
  """Per digit 0..9, the sklearn indices available in `pool` (all | train | val)."""
  _, targets = _digits()
  idx = np.arange(len(targets))
  if pool == "train":
    keep = idx % 5 != 0
  elif pool == "val":
    keep = idx % 5 == 0
  elif pool == "all":
    keep = np.ones_like(idx, bool)
  else:
    raise ValueError(f"digit_pool must be 'all', 'train' or 'val', got {pool!r}")
  return tuple(idx[keep & (targets == k)] for k in range(10))


def _draw_digit(glyph: np.ndarray, h: int, w: int, theta: float
                ) -> tuple[np.ndarray, np.ndarray]:
  """Renders a glyph [_UP, _UP] (its 8x8 core at h x w), rotated by theta (rad).

  Returns (ink bool [bh, bw], intensity float32 [bh, bw]) on the rotated bounding box.
  Bilinear sampling of the spline-upsampled glyph, zero outside.
  """
  c, s = np.cos(theta), np.sin(theta)
  # Box of the whole padded grid (spline overshoot can put ink just outside the 8x8 core).
  ph, pw = h * _UP / _GLYPH_SPAN, w * _UP / _GLYPH_SPAN
  bh = int(np.ceil(abs(ph * c) + abs(pw * s)))
  bw = int(np.ceil(abs(ph * s) + abs(pw * c)))
  yy = np.arange(bh, dtype=np.float32)[:, None] + 0.5 - bh / 2
  xx = np.arange(bw, dtype=np.float32)[None, :] + 0.5 - bw / 2
  # Inverse rotation: output pixel -> glyph frame (pixel units), then -> glyph grid.
  py = c * yy - s * xx
  px = s * yy + c * xx
  # The 8x8 glyph (without its 1-pixel zero padding) spans h x w.
  u = (py / h + 0.5) * _GLYPH_SPAN + _GLYPH_OFFSET - 0.5
  v = (px / w + 0.5) * _GLYPH_SPAN + _GLYPH_OFFSET - 0.5
  padded = np.pad(glyph, 1)  # zero ring: samples outside the glyph read 0
  u = np.clip(u + 1, 0, _UP + 1 - 1e-4)
  v = np.clip(v + 1, 0, _UP + 1 - 1e-4)
  u0 = np.floor(u).astype(np.int32)
  v0 = np.floor(v).astype(np.int32)
  fu, fv = u - u0, v - v0
  u1 = np.minimum(u0 + 1, _UP + 1)
  v1 = np.minimum(v0 + 1, _UP + 1)
  val = (padded[u0, v0] * (1 - fu) * (1 - fv) + padded[u0, v1] * (1 - fu) * fv +
         padded[u1, v0] * fu * (1 - fv) + padded[u1, v1] * fu * fv)
  return val >= INK_THRESHOLD, val


def _ink_color(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
  """A saturated random RGB colour that stands out from `bg_mean` (float [3])."""
  best, best_d = None, -1.0
  for _ in range(8):
    color = rng.uniform(0, 255, 3)
    color[rng.integers(3)] = rng.choice([rng.uniform(0, 60), rng.uniform(200, 255)])
    d = float(np.linalg.norm(color - bg_mean))
    if d > best_d:
      best, best_d = color, d
    if d >= 110:
      break
  return best.astype(np.float32)


def _background(rng: np.random.Generator, texture: int, image_size: int) -> np.ndarray:
  levels = _texture_pyramid(image_size)[texture]
  photo = levels[rng.integers(len(levels))]
  h, w = photo.shape[:2]
  y0 = rng.integers(h - image_size + 1)
  x0 = rng.integers(w - image_size + 1)
  crop = photo[y0:y0 + image_size, x0:x0 + image_size]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  if rng.random() < 0.5:
    crop = crop[::-1]
  gain = rng.uniform(0.8, 1.2)
  return np.clip(crop.astype(np.float32) * gain, 0, 255)


def _one_image(rng: np.random.Generator, image_size: int, cooccurrence: float,
               max_objects: int, pool: tuple[np.ndarray, ...], with_info: bool
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  glyphs, _ = _digits()
  S = image_size  # pylint: disable=invalid-name
  n_obj = int(rng.integers(1, max_objects + 1))
  classes = rng.choice(10, size=n_obj, replace=False) + 1  # class ids 1..10
  first = int(classes[0])
  if rng.random() < cooccurrence:
    texture = preferred_texture(first)
  else:
    others = [t for t in range(len(TEXTURES)) if t != preferred_texture(first)]
    texture = int(others[rng.integers(len(others))])
  image = _background(rng, texture, S)
  background = image.astype(np.uint8) if with_info else None
  mask = np.zeros((S, S), np.uint8)
  owner = np.full((S, S), -1, np.int16)  # which object painted the visible pixel
  area: list[int] = []      # ink pixels each object painted
  visible: list[int] = []   # of which still visible
  objects = []
  min_ink = max(4, int(MIN_INK_FRACTION * S * S))
  for cls in classes:
    glyph = glyphs[pool[cls - 1][rng.integers(len(pool[cls - 1]))]]
    placed = False
    for _ in range(10):  # placement attempts that respect the visibility rules
      h = max(4, round(rng.uniform(*SIZE_RANGE) * S))
      w = max(4, round(h * rng.uniform(*ASPECT_RANGE)))
      theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
      ink, val = _draw_digit(glyph, h, w, theta)
      bh, bw = ink.shape
      # Up to 15 % of the box may fall outside the image (truncated objects).
      y0 = int(rng.integers(-int(0.15 * bh), max(S - int(0.85 * bh), -int(0.15 * bh)) + 1))
      x0 = int(rng.integers(-int(0.15 * bw), max(S - int(0.85 * bw), -int(0.15 * bw)) + 1))
      ys, xs = slice(max(y0, 0), min(y0 + bh, S)), slice(max(x0, 0), min(x0 + bw, S))
      sub = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
      ink_in, val_in = ink[sub], val[sub]
      n_ink = int(ink_in.sum())
      if n_ink < min_ink:
        continue
      covered = owner[ys, xs][ink_in]
      lost = np.bincount(covered[covered >= 0], minlength=len(area))
      if any(visible[i] - lost[i] < MIN_VISIBLE * area[i] for i in range(len(area))):
        continue
      placed = True
      break
    if not placed:
      continue  # too crowded: the image simply has fewer objects
    for i in range(len(area)):
      visible[i] -= int(lost[i])
    region = image[ys, xs]
    color = _ink_color(rng, region[ink_in].mean(axis=0))
    shade = 0.7 + 0.3 * np.clip((val_in - INK_THRESHOLD) / (1 - INK_THRESHOLD), 0, 1)
    region[ink_in] = np.clip(color[None, :] * shade[ink_in][:, None], 0, 255)
    mask[ys, xs][ink_in] = cls
    owner[ys, xs][ink_in] = len(area)
    area.append(n_ink)
    visible.append(n_ink)
    if with_info:
      full = np.zeros((S, S), bool)
      full[ys, xs] = ink_in
      objects.append({"class_id": int(cls), "ink": full})
  info: dict[str, Any] = {"texture": texture, "first_class": first}
  if with_info:
    info.update(background=background, objects=objects)
  return image.astype(np.uint8), mask, info


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Multi-hot uint8 [num_classes - 1]: foreground classes present (0 and 255 ignored)."""
  present = np.bincount(mask.ravel(), minlength=256)[1:num_classes] > 0
  return present.astype(np.uint8)


def generate(num_images: int, image_size: int, seed: int, cooccurrence: float = 0.8,
             max_objects: int = 3, *, digit_pool: str = "all", id_prefix: str = "img",
             with_info: bool = False) -> Iterator[dict[str, Any]]:
  """Yields `num_images` synthetic records, deterministic given the arguments.

  Args:
    num_images: how many records.
    image_size: side S of the square images, pixels (>= 32).
    seed: generator seed (use `split_seed(seed, split)` for per-split streams).
    cooccurrence: probability that an image is drawn on its first object's preferred
      texture.
    max_objects: objects per image are uniform in 1..max_objects (distinct classes, <= 10).
    digit_pool: which handwriting instances to use: 'all', 'train' (80 %) or 'val' (20 %).
    id_prefix: record ids are f'{id_prefix}_{i:06d}'.
    with_info: also yield `info` (texture index, first class, the background before
      pasting uint8 [S, S, 3], and per object its class id and full-frame ink bool [S, S]),
      for tests and figures.

  Yields:
    {'id': str, 'image': uint8 [S, S, 3], 'mask': uint8 [S, S], 'labels': uint8 [10]}
    (plus 'info' when with_info).
  """
  if image_size < 32:
    raise ValueError(f"image_size must be >= 32, got {image_size}")
  if not 1 <= max_objects <= 10:
    raise ValueError(f"max_objects must be in 1..10, got {max_objects}")
  if not 0.0 <= cooccurrence <= 1.0:
    raise ValueError(f"cooccurrence must be in [0, 1], got {cooccurrence}")
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  pool = _digit_indices(digit_pool)
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    image, mask, info = _one_image(rng, image_size, cooccurrence, max_objects, pool,
                                   with_info)
    rec = {"id": f"{id_prefix}_{i:06d}", "image": image, "mask": mask,
           "labels": labels_from_mask(mask, NUM_CLASSES)}
    if with_info:
      rec["info"] = info
    yield rec


def generate_split(split: str, num_images: int, image_size: int, seed: int,
                   cooccurrence: float = 0.8, max_objects: int = 3
                   ) -> Iterator[dict[str, Any]]:
  """The records of split 'train' or 'val' as the builder and `export_voc_layout` make them."""
  if split not in ("train", "val"):
    raise ValueError(f"synthetic splits are 'train' and 'val', got {split!r}")
  return generate(num_images, image_size, split_seed(seed, split), cooccurrence, max_objects,
                  digit_pool=split, id_prefix=split)


def export_voc_layout(directory: str, num_train: int, num_val: int, image_size: int,
                      seed: int, cooccurrence: float = 0.8, max_objects: int = 3,
                      jpeg_quality: int = 95) -> dict[str, int]:
  """Writes the synthetic splits as a VOC 2012-layout folder readable by the `voc` builder.

  Layout: JPEGImages/<id>.jpg (quality `jpeg_quality`, no chroma subsampling; JPEG is
  lossy, so image pixels differ slightly from `generate`'s), SegmentationClass/<id>.png
  (palette PNG with the VOC palette; masks are exact), ImageSets/Segmentation/{train,val}.txt,
  classes.txt (SYNTHETIC_CLASSES, background first).

  Returns:
    {'train': num_train, 'val': num_val}.
  """
  for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
    os.makedirs(os.path.join(directory, sub), exist_ok=True)
  counts = {}
  for split, n in (("train", num_train), ("val", num_val)):
    ids = []
    for rec in generate_split(split, n, image_size, seed, cooccurrence, max_objects):
      Image.fromarray(rec["image"]).save(
          os.path.join(directory, "JPEGImages", rec["id"] + ".jpg"), format="JPEG",
          quality=jpeg_quality, subsampling=0)
      palette.save_palette_png(os.path.join(directory, "SegmentationClass", rec["id"] + ".png"),
                       rec["mask"])
      ids.append(rec["id"])
    with open(os.path.join(directory, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
      f.write("".join(i + "\n" for i in ids))
    counts[split] = len(ids)
  with open(os.path.join(directory, "classes.txt"), "w") as f:
    f.write("".join(c + "\n" for c in SYNTHETIC_CLASSES))
  return counts
