"""CAM baseline method: loss against NumPy / hand values, metrics, the Method contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_model import TinyCAM, make_batches, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods import base
from wsss_jax.methods.cam import cam_metrics, make_cam_method
from wsss_jax.ops.losses import multilabel_soft_margin_loss

pytestmark = pytest.mark.usefixtures("fast_compile")


def _numpy_msml(z, y):
  """PyTorch MultiLabelSoftMarginLoss written out in float64 NumPy."""
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  sig = 1 / (1 + np.exp(-z))
  return -np.mean(y * np.log(sig) + (1 - y) * np.log(1 - sig), axis=-1)


def test_loss_matches_numpy_including_all_negative_image():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 20)).astype(np.float32) * 3
  y = (rng.random((6, 20)) < 0.2).astype(np.float32)
  y[2] = 0  # an image without any foreground label: legal, trains as all-negative
  got = np.asarray(multilabel_soft_margin_loss(jnp.asarray(z), jnp.asarray(y)))
  np.testing.assert_allclose(got, _numpy_msml(z, y), rtol=1e-6)
  assert got[2] > 0


def test_loss_hand_values():
  # One image, two classes: logits (0, 2), labels (1, 0).
  # class 0: -log s(0) = log 2; class 1: -log(1 - s(2)) = log(1 + e^2). Mean of the two.
  want = (np.log(2.0) + np.log(1 + np.e ** 2)) / 2
  got = float(multilabel_soft_margin_loss(jnp.array([[0.0, 2.0]]), jnp.array([[1.0, 0.0]]))[0])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # All-negative image with zero logits: log 2 per class.
  np.testing.assert_allclose(
      float(multilabel_soft_margin_loss(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]), np.log(2.0),
      rtol=1e-6)


def test_loss_is_stable_for_large_logits():
  z = jnp.array([[100.0, -100.0, 80.0]], jnp.bfloat16)
  y = jnp.array([[1.0, 0.0, 0.0]])
  got = multilabel_soft_margin_loss(z, y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got[0]), 80.0 / 3, rtol=1e-3)  # only the 80 is wrong


def test_metrics():
  logits = jnp.array([[1.0, -1.0, 2.0], [-1.0, -1.0, -1.0]])
  labels = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  m = base.reduce_metrics(cam_metrics(logits, labels))
  # predictions: [1,0,1], [0,0,0]; tp 1, fp 1, fn 1.
  np.testing.assert_allclose(float(m["precision"]), 0.5)
  np.testing.assert_allclose(float(m["recall"]), 0.5)
  np.testing.assert_allclose(float(m["accuracy"]), 4 / 6)
  np.testing.assert_allclose(float(m["exact_match"]), 0.5)
  np.testing.assert_allclose(float(m["no_fg_fraction"]), 0.5)
  # Empty denominator: 0, not NaN.
  m0 = base.reduce_metrics(cam_metrics(-jnp.ones((1, 3)), jnp.zeros((1, 3))))
  assert float(m0["precision"]) == 0.0 and float(m0["recall"]) == 0.0


def _loss_of(method, batch, params, batch_stats):
  ctx = base.StepContext(model=method.model)
  return jax.jit(lambda p, s, b: method.loss(p, s, {}, b, jax.random.key(0), jnp.int32(0),
                                             ctx))(params, batch_stats, batch)


def test_method_loss_and_ignore_bg_images():
  cfg = tiny_config()
  model = TinyCAM(4)
  batch = {k: jnp.asarray(v) for k, v in make_batches(1, batch=4)[0].items()}
  batch["labels"] = jnp.array([[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0.]])
  v = model.init(jax.random.key(0), batch["image"][:1], train=False)
  out = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])(
      v, batch["image"])
  per_image = _numpy_msml(out["logits"], batch["labels"])

  method = make_cam_method(cfg, 5, model=model)
  loss, aux = _loss_of(method, batch, v["params"], v["batch_stats"])
  np.testing.assert_allclose(float(loss), per_image.mean(), rtol=1e-5)
  assert set(aux.metrics) >= {"accuracy", "precision", "recall"}
  # Train mode updates the BatchNorm running statistics.
  assert not np.allclose(aux.batch_stats["backbone"]["bn"]["mean"],
                         v["batch_stats"]["backbone"]["bn"]["mean"])

  skip = make_cam_method(cfg, 5, model=model, ignore_bg_images=True)
  loss, _ = _loss_of(skip, batch, v["params"], v["batch_stats"])
  np.testing.assert_allclose(float(loss), per_image[1:3].mean(), rtol=1e-5)
  cfg.cam_train = {"ignore_bg_images": True}  # the same switch from the config
  loss, _ = _loss_of(make_cam_method(cfg, 5, model=model), batch, v["params"],
                     v["batch_stats"])
  np.testing.assert_allclose(float(loss), per_image[1:3].mean(), rtol=1e-5)


def test_gradient_matches_numpy_finite_difference():
  """d loss / d logits = (sigmoid(z) - y) / (K B): the usual BCE gradient, per image mean."""
  z = jnp.array([[0.3, -1.2, 2.0], [0.0, 0.5, -0.5]])
  y = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  g = jax.grad(lambda z: multilabel_soft_margin_loss(z, y).mean())(z)
  np.testing.assert_allclose(np.asarray(g), (jax.nn.sigmoid(z) - y) / 6, rtol=1e-5)


def test_real_model_registry_if_available():
  """With models/ in place, the CAM method builds from the registry (shapes only: cheap)."""
  models = pytest.importorskip("wsss_jax.models")
  if not hasattr(models, "build_model"):
    pytest.skip("wsss_jax.models.build_model not available yet")
  from wsss_jax.train import optim  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(**{"model.pretrained": False, "model.backbone": "efficientnet_lite0"})
  method = make_cam_method(cfg, 5)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(method.init, jax.random.key(0), images)
  batch = {"image": images, "labels": jax.ShapeDtypeStruct((2, 4), jnp.float32)}
  loss, aux = jax.eval_shape(
      lambda v, b: method.loss(v["params"], v["batch_stats"], {}, b, jax.random.key(0), 0,
                               base.StepContext(model=method.model)), variables, batch)
  assert loss.shape == () and aux.metrics["accuracy"].shape == ()
  labels = optim.param_labels(variables["params"], cfg.optim,
                              batch_stats=variables["batch_stats"])
  groups = {l.split("/")[0] for l in jax.tree.leaves(labels)}
  assert groups == {"pretrained", "pretrained_bias", "head"}  # the CAM head has no bias
