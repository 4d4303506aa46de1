"""Per-example transforms: geometry, padding, image/mask correspondence, jitter, eval."""
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.data import augment_ops
from wsss_jax.data import transforms as T

# Class k is painted with colour CODES[k]: points on a circle in RG, so no convex
# combination of two or more codes (what bilinear resizing makes at class boundaries)
# rounds to a code, unless it is >99% one code, whose pixel is then the nearest one.
NUM_CODES = 6
_ANGLES = 2 * np.pi * np.arange(NUM_CODES) / NUM_CODES
CODES = np.stack([128 + 100 * np.cos(_ANGLES), 128 + 100 * np.sin(_ANGLES),
                  np.full(NUM_CODES, 200.0)], -1).round().astype(np.uint8)


def coded_record(rng, h, w, idx=0):
  """Blocky random mask (blocks 3-12 px) and an image painted with its class codes."""
  bh, bw = rng.integers(3, 13, 2)
  coarse = rng.integers(0, NUM_CODES, (-(-h // bh), -(-w // bw)))
  mask = np.repeat(np.repeat(coarse, bh, 0), bw, 1)[:h, :w].astype(np.uint8)
  return {"id": f"rec{idx}", "image": CODES[mask], "mask": mask,
          "labels": np.eye(NUM_CODES - 1, dtype=np.uint8)[idx % (NUM_CODES - 1)]}


def decode(image_norm):
  """Class of each pixel whose de-normalised colour is exactly a code, else -1."""
  rgb = T.denormalize(image_norm)
  hit = (rgb[..., None, :] == CODES).all(-1)  # [H, W, K]
  return np.where(hit.any(-1), hit.argmax(-1), -1)


def random_record(rng, h, w, idx=0):
  return {"id": f"rnd{idx}", "image": rng.integers(0, 256, (h, w, 3), np.uint8),
          "mask": rng.integers(0, 21, (h, w), np.uint8),
          "labels": rng.integers(0, 2, 20).astype(np.uint8)}


def test_normalize_roundtrip_numpy_and_jax():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (2, 5, 7, 3), np.uint8)
  x = T.normalize(img)
  assert x.dtype == np.float32 and x.shape == img.shape
  ref = (img / 255.0 - T.IMAGENET_MEAN) / T.IMAGENET_STD
  np.testing.assert_allclose(x, ref, atol=1e-5)
  np.testing.assert_array_equal(T.denormalize(x), img)
  # Strided (flipped) input and a single pixel.
  np.testing.assert_allclose(T.normalize(img[:, :, ::-1]), ref[:, :, ::-1], atol=1e-5)
  np.testing.assert_allclose(T.normalize(img[0, 0, 0]), ref[0, 0, 0], atol=1e-5)
  # jax in, jax out (others normalise on device).
  xj = T.normalize(jnp.asarray(img))
  assert isinstance(xj, type(jnp.zeros(1))) and xj.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(xj), ref, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(T.denormalize(xj)), img)
  np.testing.assert_allclose(T.denormalize(x, as_uint8=False), img, atol=1e-3)


def test_resize_mask_is_half_pixel_nearest_and_windows_match():
  rng = np.random.default_rng(1)
  mask = rng.integers(0, 21, (37, 53), np.uint8)
  img = rng.integers(0, 256, (37, 53, 3), np.uint8)
  for size in [(37, 53), (20, 31), (74, 106), (55, 70)]:
    full = T.resize_mask(mask, size)
    ys = np.floor((np.arange(size[0]) + 0.5) * 37 / size[0]).astype(int)
    xs = np.floor((np.arange(size[1]) + 0.5) * 53 / size[1]).astype(int)
    np.testing.assert_array_equal(full, mask[ys][:, xs])
    window = (3, 5, size[0] - 7, size[1] - 9)
    sl = np.s_[3:size[0] - 4, 5:size[1] - 4]
    np.testing.assert_array_equal(T.resize_mask(mask, size, window), full[sl])
    full_img = T.resize_image(img, size)
    assert full_img.shape == (*size, 3) and full_img.dtype == np.uint8
    win_img = T.resize_image(img, size, window).astype(int)
    assert np.abs(win_img - full_img[sl]).max() <= 2  # PIL rounding, same geometry


def test_train_transform_shapes_and_padding():
  rng = np.random.default_rng(2)
  ex = random_record(rng, 40, 50)
  ex["mask"][ex["mask"] == 0] = 1  # so 255 in the output means padding only
  ex["index"] = 7
  out = T.TrainTransform(64, (1.0, 1.0), flip=True, color_jitter=0.3).random_map(
      ex, np.random.default_rng(0))
  assert set(out) == {"image", "mask", "valid", "labels", "index"}
  assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.float32
  assert out["mask"].shape == (64, 64) and out["mask"].dtype == np.int32
  assert out["labels"].dtype == np.float32 and out["index"] == 7
  pad = out["mask"] == 255
  assert pad.sum() == 64 * 64 - 40 * 50
  np.testing.assert_array_equal(out["valid"], ~pad)
  assert (out["image"][pad] == 0.0).all()          # exactly 0 after normalisation
  assert (np.abs(out["image"][~pad]).sum(-1) > 0).mean() > 0.99
  assert out["image"].min() >= T.normalize(np.zeros(3, np.uint8)).min() - 1e-6
  assert out["image"].max() <= T.normalize(np.full(3, 255, np.uint8)).max() + 1e-6


@pytest.mark.parametrize("crop", [32, 48])
def test_image_and_mask_stay_aligned_through_every_augmentation(crop):
  rng = np.random.default_rng(3)
  tf = T.TrainTransform(crop, (0.5, 1.5), flip=True, color_jitter=0.0)
  decodable = []
  for trial in range(60):
    h, w = rng.integers(15, 70, 2)
    out = tf.random_map(coded_record(rng, h, w), np.random.default_rng(trial))
    image, mask = out["image"], out["mask"]
    pad = mask == 255
    assert (image[pad] == 0.0).all()
    cls = decode(image)
    known = (cls >= 0) & ~pad
    np.testing.assert_array_equal(mask[known], cls[known], err_msg=f"trial {trial}")
    assert (cls[pad] == -1).all()
    decodable.append(known.sum() / max(1, (~pad).sum()))
  # Not vacuous: most image pixels decode (block interiors).
  assert np.mean(decodable) > 0.5


@pytest.mark.parametrize("axis", [0, 1])
def test_mask_is_subpixel_aligned_with_image(axis):
  """Image = coordinate ramp (bilinear reproduces a linear ramp at the sample centre u as
  u - 0.5), mask = the same coordinate; the nearest pixel is floor(u), so mask - value
  averages 0. A half-pixel convention mismatch shifts the mean by 0.33-1."""
  rng = np.random.default_rng(11)
  tf = T.TrainTransform(48, (0.5, 1.5), flip=True, color_jitter=0.0)
  diffs = []
  for trial in range(30):
    h, w = rng.integers(40, 120, 2)
    yy, xx = np.mgrid[:h, :w]
    coord = (yy, xx)[axis].astype(np.uint8)
    ex = {"id": "ramp", "image": np.stack([coord, coord, np.zeros_like(coord)], -1),
          "mask": coord, "labels": np.zeros(3, np.uint8)}
    out = tf.random_map(ex, np.random.default_rng(trial))
    value = T.denormalize(out["image"], as_uint8=False)[..., 0]
    m = out["mask"]
    n = (h, w)[axis]
    keep = (m != 255) & (m >= 3) & (m <= n - 4)  # away from borders (filter truncation)
    d = m[keep] - value[keep]
    assert np.abs(d).max() <= 1.01, trial
    diffs.append(d)
  diffs = np.concatenate(diffs)
  assert len(diffs) > 10000
  assert abs(diffs.mean()) < 0.08, diffs.mean()


def test_flip_mirrors_image_and_mask_together():
  rng = np.random.default_rng(4)
  flipped = 0
  for trial in range(20):
    ex = coded_record(rng, *rng.integers(20, 60, 2))
    kw = dict(crop_size=40, scale_range=(0.6, 1.4), color_jitter=0.0)
    a = T.TrainTransform(flip=False, **kw).random_map(ex, np.random.default_rng(trial))
    b = T.TrainTransform(flip=True, **kw).random_map(ex, np.random.default_rng(trial))
    if np.array_equal(a["mask"], b["mask"]) and np.array_equal(a["image"], b["image"]):
      continue
    np.testing.assert_array_equal(b["mask"], a["mask"][:, ::-1])
    np.testing.assert_array_equal(b["image"], a["image"][:, ::-1])
    flipped += 1
  assert 3 <= flipped <= 17


def test_fused_transform_equals_op_by_op_composition():
  rng = np.random.default_rng(5)
  for trial in range(40):
    ex = random_record(rng, *rng.integers(10, 90, 2))
    kw = dict(crop_size=48, scale_range=(0.5, 1.5), flip=True, color_jitter=0.4)
    a = T.TrainTransform(**kw).random_map(ex, np.random.default_rng(trial))
    b = augment_ops.unfused_train_ops(**kw).random_map(ex, np.random.default_rng(trial))
    np.testing.assert_array_equal(a["mask"], b["mask"])
    # PIL's windowed resize rounds differently by <= 2 grey levels (~0.035 normalised).
    np.testing.assert_allclose(a["image"], b["image"], atol=0.04)
    assert (b["image"][b["mask"] == 255] == 0).all()


def test_train_valid_marks_where_the_image_lies():
  """`valid` against a NumPy reference: a record whose mask is 1 everywhere shows where
  the (rescaled, cropped, flipped) image lies as `mask != 255`; a second record with the
  same geometry but 255 inside the image shows `valid` is not `mask != 255`."""
  rng = np.random.default_rng(11)
  padded = 0
  for trial in range(30):
    h, w = rng.integers(10, 90, 2)
    ex = random_record(rng, h, w)
    ones = {**ex, "mask": np.ones((h, w), np.uint8)}
    kw = dict(crop_size=48, scale_range=(0.5, 1.5), flip=True, color_jitter=0.4)
    ref = T.TrainTransform(**kw).random_map(ones, np.random.default_rng(trial))["mask"] != 255
    holes = {**ex, "mask": np.full((h, w), 255, np.uint8)}
    out = T.TrainTransform(**kw).random_map(holes, np.random.default_rng(trial))
    assert out["valid"].dtype == bool and out["valid"].shape == (48, 48)
    np.testing.assert_array_equal(out["valid"], ref)
    assert (out["mask"] == 255).all()
    # The image region is one axis-aligned rectangle; padding is exactly 0.
    rows, cols = ref.any(axis=1), ref.any(axis=0)
    np.testing.assert_array_equal(ref, rows[:, None] & cols[None, :])
    assert (out["image"][~out["valid"]] == 0.0).all()
    # The op-by-op composition marks the same pixels.
    b = augment_ops.unfused_train_ops(**kw).random_map(ex, np.random.default_rng(trial))
    np.testing.assert_array_equal(b["valid"], out["valid"])
    padded += int((~ref).any())
  assert padded >= 10  # the draws exercise padding


def test_color_jitter_matches_sequential_ops():
  """The analytic composition equals applying brightness/contrast/saturation in order
  (torchvision formulas, clamped once at the end)."""
  rng = np.random.default_rng(6)
  img = rng.integers(60, 190, (9, 11, 3), np.uint8)
  gray = lambda x: x @ np.array([0.299, 0.587, 0.114])
  for trial in range(20):
    params = T.draw_jitter(np.random.default_rng(trial), 0.4)
    x = img.astype(np.float64)
    for op in params.order:
      f = (params.brightness, params.contrast, params.saturation)[op]
      if op == 0:
        x = f * x
      elif op == 1:
        x = f * x + (1 - f) * gray(x).mean()
      else:
        x = f * x + (1 - f) * gray(x)[..., None]
    ref = T.normalize(np.clip(x, 0, 255))
    np.testing.assert_allclose(T._jitter_normalize(img, params), ref, atol=1e-4)
    # The unfused op agrees too.
    out = augment_ops.ColorJitter(0.4).random_map({"image": img}, np.random.default_rng(trial))
    np.testing.assert_allclose(out["image"], np.clip(x, 0, 255), atol=1e-3)
  for f in T.draw_jitter(np.random.default_rng(0), 0.3)[:3]:
    assert 0.7 <= f <= 1.3


def test_zero_jitter_no_scale_is_plain_normalisation():
  rng = np.random.default_rng(7)
  ex = random_record(rng, 30, 30)
  out = T.TrainTransform(30, (1.0, 1.0), flip=False, color_jitter=0.0).random_map(
      ex, np.random.default_rng(0))
  np.testing.assert_allclose(out["image"], T.normalize(ex["image"]), atol=1e-6)
  np.testing.assert_array_equal(out["mask"], ex["mask"])


def test_eval_transform_pads_bottom_right():
  rng = np.random.default_rng(8)
  ex = random_record(rng, 30, 45)
  ex["index"] = 3
  out = T.EvalTransform(64).map(ex)
  assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.float32
  assert out["mask"].dtype == np.int32 and out["valid"].dtype == bool
  np.testing.assert_allclose(out["image"][:30, :45], T.normalize(ex["image"]), atol=1e-6)
  np.testing.assert_array_equal(out["mask"][:30, :45], ex["mask"])
  assert out["valid"][:30, :45].all() and out["valid"].sum() == 30 * 45
  assert (out["image"][~out["valid"]] == 0).all() and (out["mask"][~out["valid"]] == 255).all()
  np.testing.assert_array_equal(out["size"], [30, 45])
  assert out["index"] == 3 and out["id"] == "rnd0"


def test_eval_transform_oversize():
  rng = np.random.default_rng(9)
  ex = random_record(rng, 40, 100)
  with pytest.raises(ValueError, match=r"'rnd0'.*40x100.*64x64"):
    T.EvalTransform(64).map(ex)
  out = T.EvalTransform(64, oversize="resize").map(ex)
  np.testing.assert_array_equal(out["size"], [26, 64])
  assert out["valid"].sum() == 26 * 64 and out["image"].shape == (64, 64, 3)


def test_bad_records_name_the_id():
  rng = np.random.default_rng(10)
  ex = random_record(rng, 20, 20)
  bad_mask = {**ex, "mask": ex["mask"][:10]}
  with pytest.raises(ValueError, match="'rnd0'.*mask shape"):
    T.TrainTransform(16).random_map(bad_mask, np.random.default_rng(0))
  gray = {**ex, "image": ex["image"][..., 0]}
  with pytest.raises(ValueError, match="'rnd0'.*uint8 \\[H, W, 3\\]"):
    T.EvalTransform(32).map(gray)
