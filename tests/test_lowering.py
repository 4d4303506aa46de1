"""The CPU forms of models/lowering.py: 1x1 convolutions as matmuls and max pools as
shifted maxima (NumPy references, gradients, fallbacks), and whole backbones equal in
both forms. The depthwise form is tested in test_efficientnet.py."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from wsss_jax.models import build_model, weights
from wsss_jax.models.lowering import (conv_general_dilated_fn, max_pool, pointwise_as_dot,
                                     resolve_impl)
from wsss_jax.models.efficientnet_lite import EfficientNetLite
from wsss_jax.models.heads import CAMHead, backbone_pointwise_impl
from wsss_jax.models.resnet import ResNet

NHWC = ("NHWC", "HWIO", "NHWC")


def _equations(fn, *args) -> list:
  """The equations of `fn`'s jaxpr, those of nested calls (e.g. jitted einsum) included."""
  eqns = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      eqns.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return eqns


def _primitives(fn, *args) -> set[str]:
  return {eqn.primitive.name for eqn in _equations(fn, *args)}


@pytest.mark.parametrize("strides,padding,size", [
    ((1, 1), "SAME", (7, 6)), ((2, 2), "SAME", (7, 6)), ((2, 2), "VALID", (8, 5)),
    ((2, 1), ((0, 0), (0, 0)), (9, 4)), ((3, 3), "SAME_LOWER", (7, 7))])
def test_pointwise_matches_numpy(strides, padding, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, 5)).astype(np.float32)
  w = rng.normal(size=(1, 1, 5, 3)).astype(np.float32)
  # Independent reference: a 1x1 conv with stride s samples every s-th pixel from 0.
  expect = np.einsum("bhwc,co->bhwo", x[:, ::strides[0], ::strides[1]], w[0, 0])
  got = pointwise_as_dot(jnp.asarray(x), jnp.asarray(w), strides, padding,
                         dimension_numbers=NHWC)
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC), expect,
      rtol=1e-5, atol=1e-5)


def test_pointwise_gradients_are_matmuls_and_match_conv():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 6, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 5, 4, 4)), jnp.float32)

  def loss(conv, x, w):
    return jnp.sum(g * conv(x, w, (2, 2), "SAME", dimension_numbers=NHWC))

  dot_grads = jax.grad(lambda x, w: loss(pointwise_as_dot, x, w), argnums=(0, 1))
  conv_grads = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))
  for a, b in zip(dot_grads(x, w), conv_grads(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Hand check of the weight gradient: sum over the sampled pixels of x^T g.
  expect_dw = np.einsum("bhwc,bhwo->co", np.asarray(x)[:, ::2, ::2], np.asarray(g))
  np.testing.assert_allclose(dot_grads(x, w)[1][0, 0], expect_dw, rtol=1e-4, atol=1e-4)
  # The point of the dot form: no convolution left, forward or backward.
  prims = _primitives(dot_grads, x, w)
  assert "conv_general_dilated" not in prims and "dot_general" in prims
  assert "conv_general_dilated" in _primitives(conv_grads, x, w)


def test_pointwise_gradients_are_two_dimensional_matmuls():
  # Every matmul, the weight gradient's included, is [M, K] x [K, N] with one contracting
  # dim. An einsum over [B, H, W] made the weight gradient contract three dims, which
  # XLA:CPU lowered with a transposing copy of the cotangent (models/lowering.py).
  x = jnp.ones((2, 6, 5, 3), jnp.float32)
  w = jnp.ones((1, 1, 3, 4), jnp.float32)
  grads = jax.grad(lambda x, w: jnp.sum(pointwise_as_dot(
      x, w, (1, 1), "SAME", dimension_numbers=NHWC) ** 2), argnums=(0, 1))
  dots = [e for e in _equations(grads, x, w) if e.primitive.name == "dot_general"]
  assert len(dots) == 3  # forward, input gradient, weight gradient
  for eqn in dots:
    (lhs_contract, rhs_contract), _ = eqn.params["dimension_numbers"]
    assert [v.aval.ndim for v in eqn.invars] == [2, 2]
    assert len(lhs_contract) == len(rhs_contract) == 1


@pytest.mark.parametrize("kernel,kw", [
    ((3, 3), {}),                                   # a real window
    ((1, 1), {"feature_group_count": 2}),           # grouped
    ((1, 1), {"lhs_dilation": (2, 2), "padding": ((0, 0), (0, 0))}),  # input dilation
    ((1, 1), {"padding": ((1, 1), (0, 0))})])       # a padded 1x1 adds zero borders
def test_other_convolutions_fall_back_unchanged(kernel, kw):
  rng = np.random.default_rng(2)
  kw = dict(kw)
  padding = kw.pop("padding", "SAME")
  groups = kw.get("feature_group_count", 1)
  x = jnp.asarray(rng.normal(size=(1, 6, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, 4 // groups, 6)), jnp.float32)
  args = (x, w, (1, 1), padding)
  expect = lax.conv_general_dilated(*args, dimension_numbers=NHWC, **kw)
  got = pointwise_as_dot(*args, dimension_numbers=NHWC, **kw)
  np.testing.assert_array_equal(got, expect)
  assert "conv_general_dilated" in _primitives(
      lambda x, w: pointwise_as_dot(x, w, (1, 1), padding, dimension_numbers=NHWC, **kw), x, w)


def test_non_nhwc_layout_falls_back():
  x = jnp.ones((1, 4, 5, 5))  # NCHW
  w = jnp.ones((3, 4, 1, 1))  # OIHW
  dn = ("NCHW", "OIHW", "NCHW")
  got = pointwise_as_dot(x, w, (1, 1), "SAME", dimension_numbers=dn)
  np.testing.assert_array_equal(got, lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                              dimension_numbers=dn))
  assert got.shape == (1, 3, 5, 5)


def test_flax_conv_hook_keeps_params_and_outputs():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 7, 5)), jnp.float32)
  conv = nn.Conv(8, (1, 1), strides=(2, 2))
  dot = conv.clone(conv_general_dilated=pointwise_as_dot)
  variables = conv.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, dot.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, variables)
  np.testing.assert_allclose(dot.apply(variables, x), conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_resolve_impl():
  assert conv_general_dilated_fn("conv") is lax.conv_general_dilated
  assert conv_general_dilated_fn("dot") is pointwise_as_dot
  expect_auto = pointwise_as_dot if jax.default_backend() == "cpu" else lax.conv_general_dilated
  assert conv_general_dilated_fn("auto") is expect_auto
  # 'auto' max pool: 'argmax' on CPU (no select_and_scatter in its gradient), XLA's elsewhere.
  x = jnp.ones((1, 4, 4, 1))
  auto_grad = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(max_pool(x, 2, 2, 0, "auto"))))(x)
  assert ("select_and_scatter_add" in str(auto_grad)) == (jax.default_backend() != "cpu")
  with pytest.raises(ValueError, match="model.pointwise_impl must be one of auto|dot|conv"):
    conv_general_dilated_fn("matmul")
  with pytest.raises(ValueError, match="model.depthwise_impl"):
    resolve_impl("model.depthwise_impl", "fast", ("auto", "shift"), "shift", "grouped")


@pytest.mark.parametrize("window,stride,pad,size", [
    (3, 2, 1, (9, 8)), (3, 2, 1, (10, 10)), (2, 2, 0, (7, 6)), (3, 1, 1, (5, 6))])
def test_max_pool_forms_match_numpy_and_window(window, stride, pad, size):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, *size, 3)).astype(np.float32)  # continuous: no ties
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  ho, wo = (xp.shape[1] - window) // stride + 1, (xp.shape[2] - window) // stride + 1
  expect = np.array([[[[xp[b, i * stride:i * stride + window, j * stride:j * stride + window,
                          c].max() for c in range(3)] for j in range(wo)] for i in range(ho)]
                     for b in range(2)])
  shift = max_pool(jnp.asarray(x), window, stride, pad, "shift")
  np.testing.assert_array_equal(shift, expect)
  for impl in ("window", "argmax"):
    np.testing.assert_array_equal(max_pool(jnp.asarray(x), window, stride, pad, impl), expect)
  g = jnp.asarray(rng.normal(size=expect.shape), jnp.float32)
  grad = lambda impl: jax.grad(lambda x: jnp.sum(g * max_pool(x, window, stride, pad,
                                                               impl)))(jnp.asarray(x))
  # Not bitwise: an input that wins several overlapping windows sums their shares in
  # another order.
  np.testing.assert_allclose(grad("shift"), grad("window"), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad("argmax"), grad("window"), rtol=1e-6, atol=1e-6)
  for impl in ("shift", "argmax"):
    assert "select_and_scatter_add" not in str(jax.make_jaxpr(lambda x, impl=impl: jax.grad(
        lambda x: jnp.sum(max_pool(x, window, stride, pad, impl)))(x))(jnp.asarray(x)))


def test_max_pool_argmax_gradient_goes_to_the_first_maximum():
  """Ties on a coarse grid, overlapping 3x3/2 windows: 'argmax' gives each window's
  gradient to the same input as XLA's select_and_scatter, the first maximum in row-major
  order, which a NumPy loop finds independently."""
  rng = np.random.default_rng(3)
  x = np.round(rng.normal(size=(2, 9, 10, 3))).astype(np.float32)  # many ties
  g = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  expect = np.zeros_like(xp)
  for b, i, j, c in np.ndindex(g.shape):
    win = xp[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c]
    di, dj = np.unravel_index(np.argmax(win), win.shape)  # first maximum, row-major
    expect[b, 2 * i + di, 2 * j + dj, c] += g[b, i, j, c]
  grad = lambda impl: jax.grad(lambda x: jnp.sum(g * max_pool(x, 3, 2, 1, impl)))(
      jnp.asarray(x))
  np.testing.assert_allclose(grad("argmax"), expect[:, 1:-1, 1:-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad("window"), expect[:, 1:-1, 1:-1], rtol=1e-6, atol=1e-6)


def test_max_pool_ties_split_the_gradient():
  """All-equal windows: 'shift' shares the gradient among the tied inputs, 'window' and
  'argmax' give it to one; all pass on the same total."""
  x = jnp.zeros((1, 4, 4, 1))
  grad = lambda impl: jax.grad(lambda x: jnp.sum(max_pool(x, 2, 2, 0, impl)))(x)
  shift, window, argmax = grad("shift"), grad("window"), grad("argmax")
  assert float(jnp.sum(shift)) == float(jnp.sum(window)) == float(jnp.sum(argmax)) == 4.0
  assert float(jnp.max(window)) == 1.0 and float(jnp.max(shift)) < 1.0
  np.testing.assert_array_equal(argmax, window)


FORMS = {"cpu": dict(pointwise_impl="dot"), "xla": dict(pointwise_impl="conv")}


@pytest.mark.parametrize("make", [
    lambda form, dtype: ResNet(50, output_stride=8, dtype=dtype,
                               maxpool_impl={"cpu": "shift", "xla": "window"}[form],
                               **FORMS[form]),
    lambda form, dtype: EfficientNetLite("lite0", output_stride=16, dtype=dtype,
                                         **FORMS[form])],
    ids=["resnet50_os8", "lite0_os16"])
def test_backbone_dot_equals_conv(make):
  """Forward features and parameter gradients of a whole backbone, in train mode.

  The max pool follows a ReLU, so its tie rule (test above) cannot show. In float64: in
  float32, XLA's fusions alone move these random-weight gradients by ~0.6 %
  of their scale (the conv form against itself, jitted vs eager), which would hide a real
  difference.
  """
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 37, 45, 3)), jnp.float64)
    dot, conv = make("cpu", jnp.float64), make("xla", jnp.float64)
    variables = weights.random_like(jax.eval_shape(conv.init, jax.random.key(0), x), seed=1)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)

    def loss(model, params):
      feats, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.mean(feats["out"] ** 2), feats

    # As NumPy float64 arrays, so nothing below computes in float32 again.
    grads = {name: jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(
        lambda p, m=m: loss(m, p), has_aux=True))(variables["params"]))
             for name, m in (("dot", dot), ("conv", conv))}
  (la, fa), ga = grads["dot"]
  (lb, fb), gb = grads["conv"]
  assert la.dtype == np.float64
  for key in fa:
    np.testing.assert_allclose(fa[key], fb[key], rtol=1e-9, atol=1e-9, err_msg=key)
  np.testing.assert_allclose(la, lb, rtol=1e-10)
  # One scale for all leaves: some gradients are zero in exact arithmetic (a BN bias whose
  # output feeds a conv and then a train-mode BN), so per-leaf scales would compare noise.
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(gb))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a / scale, b / scale, atol=1e-9,
                               err_msg=jax.tree_util.keystr(path))


def test_config_reaches_the_backbone():
  cfg = {"backbone": "resnet50", "output_stride": 16, "pointwise_impl": "conv",
         "depthwise_impl": "grouped", "maxpool_impl": "window"}
  backbone = build_model(cfg, 21, "cam").backbone
  assert (backbone.pointwise_impl, backbone.maxpool_impl) == ("conv", "window")
  cfg = {**cfg, "backbone": "efficientnet_lite0"}
  backbone = build_model(cfg, 21, "cam").backbone
  assert (backbone.pointwise_impl, backbone.depthwise_impl) == ("conv", "grouped")


@pytest.mark.parametrize("pool", ["gap", "tap"])
def test_cam_head_follows_the_backbone_impl(pool):
  feats = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 4, 6)), jnp.float32)
  heads = {impl: CAMHead(3, pool, pointwise_impl=impl) for impl in ("dot", "conv")}
  variables = heads["conv"].init(jax.random.key(0), feats)

  def loss(impl, v):
    out = heads[impl].apply(v, feats)
    return jnp.sum(out["logits"] ** 2) + jnp.sum(jnp.sin(out["cams"]))

  grads = {impl: jax.grad(lambda v, i=impl: loss(i, v)) for impl in heads}
  for a, b in zip(jax.tree.leaves(grads["dot"](variables)),
                  jax.tree.leaves(grads["conv"](variables))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert "conv_general_dilated" not in _primitives(grads["dot"], variables)
  assert "conv_general_dilated" in _primitives(grads["conv"], variables)
  # The method models pass their backbone's choice to their CAM heads.
  assert backbone_pointwise_impl(ResNet(depth=50, pointwise_impl="conv")) == "conv"
  assert backbone_pointwise_impl(nn.Dense(3)) == "auto"


def test_cam_net_head_takes_the_config_impl():
  x = jnp.zeros((1, 32, 32, 3))

  def convs(impl):
    net = build_model({"backbone": "resnet50", "pointwise_impl": impl}, 21, "cam")
    v = jax.eval_shape(net.init, jax.random.key(0), x)  # shapes suffice for a jaxpr
    return sum(e.primitive.name == "conv_general_dilated"
               for e in _equations(lambda v: net.apply(v, x), v))

  # ResNet-50 has 36 1x1 convs (2 per bottleneck, 4 projections) and the CAM head 1 more.
  assert convs("conv") - convs("dot") == 36 + 1
