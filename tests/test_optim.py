"""Optimizer from config: groups, hand-computed schedules, freezing, decay masks, clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiny_model import TinyCAM, make_batches, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import optim
from wsss_jax.train import state as state_lib
from wsss_jax.train import step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compile")


def _variables():
  v = TinyCAM(4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  return v["params"], v["batch_stats"]


def _flat(tree):
  return {optim.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_param_labels():
  params, bs = _variables()
  labels = _flat(optim.param_labels(params, tiny_config().optim, batch_stats=bs))
  assert labels == {
      "backbone/conv/kernel": "pretrained",
      "backbone/conv/bias": "pretrained_bias/nodecay",
      "backbone/bn/scale": "pretrained/nodecay",       # norm scale: x1 LR, no decay
      "backbone/bn/bias": "pretrained_bias/nodecay",
      "head/kernel": "head",
      "head/bias": "head_bias/nodecay",
  }
  cfg = tiny_config(**{"optim.no_decay_bias": False, "optim.frozen": (r"^backbone/conv",)})
  labels = _flat(optim.param_labels(params, cfg.optim, batch_stats=bs, frozen_bn=True))
  assert labels["backbone/conv/kernel"] == labels["backbone/conv/bias"] == "frozen"
  assert labels["backbone/bn/scale"] == labels["backbone/bn/bias"] == "frozen"  # frozen_bn
  assert labels["head/bias"] == "head_bias"


@pytest.mark.parametrize("schedule,warmup,expected", [
    # lr = 0.1, num_steps = 100, poly power 0.9: 0.1 * (1 - s/100) ** 0.9
    ("poly", 0, {0: 0.1, 10: 0.1 * 0.9 ** 0.9, 50: 0.1 * 0.5 ** 0.9, 99: 0.1 * 0.01 ** 0.9,
                 100: 0.0}),
    # warm-up 20 steps: linear 0 -> lr; then t = (s - 20) / 80.
    ("poly", 20, {0: 0.0, 5: 0.025, 20: 0.1, 60: 0.1 * 0.5 ** 0.9, 100: 0.0}),
    ("cosine", 20, {10: 0.05, 20: 0.1, 60: 0.05, 80: 0.1 * (1 + math.cos(math.pi * 0.75)) / 2,
                    100: 0.0}),
    ("constant", 0, {0: 0.1, 77: 0.1}),
])
def test_learning_rates_per_group(schedule, warmup, expected):
  params, bs = _variables()
  cfg = tiny_config(**{"optim.lr": 0.1, "optim.schedule": schedule,
                       "optim.warmup_steps": warmup})
  opt = optim.make_optimizer(cfg.optim, 100, params, batch_stats=bs)
  for step, base in expected.items():
    lrs = opt.learning_rates(step)
    want = {"pretrained": base, "pretrained_bias": 2 * base, "head": 10 * base,
            "head_bias": 20 * base}
    assert set(lrs) == set(want)
    for g, v in want.items():
      np.testing.assert_allclose(float(lrs[g]), v, rtol=1e-5, atol=1e-8, err_msg=f"{g}@{step}")


def _one_update(cfg, grads_fn, num_steps=100, steps=1, frozen_bn=False):
  params, bs = _variables()
  opt = optim.make_optimizer(cfg.optim, num_steps, params, batch_stats=bs, frozen_bn=frozen_bn)
  opt_state = opt.tx.init(params)
  p = params
  for _ in range(steps):
    updates, opt_state = opt.tx.update(grads_fn(p), opt_state, p)
    p = optax.apply_updates(p, updates)
  return _flat(params), _flat(p), _flat(updates)


def test_sgd_update_multipliers_and_decay_mask():
  cfg = tiny_config(**{"optim.lr": 0.1, "optim.weight_decay": 0.01})
  ones = lambda p: jax.tree.map(jnp.ones_like, p)
  p0, _, upd = _one_update(cfg, ones)
  lr = 0.1  # step 0 of poly
  # Kernels decay (grad + wd * p, PyTorch SGD); biases and norm scales do not.
  np.testing.assert_allclose(upd["backbone/conv/kernel"],
                             -lr * 1 * (1 + 0.01 * p0["backbone/conv/kernel"]), rtol=1e-6)
  np.testing.assert_allclose(upd["backbone/conv/bias"], -lr * 2 * np.ones(8), rtol=1e-6)
  np.testing.assert_allclose(upd["backbone/bn/scale"], -lr * 1 * np.ones(8), rtol=1e-6)
  np.testing.assert_allclose(upd["backbone/bn/bias"], -lr * 2 * np.ones(8), rtol=1e-6)
  np.testing.assert_allclose(upd["head/kernel"], -lr * 10 * (1 + 0.01 * p0["head/kernel"]),
                             rtol=1e-6)
  np.testing.assert_allclose(upd["head/bias"], -lr * 20 * np.ones(4), rtol=1e-6)


def test_nesterov_first_step():
  cfg = tiny_config(**{"optim.name": "nesterov", "optim.lr": 0.1, "optim.momentum": 0.9,
                       "optim.weight_decay": 0.0})
  _, _, upd = _one_update(cfg, lambda p: jax.tree.map(jnp.ones_like, p))
  # Nesterov with zero initial trace: update = -lr * (1 + momentum) * g.
  np.testing.assert_allclose(upd["head/kernel"], -0.1 * 10 * 1.9 * np.ones((1, 1, 8, 4)),
                             rtol=1e-6)


def test_adamw_decay_masked_on_biases():
  cfg = tiny_config(**{"optim.name": "adamw", "optim.lr": 0.1, "optim.weight_decay": 0.5})
  zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
  p0, _, upd = _one_update(cfg, zeros)
  # Zero gradient: only the decoupled decay moves params, -lr * mult * wd * p.
  np.testing.assert_allclose(upd["head/kernel"], -0.1 * 10 * 0.5 * p0["head/kernel"],
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(upd["backbone/conv/kernel"],
                             -0.1 * 1 * 0.5 * p0["backbone/conv/kernel"], rtol=1e-5, atol=1e-9)
  for k in ("head/bias", "backbone/conv/bias", "backbone/bn/scale", "backbone/bn/bias"):
    np.testing.assert_array_equal(upd[k], 0.0)


def test_frozen_groups_do_not_move():
  cfg = tiny_config(**{"optim.frozen": (r"^backbone/conv/",), "optim.weight_decay": 0.1})
  p0, p3, _ = _one_update(cfg, lambda p: jax.tree.map(jnp.ones_like, p), steps=3,
                          frozen_bn=True)
  for k in ("backbone/conv/kernel", "backbone/conv/bias", "backbone/bn/scale",
            "backbone/bn/bias"):
    np.testing.assert_array_equal(p3[k], p0[k], err_msg=k)
  assert not np.allclose(p3["head/kernel"], p0["head/kernel"])


def test_clip_global_norm_over_trainable_only():
  cfg = tiny_config(**{"optim.lr": 0.1, "optim.weight_decay": 0.0, "optim.momentum": 0.0,
                       "optim.clip_global_norm": 1.0, "optim.pretrained_regex": ".*",
                       "optim.lr_mult.pretrained_bias": 1.0, "optim.frozen": ("^head/",)})
  _, _, upd = _one_update(cfg, lambda p: jax.tree.map(lambda x: 100 * jnp.ones_like(x), p))
  trainable = [v for k, v in upd.items() if not k.startswith("head/")]
  norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in trainable))
  np.testing.assert_allclose(norm, 0.1 * 1.0, rtol=1e-5)  # lr * clip; frozen grads ignored


def test_frozen_in_train_step():
  """Frozen params are bit-identical after real steps of the sharded train step."""
  cfg = tiny_config(**{"optim.frozen": (r"^backbone/conv/",), "model.frozen_bn": True})
  method = make_cam_method(cfg, 5, model=TinyCAM(4, frozen_bn=True))
  batches = make_batches(2)
  mesh = mesh_lib.make_mesh({"data": 8})
  opt = state_lib.make_optimizer_for(method, cfg, batches[0])
  state = state_lib.create_train_state(method, cfg, mesh, batches[0], optimizer=opt)
  before = jax.device_get(state)
  step = step_lib.make_train_step(method, opt, mesh, cfg)
  for b in batches:
    state, metrics = step(state, mesh_lib.to_global(b, mesh))
  after = jax.device_get(state)
  np.testing.assert_array_equal(after.params["backbone"]["conv"]["kernel"],
                                before.params["backbone"]["conv"]["kernel"])
  np.testing.assert_array_equal(after.params["backbone"]["bn"]["scale"],
                                before.params["backbone"]["bn"]["scale"])
  # Frozen BN runs in inference mode: its running statistics do not move either.
  np.testing.assert_array_equal(after.batch_stats["backbone"]["bn"]["mean"],
                                before.batch_stats["backbone"]["bn"]["mean"])
  assert not np.allclose(after.params["head"]["kernel"], before.params["head"]["kernel"])
  lr0 = 0.05 * (1 - 1 / 10) ** 0.9  # logged at step index 1 (the second update)
  np.testing.assert_allclose(float(metrics["lr/head"]), 10 * lr0, rtol=1e-5)
