"""Checkpoint/resume across processes, resharding on restore, and the NaN guard."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resume_worker
from tiny_model import TinyCAM, grain_train_iter, make_batches, make_records, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods.base import Method
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.train import checkpoint as ckpt_lib
from wsss_jax.train import loop
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import nan_guard
from wsss_jax.train import state as state_lib

pytestmark = pytest.mark.usefixtures("fast_compile")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _worker(workdir, num_steps, kill_after, cache_dir):
  env = dict(os.environ)
  # The second process reuses the first one's compiled programs (saves seconds on CI).
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # same setting as this module (fast_compile)
  return subprocess.run(
      [sys.executable, os.path.join(TESTS_DIR, "resume_worker.py"), str(workdir),
       str(num_steps), str(kill_after)], env=env, capture_output=True, text=True, timeout=300)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_kill_and_resume_in_fresh_process_equals_straight_run(tmp_path):
  n, k = 8, 3
  straight = resume_worker.run(str(tmp_path / "straight"), n)
  ref = resume_worker.flat_state(straight)

  wd = tmp_path / "resumed"
  first = _worker(wd, n, kill_after=k, cache_dir=tmp_path / "cache")
  assert first.returncode == -9, first.stderr[-3000:]  # SIGKILLed during step k + 1
  assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) == [k]
  second = _worker(wd, n, kill_after=0, cache_dir=tmp_path / "cache")
  assert second.returncode == 0, second.stderr[-3000:]
  got = dict(np.load(wd / "final.npz"))

  assert int(got["step"]) == n
  assert set(got) == set(ref)
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
  # Same data order after resume: the logged losses agree step by step.
  a = {r["step"]: r["loss"] for r in _jsonl(tmp_path / "straight" / "metrics.jsonl")
       if "loss" in r}
  b = {r["step"]: r["loss"] for r in _jsonl(wd / "metrics.jsonl") if "loss" in r}
  assert set(b) >= {2, 4, 6, 8}
  for s in (6, 8):  # steps logged only by the resumed process
    np.testing.assert_allclose(b[s], a[s], rtol=1e-6)
  # max_to_keep = train.keep_checkpoints = 2; the final step is always saved.
  assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) == [6, 8]


def test_restore_onto_other_mesh_and_data_iterator(tmp_path):
  cfg = tiny_config()
  method = make_cam_method(cfg, 5, model=TinyCAM(4))
  sample = make_batches(1)[0]
  mesh8 = mesh_lib.make_mesh({"data": 8})
  state = state_lib.create_train_state(method, cfg, mesh8, sample)
  it = grain_train_iter(make_records())
  next(it)
  with ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    assert ck.restore_or_none(state_lib.abstract_train_state(method, cfg, mesh8, sample)) is None
    ck.save(1, state, it, {"note": "x"})
  expected_next = next(it)

  mesh2 = mesh_lib.make_mesh({"data": 2})
  abstract = state_lib.abstract_train_state(method, cfg, mesh2, sample)
  it2 = grain_train_iter(make_records())
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    restored = ck.restore_or_none(abstract, it2)
    assert ck.restored_meta["note"] == "x" and ck.restored_meta["step"] == 1
  leaf = restored.params["head"]["kernel"]
  assert len(leaf.sharding.device_set) == 2
  np.testing.assert_array_equal(leaf, state.params["head"]["kernel"])
  assert jax.random.key_data(restored.rng).tolist() == jax.random.key_data(state.rng).tolist()
  np.testing.assert_array_equal(next(it2)["image"], expected_next["image"])


def test_checkpointer_refuses_non_finite_state(tmp_path):
  cfg = tiny_config()
  method = make_cam_method(cfg, 5, model=TinyCAM(4))
  mesh = mesh_lib.make_mesh({"data": 2})
  state = state_lib.create_train_state(method, cfg, mesh, make_batches(1)[0])
  bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(nan_guard.NonFiniteError):
      ck.save(1, bad)
    assert ck.latest_step() is None


def test_nan_guard_stops_and_keeps_last_finite_checkpoint(tmp_path):
  cfg = tiny_config(**{"train.num_steps": 10, "train.log_every": 3, "train.ckpt_every": 2,
                       "train.keep_checkpoints": 5})
  cam = make_cam_method(cfg, 5, model=TinyCAM(4))

  def loss(params, batch_stats, extra, batch, rng, step, ctx):
    value, aux = cam.loss(params, batch_stats, extra, batch, rng, step, ctx)
    return value + jnp.where(step >= 4, jnp.nan, 0.0), aux  # update 4 -> 5 goes NaN

  method = Method(name="nan_cam", model=cam.model, loss=loss)
  records = make_records()
  mesh = mesh_lib.make_mesh(cfg.mesh)
  with pytest.raises(nan_guard.NonFiniteError, match=r"loss = nan at train step 5") as e:
    loop.train(method, cfg, str(tmp_path), lambda: grain_train_iter(records), mesh)
  assert e.value.step == 5 and e.value.metric == "loss"
  assert "step 4" in str(e.value)  # names the last good checkpoint
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [2, 4]  # no checkpoint at 6 although ckpt_every = 2
  records_out = _jsonl(tmp_path / "metrics.jsonl")
  assert "error" in records_out[-1] and records_out[-1]["step"] == 5
  abstract = state_lib.abstract_train_state(method, cfg, mesh, make_batches(1)[0])
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")) as ck:
    last = ck.restore_or_none(abstract)
  assert int(last.step) == 4 and nan_guard.tree_all_finite(last)


def test_loop_outputs(tmp_path):
  cfg = tiny_config(**{"train.num_steps": 4, "train.log_every": 2, "train.ckpt_every": 0,
                       "train.tensorboard": True, "train.progress": True,
                       "train.eval_every": 2, "mesh.step_impl": "shard_map"})
  method = make_cam_method(cfg, 5, model=TinyCAM(4))
  records = make_records()
  calls = []

  def eval_fn(state, step):
    calls.append(step)
    return {"miou": 0.5}

  state = loop.train(method, cfg, str(tmp_path), lambda: grain_train_iter(records),
                     mesh_lib.make_mesh(cfg.mesh), eval_fn=eval_fn)
  assert int(state.step) == 4 and calls == [2, 4]
  recs = _jsonl(tmp_path / "metrics.jsonl")
  header = recs[0]
  assert header["step"] == 0 and header["step_impl"] == "shard_map"
  assert header["num_params"] == 8 * 27 + 8 + 8 + 8 + 8 * 4 + 4
  train_recs = [r for r in recs if "loss" in r]
  assert [r["step"] for r in train_recs] == [2, 4]
  for key in ("lr", "lr/head", "l2_grads", "l2_params", "accuracy", "img/s", "img/s/device",
              "step_time", "eta_s"):
    assert key in train_recs[-1], key
  assert "mfu" not in train_recs[-1]  # CPU: no peak FLOP/s, no MFU
  assert [r["eval/miou"] for r in recs if "eval/miou" in r] == [0.5, 0.5]
  assert os.path.isdir(tmp_path / "checkpoints" / "4")  # the final step is always saved
  # Training again is a no-op: the run is complete and restored as is.
  again = loop.train(method, cfg, str(tmp_path), lambda: grain_train_iter(records),
                     mesh_lib.make_mesh(cfg.mesh))
  assert int(again.step) == 4


def _read_tb_scalars(directory):
  """(tag, step, value) of every scalar in the TFRecord event files (no TensorFlow)."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  out = []
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, payload, payload crc
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def test_tensorboard_scalars_match_jsonl(tmp_path):
  pytest.importorskip("tensorboardX")
  cfg = tiny_config(**{"train.num_steps": 4, "train.log_every": 2, "train.ckpt_every": 0,
                       "train.tensorboard": True, "train.progress": False})
  method = make_cam_method(cfg, 5, model=TinyCAM(4))
  loop.train(method, cfg, str(tmp_path), lambda: grain_train_iter(make_records()),
             mesh_lib.make_mesh(cfg.mesh))
  jsonl = {r["step"]: r["loss"] for r in _jsonl(tmp_path / "metrics.jsonl") if "loss" in r}
  tb = {step: value for tag, step, value in _read_tb_scalars(tmp_path / "tb")
        if tag == "loss"}
  assert sorted(tb) == [2, 4]
  for step, value in tb.items():
    assert value == pytest.approx(jsonl[step], rel=1e-6)


def test_resumed_run_logs_each_step_once(tmp_path):
  # A run is killed after step 4 was logged but before its checkpoint counted: the rerun
  # resumes from checkpoint 2 and logs steps 3 and 4 again. metrics.jsonl must then hold
  # each step once, with the resumed run's values (equal to an uninterrupted run's).
  cfg = tiny_config(**{"train.num_steps": 4, "train.log_every": 1, "train.ckpt_every": 2,
                       "train.eval_every": 2, "train.keep_checkpoints": 5})
  records = make_records()
  mesh = mesh_lib.make_mesh(cfg.mesh)

  def train(workdir):
    method = make_cam_method(cfg, 5, model=TinyCAM(4))
    loop.train(method, cfg, str(workdir), lambda: grain_train_iter(records), mesh,
               eval_fn=lambda state, step: {"score": float(step)})

  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train(straight)
  train(resumed)
  for name in os.listdir(resumed / "checkpoints"):  # the kill: checkpoint 4 never counted
    if name == "4":
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(resumed / "checkpoints" / name)
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "loss": 0.1')            # and a line cut off by the kill
  train(resumed)

  recs = _jsonl(resumed / "metrics.jsonl")
  losses = [r["step"] for r in recs if "loss" in r]
  assert losses == [1, 2, 3, 4]                   # each step once, in order
  assert [r["step"] for r in recs if "eval/score" in r] == [2, 4]
  assert [r["step"] for r in recs if "num_params" in r] == [0, 2]  # one header per start
  want = {r["step"]: r["loss"] for r in _jsonl(straight / "metrics.jsonl") if "loss" in r}
  got = {r["step"]: r["loss"] for r in recs if "loss" in r}
  for step in (1, 2, 3, 4):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6)
