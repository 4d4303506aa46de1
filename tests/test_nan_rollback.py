"""NaN/Inf: stop naming step, metric and checkpoint; or roll back and retry at a lower LR."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import pytest

from tiny_model import TinyCAM, grain_train_iter, make_records, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods.base import Method
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.train import loop
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import nan_guard
from wsss_jax.train import rollback

pytestmark = pytest.mark.usefixtures("fast_compile")


def _method(cfg, nan_above_lr: float, nan_from_step: int = 5):
  """The tiny CAM whose loss turns NaN from update `nan_from_step` on while the learning
  rate exceeds `nan_above_lr` (read when the step is traced, i.e. per `loop.train` call)."""
  cam = make_cam_method(cfg, 5, model=TinyCAM(4))
  diverges = float(cfg.optim.lr) > nan_above_lr

  def loss(params, batch_stats, extra, batch, rng, step, ctx):
    value, aux = cam.loss(params, batch_stats, extra, batch, rng, step, ctx)
    bad = jnp.logical_and(diverges, step >= nan_from_step - 1)
    return value + jnp.where(bad, jnp.nan, 0.0), aux

  return Method(name="nan_cam", model=cam.model, loss=loss)


def _train_once(out_dir, nan_above_lr):
  records = make_records()

  def once(c):
    return loop.train(_method(c, nan_above_lr), c, out_dir,
                      lambda: grain_train_iter(records), mesh_lib.make_mesh(c.mesh))

  return once


def _config(**kw):
  return tiny_config(**{"train.num_steps": 8, "train.log_every": 1, "train.ckpt_every": 2,
                        "optim.lr": 0.08, "mesh.data": 1, **kw})


def test_rollback_retries_with_lower_lr_and_finishes(tmp_path):
  cfg = _config(**{"train.nan_retries": 2, "train.nan_lr_factor": 0.5})
  state = rollback.train_with_rollback(_train_once(str(tmp_path), 0.05), cfg, str(tmp_path))
  assert int(state.step) == 8 and nan_guard.tree_all_finite(state.params)
  record = rollback.read_record(str(tmp_path))
  assert record["lr_scale"] == 0.5
  assert record["retries"] == [{"step": 5, "metric": "loss", "value": "nan",
                                "lr_scale": 0.5}]
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  errors = [r for r in lines if "error" in r]
  assert len(errors) == 1 and "last finite" in errors[0]["error"]
  # Steps 5.. were trained again from checkpoint 4 at half the base learning rate.
  last = [r for r in lines if r.get("step") == 8 and "lr" in r][-1]
  first = [r for r in lines if r.get("step") == 1 and "lr" in r][0]
  assert last["lr"] < 0.5 * first["lr"] + 1e-9


def test_gives_up_after_the_retries_and_says_so(tmp_path):
  cfg = _config(**{"train.nan_retries": 1})
  with pytest.raises(nan_guard.NonFiniteError,
                     match=r"loss = nan at train step 5.*step 4.*Gave up after 1 rollback"):
    rollback.train_with_rollback(_train_once(str(tmp_path), 0.0), cfg, str(tmp_path))


def test_without_retries_the_error_names_the_option(tmp_path):
  with pytest.raises(nan_guard.NonFiniteError,
                     match=r"at train step 5 .*newest checkpoint, step 4.*nan_retries=N"):
    rollback.train_with_rollback(_train_once(str(tmp_path), 0.0), _config(), str(tmp_path))
  assert not os.path.exists(tmp_path / rollback.RETRY_FILE)
