"""Confusion matrix, IoU / mIoU and FP/FN over union (wsss_jax.ops.metrics, METHODS §1.2)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wsss_jax.ops import metrics

# 3 classes. Rows = GT, columns = prediction; one pixel of each kind is counted by hand.
GT = np.array([[0, 0, 1, 1],
               [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 2, 255]])
# Counted pixels (gt != 255 and pred in range): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0).
EXPECTED = np.array([[1, 1, 0],
                     [0, 2, 0],
                     [1, 0, 1]])


def test_confusion_matrix_hand_computed():
  conf = metrics.confusion_matrix(jnp.asarray(GT), jnp.asarray(PRED), 3)
  assert conf.dtype == jnp.int32
  np.testing.assert_array_equal(conf, EXPECTED)
  np.testing.assert_array_equal(metrics.confusion_matrix_np(GT, PRED, 3), EXPECTED)
  assert metrics.confusion_matrix_np(GT.astype(np.uint8), PRED, 3).dtype == np.int64


def test_confusion_matrix_valid_mask_and_jit():
  valid = np.ones_like(GT, bool)
  valid[0, 1] = False  # drops the (0, 1) pixel
  expected = EXPECTED.copy()
  expected[0, 1] = 0
  conf = jax.jit(metrics.confusion_matrix, static_argnums=2)(GT, PRED, 3, valid)
  np.testing.assert_array_equal(conf, expected)
  np.testing.assert_array_equal(metrics.confusion_matrix_np(GT, PRED, 3, valid), expected)


def test_iou_and_miou_hand_computed():
  iou, miou = metrics.iou_from_confusion_np(EXPECTED)
  # class 0: TP 1, FP 1 (gt 2 -> 0), FN 1 (0 -> 1): 1/3; class 1: 2/(2+1): 2/3;
  # class 2: TP 1, FN 1: 1/2.
  np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
  assert abs(miou - np.mean([1 / 3, 2 / 3, 1 / 2])) < 1e-12
  iou_j, miou_j = jax.jit(metrics.iou_from_confusion)(jnp.asarray(EXPECTED))
  np.testing.assert_allclose(iou_j, iou, rtol=1e-6)
  np.testing.assert_allclose(miou_j, miou, rtol=1e-6)


def test_miou_skips_classes_absent_from_gt_and_prediction():
  conf = np.zeros((4, 4), np.int64)
  conf[0, 0], conf[1, 1], conf[1, 0] = 3, 1, 1        # classes 2, 3 never seen
  iou, miou = metrics.iou_from_confusion_np(conf)
  assert np.isnan(iou[2]) and np.isnan(iou[3])
  np.testing.assert_allclose(iou[:2], [3 / 4, 1 / 2])
  assert abs(miou - 0.625) < 1e-12
  # A class predicted but absent from the GT counts (IoU 0).
  conf[0, 3] = 2
  iou, miou = metrics.iou_from_confusion_np(conf)
  assert iou[3] == 0.0 and abs(miou - np.mean([3 / 6, 1 / 2, 0.0])) < 1e-12
  _, empty = metrics.iou_from_confusion_np(np.zeros((2, 2), np.int64))
  assert np.isnan(empty)


def test_fp_fn_over_union():
  fp, fn = metrics.fp_fn_over_union(EXPECTED)
  np.testing.assert_allclose(fp, [1 / 3, 1 / 3, 0.0])
  np.testing.assert_allclose(fn, [1 / 3, 0.0, 1 / 2])
  iou, _ = metrics.iou_from_confusion_np(EXPECTED)
  np.testing.assert_allclose(iou + fp + fn, 1.0)
  summary = metrics.confusion_summary(EXPECTED, ["bg", "a", "b"])
  assert summary["class_names"] == ["bg", "a", "b"]
  assert abs(summary["pixel_accuracy"] - 4 / 6) < 1e-12


def test_random_against_loop_and_ignore_255():
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 6, (4, 17, 23))
  gt[rng.random(gt.shape) < 0.2] = 255
  pred = rng.integers(0, 6, gt.shape)
  expected = np.zeros((6, 6), np.int64)
  for g, p in zip(gt.ravel(), pred.ravel()):
    if g != 255:
      expected[g, p] += 1
  np.testing.assert_array_equal(metrics.confusion_matrix(gt, pred, 6), expected)
  np.testing.assert_array_equal(metrics.confusion_matrix_np(gt, pred, 6), expected)


def test_sharded_equals_unsharded():
  devices = np.array(jax.devices())
  assert len(devices) == 8, "conftest provides 8 fake CPU devices"
  mesh = Mesh(devices, ("data",))
  rng = np.random.default_rng(1)
  gt = rng.integers(0, 5, (16, 12, 10))
  gt[rng.random(gt.shape) < 0.1] = 255
  pred = rng.integers(0, 5, gt.shape)
  valid = rng.random(gt.shape) < 0.9
  sharding = NamedSharding(mesh, P("data"))
  args = [jax.device_put(jnp.asarray(x), sharding) for x in (gt, pred, valid)]
  fn = jax.jit(lambda g, p, v: metrics.confusion_matrix(g, p, 5, v),
               out_shardings=NamedSharding(mesh, P()))
  sharded = fn(*args)
  np.testing.assert_array_equal(sharded, metrics.confusion_matrix(gt, pred, 5, valid))
  np.testing.assert_array_equal(sharded, metrics.confusion_matrix_np(gt, pred, 5, valid))
