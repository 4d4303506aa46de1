"""Threshold sweep, CAM post-processing and pseudo-label rules against hand-computed cases."""
import jax
import numpy as np
import jax.numpy as jnp
import pytest

from wsss_jax.ops import cam as cam_ops
from wsss_jax.ops import crf as crf_lib
from wsss_jax.ops import metrics
from wsss_jax.ops import pseudo_labels as pl


def test_threshold_predictions_hand_case():
  # Two fg classes (ids 1, 2) on a 1x3 image.
  scores = np.array([[[0.9, 0.2, 0.4]],
                     [[0.1, 0.3, 0.4]]], np.float32)          # [K=2, H=1, W=3]
  preds = cam_ops.threshold_labels(scores.transpose(1, 2, 0), np.ones(2),
                                   np.array([0.25, 0.35, 0.4]))
  # t=0.25: px0 -> 1, px1 -> 2 (0.3 > 0.25), px2: tie 0.4/0.4 -> first fg = 1.
  # t=0.35: px1 falls to bg. t=0.4: px2's best equals t -> background (ties go to bg).
  np.testing.assert_array_equal(preds[:, 0], [[1, 2, 1], [1, 0, 1], [1, 0, 0]])


def test_threshold_predictions_without_labels_is_background():
  preds = cam_ops.threshold_labels(np.ones((2, 2, 3), np.float32), np.zeros(3),
                                   np.array([0.1, 0.5]))
  assert preds.shape == (2, 2, 2) and not preds.any()


def test_sweep_miou_from_hand_confusion():
  gt = np.array([[0, 1], [1, 255]])
  scores = np.array([[[0.2, 0.6], [0.5, 0.9]]], np.float32)
  t = np.array([0.1, 0.55])
  preds = cam_ops.threshold_labels(scores.transpose(1, 2, 0), np.ones(1), t)
  mious = [metrics.iou_from_confusion_np(metrics.confusion_matrix_np(gt, p, 2))[1]
           for p in preds]
  # t=0.1: everything fg -> bg IoU 0/1, fg IoU 2/3 -> mIoU 1/3.
  # t=0.55: preds [[0,1],[0,x]] -> bg IoU 1/2, fg IoU 1/2 -> 0.5.
  np.testing.assert_allclose(mious, [1 / 3, 0.5])


def test_pseudo_labels_padding_is_ignored():
  cams = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0, 2].set(1.0)
  valid = jnp.array([[[True, True], [True, False]]])
  out = pl.pseudo_labels(cams, jnp.array([[0, 0, 1.0]]), jnp.zeros((1, 2, 2, 3)), valid,
                         mode="threshold", fg_threshold=0.5, bg_threshold=0.05,
                         crf_params=crf_lib.LABEL_CRF)
  np.testing.assert_array_equal(out, [[[3, 0], [0, 255]]])


def test_pseudo_labels_crf_follows_colour_edge():
  # Two flat colour regions; the CAM of class 1 spills 3 px over the colour edge. The
  # label CRF must pull the labels back to the edge (bilateral kernel, srgb 5).
  h = w = 24
  cams = np.zeros((1, h, w, 2), np.float32)
  cams[0, :, :15, 0] = 1.0      # class 1 claims columns 0..14; the object is 0..11
  image = np.full((1, h, w, 3), 220.0, np.float32)
  image[0, :, :12] = 40.0
  labels = jnp.array([[1.0, 0.0]])
  valid = jnp.ones((1, h, w), bool)
  plain = pl.pseudo_labels(jnp.asarray(cams), labels, image, valid, mode="double",
                           fg_threshold=0.3, bg_threshold=0.05,
                           crf_params=crf_lib.LABEL_CRF)
  refined = pl.pseudo_labels(jnp.asarray(cams), labels, image, valid, mode="crf",
                             fg_threshold=0.3, bg_threshold=0.05,
                             crf_params=crf_lib.LABEL_CRF, crf_iters=5)
  np.testing.assert_array_equal(plain[0, :, :15], 1)
  np.testing.assert_array_equal(plain[0, :, 15:], 0)
  np.testing.assert_array_equal(refined[0, :, :12], 1)
  np.testing.assert_array_equal(refined[0, :, 12:], 0)


def test_pseudo_labels_rejects_unknown_mode():
  with pytest.raises(ValueError, match="bogus"):
    pl.pseudo_labels(jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 1)), jnp.zeros((1, 2, 2, 3)),
                     jnp.ones((1, 2, 2), bool), mode="bogus", fg_threshold=0.3,
                     bg_threshold=0.05, crf_params=crf_lib.LABEL_CRF)


def test_host_threshold_rule_equals_device_rule():
  # CAMs as stored (absent classes are 0) give the labels of ops.cam.cams_to_labels.
  rng = np.random.default_rng(1)
  cams = rng.random((9, 7, 4)).astype(np.float32)      # [H, W, K]
  labels = np.array([1.0, 0.0, 1.0, 1.0])
  dense = cams * labels                                 # absent classes are 0 on disk
  thresholds = np.array([0.05, 0.3, 0.5, 0.8], np.float32)
  host = cam_ops.threshold_labels(dense, labels, thresholds)
  for t, pred in zip(thresholds, host):
    np.testing.assert_array_equal(pred, cam_ops.cams_to_labels(cams, labels, float(t)))


def test_multiscale_probs_flip_and_scale():
  from wsss_jax.ops import seg_inference
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
  # A pixelwise "model": flipping the input and the output back is the identity, and a
  # constant-per-channel input survives any rescale, so each pass is softmax(x).
  const = jnp.broadcast_to(jnp.array([0.5, -1.0, 2.0]), (2, 8, 8, 3))
  probs = seg_inference.multiscale_probs(lambda x: x, const, scales=(1.0, 0.5, 1.5),
                                         flip=True)
  np.testing.assert_allclose(probs, jax.nn.softmax(const, axis=-1), atol=1e-5)
  # A position-dependent map: the flipped pass, mirrored back, lines up with the first.
  probs = seg_inference.multiscale_probs(lambda x: x, images, scales=(1.0,), flip=True)
  np.testing.assert_allclose(probs, jax.nn.softmax(images, axis=-1), atol=1e-5)


def test_mean_average_precision_hand_case():
  labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], bool)
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.3, 0.2, 0.6]])
  mean_ap, aps = metrics.mean_average_precision(scores, labels)
  # Class 0: scores 0.9, 0.2, 0.3 -> positives (images 0, 2) ranked 1st and 2nd -> AP 1.
  # Class 1: scores 0.1, 0.8, 0.2 -> positives (images 1, 2) ranked 1st and 2nd -> AP 1.
  assert aps[0] == pytest.approx(1.0) and aps[1] == pytest.approx(1.0)
  assert np.isnan(aps[2])                 # no positive image: excluded from the mean
  assert mean_ap == pytest.approx(1.0)
  scores[2, 0] = 0.05                     # positive image 2 now ranks below negative 1
  # Precision at the positives: 1/1 (image 0), then 2/3 (image 2 after image 1).
  _, aps = metrics.mean_average_precision(scores, labels)
  assert aps[0] == pytest.approx((1 + 2 / 3) / 2)
