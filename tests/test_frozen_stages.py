"""Frozen backbone stages (`model.frozen_stride`) cost nothing and change nothing.

EfficientNet-Lite0 (random init, 64² inputs) as the CAM model: after real train steps the
frozen parameters and BatchNorm statistics are bit-identical, the optimizer holds no state
for them, and the compiled step saves the frozen layers' backward pass, whose FLOPs are
estimated independently from the forward pass of those layers alone.
"""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from wsss_jax import models
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import optim
from wsss_jax.train import state as state_lib
from wsss_jax.train import step as step_lib
from tiny_model import fast_compile  # noqa: F401  (module fixture)

pytestmark = pytest.mark.usefixtures("fast_compile")

CROP, BATCH, NUM_CLASSES = 64, 2, 5
FROZEN_LAYERS = ("stem_conv", "stem_bn", "stage0_0", "stage1_0", "stage1_1", "stage2_0",
                 "stage2_1")  # Lite0: every layer of nominal stride <= 8


def _config(frozen_stride: int, frozen_bn: bool = False) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      seed=0, method="cam",
      model=dict(backbone="efficientnet_lite0", pretrained=False, output_stride=16,
                 frozen_bn=frozen_bn, frozen_stride=frozen_stride, pool="gap",
                 dtype="float32"),
      optim=dict(name="adamw", lr=1e-3, momentum=0.9, weight_decay=1e-4, schedule="poly",
                 poly_power=0.9, warmup_steps=0, clip_global_norm=0.0,
                 lr_mult=dict(pretrained=1.0, pretrained_bias=1.0, head=10.0,
                              head_bias=10.0),
                 no_decay_bias=True, frozen=(), freeze_bn_affine=False),
      train=dict(num_steps=10), mesh=dict(step_impl="jit", data=1, fsdp=1),
      cam_train=dict(ignore_bg_images=False)))


def _batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  labels = np.zeros((BATCH, NUM_CLASSES - 1), np.float32)
  labels[np.arange(BATCH), rng.integers(0, NUM_CLASSES - 1, BATCH)] = 1.0
  return {"image": rng.normal(size=(BATCH, CROP, CROP, 3)).astype(np.float32),
          "labels": labels}


def _setup(frozen_stride: int, frozen_bn: bool = False):
  config = _config(frozen_stride, frozen_bn)
  method = make_cam_method(config, NUM_CLASSES)
  mesh = mesh_lib.make_mesh(config.mesh)
  shapes = {"image": (BATCH, CROP, CROP, 3)}
  optimizer = state_lib.make_optimizer_for(method, config, shapes)
  state = state_lib.create_train_state(method, config, mesh, shapes, optimizer=optimizer)
  step = step_lib.make_train_step(method, optimizer, mesh, config)
  return method, optimizer, state, step


def _flat(tree) -> dict:
  return {optim.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layer(path: str) -> str:
  return path.split("/")[1]


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_frozen_parameters_and_statistics_do_not_move(frozen_bn):
  _, _, state, step = _setup(8, frozen_bn)
  params0, stats0 = _flat(state.params), _flat(state.batch_stats)
  for k in range(3):
    state, metrics = step(state, _batch(k))
  assert np.isfinite(float(metrics["loss"]))
  params1, stats1 = _flat(state.params), _flat(state.batch_stats)
  frozen = [p for p in params0 if p.startswith("backbone/") and _layer(p) in FROZEN_LAYERS]
  assert len(frozen) > 20
  for p in frozen:
    np.testing.assert_array_equal(params1[p], params0[p], err_msg=p)
  moved = [p for p in params0 if p not in frozen and not np.array_equal(params0[p], params1[p])]
  # Everything else trains: later backbone stages (BN affine included) and the head.
  assert "cam_head/classifier/kernel" in moved
  assert "backbone/stage3_0/expand_bn/scale" in moved
  assert len(moved) == len(params0) - len(frozen)
  for p in stats0:
    if _layer(p) in FROZEN_LAYERS or frozen_bn:
      np.testing.assert_array_equal(stats1[p], stats0[p], err_msg=p)
  # Unfrozen BatchNorm layers keep updating their running statistics.
  changed_stats = [p for p in stats0 if not np.array_equal(stats0[p], stats1[p])]
  assert bool(changed_stats) == (not frozen_bn)


def test_frozen_parameters_have_no_optimizer_state():
  _, optimizer, state, _ = _setup(8)
  labels = _flat(optimizer.labels)
  trainable = sum(np.asarray(x).size for p, x in _flat(state.params).items()
                  if labels[p] != optim.FROZEN)
  frozen = sum(np.asarray(x).size for p, x in _flat(state.params).items()
               if labels[p] == optim.FROZEN)
  assert frozen > 10_000
  state_sizes = [np.asarray(x).size for x in jax.tree.leaves(state.opt_state)]
  # AdamW keeps two moments per trainable element and a few scalar counts, nothing else.
  big = sum(s for s in state_sizes if s > 1)
  assert big == 2 * trainable


def _step_flops(frozen_stride: int) -> float:
  # frozen_bn: both steps run every BatchNorm on running statistics, so they differ only
  # in the frozen layers' backward pass.
  _, _, state, step = _setup(frozen_stride, frozen_bn=True)
  batch = jax.tree.map(jnp.asarray, _batch(0))
  return float(step.lower(state, batch).compile().cost_analysis()["flops"])


def _frozen_part_flops() -> tuple[float, float]:
  """(forward, forward + backward) FLOPs of the backbone up to its stride-8 map alone
  (XLA drops the later layers), the backward being the gradient of the parameters."""
  model = models.build_backbone(_config(0, frozen_bn=True).model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, CROP, CROP, 3)), train=False)
  x = jnp.zeros((BATCH, CROP, CROP, 3))
  out = lambda params: model.apply({**variables, "params": params}, x)["stride8"]
  cost = lambda f: float(jax.jit(f).lower(variables["params"]).compile()
                         .cost_analysis()["flops"])
  return cost(out), cost(jax.grad(lambda p: jnp.sum(out(p))))


def test_frozen_step_saves_the_frozen_backward_pass():
  unfrozen, frozen = _step_flops(0), _step_flops(8)
  forward, forward_backward = _frozen_part_flops()
  expected = forward_backward - forward  # the frozen layers' backward pass
  assert expected > forward  # sanity: a backward pass costs more than the forward
  np.testing.assert_allclose(unfrozen - frozen, expected, rtol=0.1)
  assert (unfrozen - frozen) / unfrozen > 0.1
