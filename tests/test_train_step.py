"""The shared train step: device-count invariance (jit) and shard_map == jit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tiny_model import TinyCAM, make_batches, max_abs_diff, run_steps, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods.base import LossAux, Method
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.runtime import mesh as mesh_lib

NUM_CLASSES = 5  # background + 4
pytestmark = pytest.mark.usefixtures("fast_compile")


_run = run_steps
_max_diff = max_abs_diff


@pytest.fixture(scope="module")
def reference():
  cfg = tiny_config()
  method = make_cam_method(cfg, NUM_CLASSES, model=TinyCAM(NUM_CLASSES - 1))
  batches = make_batches(3)
  return method, batches, _run(method, cfg, 1, "jit", batches)


@pytest.mark.parametrize("n_dev,impl", [(2, "jit"), (8, "jit"), (2, "shard_map"),
                                        (8, "shard_map")])
def test_step_matches_single_device(reference, n_dev, impl):
  method, batches, (ref_state, ref_hist) = reference
  state, hist = _run(method, tiny_config(), n_dev, impl, batches)
  assert int(state.step) == len(batches)
  assert _max_diff(state.params, ref_state.params) < 2e-6
  # BatchNorm running statistics are global-batch statistics (SyncBN) in both impls.
  assert _max_diff(state.batch_stats, ref_state.batch_stats) < 2e-6
  assert _max_diff(state.opt_state, ref_state.opt_state) < 2e-6
  # Training moved the BN statistics away from their init, so the check is not vacuous.
  assert float(np.abs(ref_state.batch_stats["backbone"]["bn"]["mean"]).max()) > 1e-3
  for m, r in zip(hist, ref_hist):
    assert set(m) == set(r)
    for k in r:  # including (num, den) ratio metrics such as precision
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_shard_map_global_normalisation():
  """A loss normalised by a global count (ctx.psum) also matches under shard_map."""
  cfg = tiny_config()
  method = make_cam_method(cfg, NUM_CLASSES, model=TinyCAM(NUM_CLASSES - 1),
                           ignore_bg_images=True)
  batches = make_batches(2)
  for b in batches:  # unequal numbers of background-only images per device
    b["labels"][:5] = 0
  ref, ref_hist = _run(method, cfg, 1, "jit", batches)
  got, hist = _run(method, tiny_config(), 8, "shard_map", batches)
  assert _max_diff(got.params, ref.params) < 2e-6
  np.testing.assert_allclose(hist[-1]["loss"], ref_hist[-1]["loss"], rtol=1e-6)


class NoAxisCAM(nn.Module):
  """BatchNorm without a `bn_axis_name` field (like the registry models)."""

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(4, (3, 3), strides=(2, 2), name="conv")(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    return {"logits": x.mean((1, 2)), "cams": x}


def test_shard_map_syncs_batchnorm_without_bn_axis_attribute():
  cfg = tiny_config()
  method = make_cam_method(cfg, NUM_CLASSES, model=NoAxisCAM())
  batches = make_batches(2)
  ref, ref_hist = _run(method, cfg, 1, "jit", batches)
  got, hist = _run(method, tiny_config(), 8, "shard_map", batches)
  assert _max_diff(got.params, ref.params) < 2e-6
  assert _max_diff(got.batch_stats, ref.batch_stats) < 2e-6
  np.testing.assert_allclose(hist[-1]["loss"], ref_hist[-1]["loss"], rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params(reference):
  cfg = tiny_config()
  cfg.model.dtype = "bfloat16"
  model = TinyCAM(NUM_CLASSES - 1, dtype=jnp.bfloat16)
  method = make_cam_method(cfg, NUM_CLASSES, model=model)
  _, batches, (ref_state, _) = reference
  state, hist = _run(method, cfg, 8, "jit", batches)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(hist[-1]["loss"])
  assert _max_diff(state.params, ref_state.params) < 5e-2  # bf16 is close, not equal


def test_extra_state_and_rng_flow():
  """A method with extra state (an EMA of the params) and randomness, under both impls."""
  cfg = tiny_config()
  base = make_cam_method(cfg, NUM_CLASSES, model=TinyCAM(NUM_CLASSES - 1))

  def loss(params, batch_stats, extra, batch, rng, step, ctx):
    value, aux = base.loss(params, batch_stats, extra, batch, rng, step, ctx)
    noise = jax.random.uniform(rng, ())  # per-step (and per-device) randomness
    metrics = dict(aux.metrics, noise=noise)
    return value, LossAux(metrics, aux.batch_stats, {"seen": ctx.psum(batch["image"].shape[0])})

  def update_extra(extra, params, batch_stats, extra_aux, step, ctx):
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, extra["ema"], params)
    return {"ema": ema, "seen": extra["seen"] + extra_aux["seen"]}

  method = Method(name="ema_cam", model=base.model, loss=loss, update_extra=update_extra,
                  init_extra=lambda rng, v: {"ema": v["params"], "seen": jnp.zeros((), jnp.int32)})
  batches = make_batches(2)
  s_jit, h_jit = _run(method, cfg, 8, "jit", batches)
  s_sm, h_sm = _run(method, tiny_config(), 8, "shard_map", batches)
  assert int(s_jit.extra["seen"]) == int(s_sm.extra["seen"]) == 32
  assert _max_diff(s_jit.extra["ema"], s_sm.extra["ema"]) < 2e-6
  assert h_jit[0]["noise"] != h_jit[1]["noise"]  # a fresh key every step


def test_shard_map_gradient_pitfall_p3():
  """Documents why the shard_map step differentiates pmean(loss), not pmean(grads)."""
  mesh = mesh_lib.make_mesh({"data": 8})
  x = jnp.arange(16.0)
  w = jnp.ones(())

  def true_grad(w):
    return jax.grad(lambda w: jnp.mean((w * x) ** 2))(w)

  def local(w, xs, mode):
    if mode == "pmean_loss":
      return jax.grad(lambda w: jax.lax.pmean(jnp.mean((w * xs) ** 2), "data"))(w)
    g = jax.grad(lambda w: jnp.mean((w * xs) ** 2))(w)
    return jax.lax.pmean(g, "data")

  got = {}
  for mode in ("pmean_loss", "pmean_grads"):
    f = jax.shard_map(lambda w, xs, m=mode: local(w, xs, m), mesh=mesh,
                      in_specs=(P(), P("data")), out_specs=P(), check_vma=True)
    got[mode] = float(jax.jit(f)(w, x))
  np.testing.assert_allclose(got["pmean_loss"], true_grad(w), rtol=1e-6)
  np.testing.assert_allclose(got["pmean_grads"], 8 * true_grad(w), rtol=1e-6)
