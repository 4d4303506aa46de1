"""CAM inference math (wsss_jax.ops.cam) and resizing (wsss_jax.ops.resize), hand-computed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import metrics
from wsss_jax.ops import resize


# ---------------------------------------------------------------------------------------
# multiscale_cams
# ---------------------------------------------------------------------------------------


def _column_ramp(x):
  """A 'model' whose single class map is (column index - 1), independent of the pixels."""
  b, h, w = x.shape[:3]
  ramp = jnp.arange(w, dtype=jnp.float32) - 1.0
  return jnp.broadcast_to(ramp[None, None, :, None], (b, h, w, 1))


def test_relu_before_flip_sum():
  images = jnp.zeros((1, 2, 4, 3))
  labels = jnp.ones((1, 1))
  high, _ = cam_ops.multiscale_cams(_column_ramp, images, None, labels, scales=(1.0,),
                                    flip=True, normalize=False)
  # relu(c - 1) = [0, 0, 1, 2]; flipped pass flipped back: relu((3 - c) - 1) = [2, 1, 0, 0].
  np.testing.assert_allclose(high[0, :, :, 0], [[2, 1, 1, 2]] * 2)
  high, _ = cam_ops.multiscale_cams(_column_ramp, images, None, labels, scales=(1.0,),
                                    flip=False, normalize=False)
  np.testing.assert_allclose(high[0, :, :, 0], [[0, 0, 1, 2]] * 2)


def test_scale_sum_and_strided_size():
  images = jnp.full((1, 8, 12, 3), 0.5)
  labels = jnp.ones((1, 2))
  seen = []

  def fn(x):
    seen.append(x.shape)
    return x[..., :2] * jnp.array([1.0, -1.0])     # class 2 is negative -> ReLU'd to 0

  high, low = cam_ops.multiscale_cams(fn, images, None, labels, scales=(1.0, 0.5, 1.5),
                                      flip=True, normalize=False)
  # Every pass returns 0.5 (constant image); 3 scales x (image + flip) = 6 x 0.5 = 3.
  np.testing.assert_allclose(high[..., 0], 3.0, rtol=1e-5)
  np.testing.assert_allclose(low[..., 0], 3.0, rtol=1e-5)
  np.testing.assert_allclose(high[..., 1], 0.0)
  assert high.shape == (1, 8, 12, 2) and low.shape == (1, 2, 3, 2)
  assert seen == [(2, 8, 12, 3), (2, 4, 6, 3), (2, 12, 18, 3)]


def test_class_restriction_and_max_normalisation_over_valid_pixels():
  # Two images padded to 4x4; image 0 is 2x3, image 1 is 4x4. The "model" returns a
  # huge value in the padding of image 0, which must not enter its max.
  base = np.arange(16, dtype=np.float32).reshape(4, 4) + 1.0
  maps = np.stack([base, 2 * base], axis=-1)                       # [4, 4, 2]
  maps0 = maps.copy()
  maps0[2:, :] = 1000.0
  maps0[:, 3:] = 1000.0
  raw = jnp.asarray(np.stack([maps0, maps]))                        # [2, 4, 4, 2]
  fn = lambda x: raw[: x.shape[0]] if x.shape[0] == 2 else jnp.concatenate([raw, raw[:, :, ::-1]])
  labels = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  size = jnp.array([[2, 3], [4, 4]])
  high, low = cam_ops.multiscale_cams(fn, jnp.zeros((2, 4, 4, 3)), None, labels,
                                      scales=(1.0,), flip=False, size=size, stride=2)
  # Image 0: valid pixels rows 0-1, cols 0-2 of base; max there is base[1, 2] = 7.
  expected0 = np.where((np.arange(4)[:, None] < 2) & (np.arange(4)[None] < 3), base, 0.0)
  np.testing.assert_allclose(high[0, ..., 0], expected0 / (7 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(high[0, ..., 1], 0.0)                 # class absent
  np.testing.assert_allclose(high[1, ..., 1], 2 * base / (32 + 1e-5), rtol=1e-6)
  # Same result from the equivalent valid mask.
  valid = jnp.asarray(np.stack([expected0 > 0, np.ones((4, 4), bool)]))
  high_v, low_v = cam_ops.multiscale_cams(fn, jnp.zeros((2, 4, 4, 3)), valid, labels,
                                          scales=(1.0,), flip=False, stride=2)
  np.testing.assert_allclose(high_v, high, rtol=1e-6)
  np.testing.assert_allclose(low_v, low, rtol=1e-6)
  # Strided (2x2) cells of image 0: rows < ceil(2/2) = 1, cols < ceil(3/2) = 2 are valid;
  # the max over them is 1 and the invalid row is 0.
  assert float(jnp.abs(low[0, 1:, :, 0]).max()) == 0.0
  np.testing.assert_allclose(low[0, 0, :, 0].max(), 1.0, atol=1e-4)


def test_unbatched_and_jit():
  image = jnp.asarray(np.random.default_rng(0).normal(size=(6, 10, 3)).astype(np.float32))
  labels = jnp.array([1.0, 1.0, 0.0])
  fn = lambda x: jnp.concatenate([x[..., :2], -x[..., :1]], axis=-1)
  run = jax.jit(lambda im, lab: cam_ops.multiscale_cams(fn, im, None, lab,
                                                        scales=(1.0, 0.5), flip=True))
  high, low = run(image, labels)
  assert high.shape == (6, 10, 3) and low.shape == (2, 3, 3)
  np.testing.assert_allclose(high[..., :2].max(axis=(0, 1)), 1.0, atol=1e-4)
  assert float(jnp.abs(high[..., 2]).max()) == 0.0


def test_max_normalize():
  cams = jnp.array([[[[1.0], [4.0]], [[2.0], [100.0]]]])
  valid = jnp.array([[[True, True], [True, False]]])
  np.testing.assert_allclose(cam_ops.max_normalize(cams, valid)[0, ..., 0],
                             [[1 / 4, 1.0], [0.5, 0.0]], atol=1e-5)


# ---------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------

# 1 x 4 pixels, K = 3 foreground channels (class ids 1..3).
CAMS = jnp.array([[[0.10, 0.00, 0.90],     # class 3 if present
                   [0.50, 0.60, 0.00],     # class 2
                   [0.20, 0.20, 0.10],     # tie 1/2 -> class 1 (first)
                   [0.04, 0.03, 0.00]]])   # weak everywhere


def test_cams_to_labels_hand_computed():
  labels = jnp.array([1.0, 1.0, 1.0])
  np.testing.assert_array_equal(cam_ops.cams_to_labels(CAMS, labels, 0.3), [[3, 2, 0, 0]])
  np.testing.assert_array_equal(cam_ops.cams_to_labels(CAMS, labels, 0.15), [[3, 2, 1, 0]])
  # A CAM equal to t loses to the background plane (ties go to channel 0).
  np.testing.assert_array_equal(cam_ops.cams_to_labels(CAMS, labels, 0.2), [[3, 2, 0, 0]])
  # Class 3 absent: pixel 0 falls back to class 1 (0.10 > 0.05).
  absent = jnp.array([1.0, 1.0, 0.0])
  np.testing.assert_array_equal(cam_ops.cams_to_labels(CAMS, absent, 0.05), [[1, 2, 1, 0]])
  # No foreground label at all: background everywhere.
  np.testing.assert_array_equal(cam_ops.cams_to_labels(CAMS, jnp.zeros(3), 0.0), [[0] * 4])
  valid = jnp.array([[True, False, True, True]])
  np.testing.assert_array_equal(cam_ops.cams_to_labels(CAMS, labels, 0.3, valid),
                                [[3, 255, 0, 0]])
  # Batched with a per-image threshold.
  batch = jnp.stack([CAMS, CAMS])
  out = cam_ops.cams_to_labels(batch, jnp.ones((2, 3)), jnp.array([0.3, 0.15]))
  np.testing.assert_array_equal(out, [[[3, 2, 0, 0]], [[3, 2, 1, 0]]])


def test_double_threshold_labels():
  labels = jnp.array([1.0, 1.0, 1.0])
  # fg t = 0.3: [3, 2, 0, 0]; bg t = 0.05: [3, 2, 1, 0] -> [3, 2, 255, 0].
  np.testing.assert_array_equal(
      cam_ops.double_threshold_labels(CAMS, labels, 0.3, 0.05), [[3, 2, 255, 0]])
  np.testing.assert_array_equal(
      cam_ops.combine_double_threshold(jnp.array([1, 0, 0, 255]), jnp.array([1, 1, 0, 0])),
      [1, 255, 0, 255])


def test_double_threshold_labels_crf_keeps_confident_regions():
  # Two flat colour regions; the CAM of class 2 covers the left one. The label CRF must
  # keep the confident labels: class 2 on the left, background on the right.
  image = np.zeros((1, 12, 16, 3), np.uint8)
  image[:, :, :8] = (200, 40, 40)
  image[:, :, 8:] = (30, 160, 30)
  cams = np.zeros((1, 12, 16, 3), np.float32)
  cams[:, :, :8, 1] = 0.9
  labels = jnp.array([[0.0, 1.0, 0.0]])
  out = cam_ops.double_threshold_labels_crf(jnp.asarray(cams), labels, jnp.asarray(image),
                                            0.3, 0.05, num_iters=5)
  expected = np.zeros((1, 12, 16), np.int32)
  expected[:, :, :8] = 2
  np.testing.assert_array_equal(out, expected)


def test_crf_refine_labels_on_the_present_classes_only_equals_all_channels():
  # Random smooth images and label maps over 6 foreground classes, 0-2 present per image
  # (+ stray labels of absent classes and 255s, both "unsure"): the CRF on the
  # background + present channels (max_labels=4) gives the full 7-channel result.
  rng = np.random.default_rng(0)
  b, h, w, k = 4, 20, 24, 6
  images = np.repeat(np.repeat(rng.integers(0, 256, (b, 5, 6, 3)), 4, 1), 4, 2)
  labels = np.zeros((b, k), np.float32)
  for i, present in enumerate([[], [2], [0, 5], [1, 3, 4]]):
    labels[i, present] = 1.0
  maps = np.zeros((b, h, w), np.int32)
  for i in range(b):
    ids = np.concatenate([[0], np.flatnonzero(labels[i]) + 1])
    maps[i] = np.repeat(np.repeat(rng.choice(ids, (5, 6)), 4, 0), 4, 1)
  maps[1, 0, :5] = 4      # an absent class: unsure
  maps[2, 3, 3:9] = 255   # unsure
  valid = np.ones((b, h, w), bool)
  valid[3, -3:] = False
  full = cam_ops.crf_refine_labels(maps, labels, images, num_iters=5, valid=valid)
  compact = jax.jit(lambda *a: cam_ops.crf_refine_labels(*a, num_iters=5, valid=valid,
                                                         max_labels=4))(maps, labels, images)
  np.testing.assert_array_equal(compact, full)
  # The refinement did something and only ever gives background or a present class.
  assert (np.asarray(full) != maps).any()
  for i in range(b):
    allowed = {0, 255} | set((np.flatnonzero(labels[i]) + 1).tolist())
    assert set(np.unique(np.asarray(compact[i])).tolist()) <= allowed


THRESHOLDS = (0.45, 0.05, 0.3, 0.2, 0.15, 0.6)


def test_threshold_sweep_equals_loop():
  rng = np.random.default_rng(0)
  c = 5
  cams = jnp.asarray(rng.random((3, 9, 11, c - 1)).astype(np.float32) ** 2)
  cams = cams.at[0, 0, 0, 1].set(0.3)                 # exact tie with a threshold
  labels = jnp.asarray((rng.random((3, c - 1)) < 0.6).astype(np.float32)).at[2].set(0.0)
  gt = rng.integers(0, c, (3, 9, 11))
  gt[rng.random(gt.shape) < 0.1] = 255
  valid = jnp.asarray(rng.random((3, 9, 11)) < 0.9)
  sweep = jax.jit(cam_ops.threshold_sweep, static_argnums=4)(cams, labels, jnp.asarray(gt),
                                                               jnp.asarray(THRESHOLDS), c,
                                                               valid)
  assert sweep.shape == (len(THRESHOLDS), c, c) and sweep.dtype == jnp.int32
  loop = np.stack([metrics.confusion_matrix_np(
      gt, np.asarray(cam_ops.cams_to_labels(cams, labels, t)), c, np.asarray(valid))
                   for t in THRESHOLDS])
  np.testing.assert_array_equal(sweep, loop)
  np.testing.assert_array_equal(
      cam_ops.sweep_reference(cams, labels, gt, THRESHOLDS, c, valid), loop)


# ---------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------


def _torch_bilinear_reference(x, out_h, out_w, align_corners):
  """NumPy transcription of PyTorch's bilinear upsample_bilinear2d (no antialias)."""
  in_h, in_w = x.shape[:2]

  def coords(n_in, n_out):
    if align_corners:
      scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
      src = np.arange(n_out) * scale
    else:
      src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  r0, r1, fr = coords(in_h, out_h)
  c0, c1, fc = coords(in_w, out_w)
  top = x[r0][:, c0] * (1 - fc)[None, :, None] + x[r0][:, c1] * fc[None, :, None]
  bot = x[r1][:, c0] * (1 - fc)[None, :, None] + x[r1][:, c1] * fc[None, :, None]
  return top * (1 - fr)[:, None, None] + bot * fr[:, None, None]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out", [(9, 14), (3, 4), (5, 7)])
def test_resize_bilinear_matches_pytorch_formula(align_corners, out):
  x = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
  got = resize.resize_bilinear(jnp.asarray(x), out, align_corners=align_corners)
  np.testing.assert_allclose(got, _torch_bilinear_reference(x, *out, align_corners),
                             atol=1e-5)
  batched = resize.resize_bilinear(jnp.asarray(x)[None], out, align_corners=align_corners)
  np.testing.assert_allclose(batched[0], got, atol=1e-6)


def test_resize_align_corners_hand_computed():
  x = jnp.array([[0.0, 3.0]])[..., None]                           # [1, 2, 1]
  np.testing.assert_allclose(resize.resize_bilinear(x, (1, 4), align_corners=True)[0, :, 0],
                             [0, 1, 2, 3], atol=1e-6)
  np.testing.assert_allclose(resize.resize_bilinear(x, (1, 4), align_corners=False)[0, :, 0],
                             [0, 0.75, 2.25, 3], atol=1e-6)


def test_resize_nearest_labels():
  labels = jnp.array([[0, 1, 255], [2, 3, 4]], jnp.uint8)
  up = resize.resize_nearest(labels, (4, 6))
  assert up.dtype == jnp.uint8
  np.testing.assert_array_equal(up, np.repeat(np.repeat(np.asarray(labels), 2, 0), 2, 1))
  down = resize.resize_nearest(jnp.arange(8).reshape(1, 8), (1, 3))
  np.testing.assert_array_equal(down, [[1, 4, 6]])                 # centres 1.33, 4, 6.67
  np.testing.assert_array_equal(resize.resize_nearest(jnp.arange(8).reshape(1, 8), (1, 3),
                                                      half_pixel=False), [[0, 2, 5]])
  batch = resize.resize_nearest(jnp.stack([labels, labels]), (4, 6))
  assert batch.shape == (2, 4, 6)
