"""FSDP meshes (`mesh.fsdp` > 1) and restoring a checkpoint onto a different mesh.

8 fake CPU devices (conftest): a data-parallel mesh (8) and an FSDP mesh (data 4 x fsdp 2)
run the same updates; a checkpoint written on one is restored onto the other.
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tiny_model import TinyCAM, fast_compile, make_batches, max_abs_diff, tiny_config  # noqa: F401
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.train import checkpoint as ckpt_lib
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import state as state_lib
from wsss_jax.train import step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compile")


def _setup(data: int, fsdp: int):
  cfg = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.fsdp_min_size": 1})
  method = make_cam_method(cfg, 5, model=TinyCAM(4, width=8))
  mesh = mesh_lib.make_mesh(cfg.mesh)
  batches = make_batches(4, batch=16, size=16)
  opt = state_lib.make_optimizer_for(method, cfg, batches[0])
  abstract = state_lib.abstract_train_state(method, cfg, mesh, batches[0], optimizer=opt)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  step = step_lib.make_train_step(method, opt, mesh, cfg, state_shardings=shardings)
  return cfg, method, mesh, batches, opt, abstract, step


def _run(step, state, mesh, batches):
  for b in batches:
    state, _ = step(state, mesh_lib.to_global(b, mesh))
  return state


def test_fsdp_mesh_shapes_and_specs():
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert mesh_lib.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert mesh_lib.num_data_devices(mesh) == 8
  assert state_lib.fsdp_spec((3, 3, 64, 128), 2, min_size=1) == P(None, None, None, "fsdp")
  assert state_lib.fsdp_spec((7, 5), 2, min_size=1) == P()        # nothing divisible
  assert state_lib.fsdp_spec((128,), 2, min_size=1024) == P()     # too small to split
  with pytest.raises(ValueError, match="fsdp=3"):
    mesh_lib.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(ValueError, match="shard_map"):
    cfg = tiny_config(**{"mesh.fsdp": 2})
    method = make_cam_method(cfg, 5, model=TinyCAM(4))
    step_lib.make_train_step(method, state_lib.make_optimizer_for(
        method, cfg, {"image": (16, 16, 16, 3)}), mesh, cfg, step_impl="shard_map")


def test_fsdp_training_equals_data_parallel_and_restores_across_meshes(tmp_path):
  # Reference: 4 updates on the data-parallel mesh of 8 devices.
  cfg, method, mesh, batches, opt, _, step = _setup(8, 1)
  ref = state_lib.create_train_state(method, cfg, mesh, batches[0], optimizer=opt)
  ref = jax.device_get(_run(step, ref, mesh, batches))

  # 2 updates data parallel, checkpoint, restore onto the FSDP mesh, 2 more updates.
  state = state_lib.create_train_state(method, cfg, mesh, batches[0], optimizer=opt)
  state = _run(step, state, mesh, batches[:2])
  with ckpt_lib.Checkpointer(str(tmp_path / "dp")) as ck:
    ck.save(2, state)
  saved = jax.device_get(state)
  _, _, fmesh, _, _, fabstract, fstep = _setup(4, 2)
  with ckpt_lib.Checkpointer(str(tmp_path / "dp")) as ck:
    restored = ck.restore_or_none(fabstract)
  assert max_abs_diff(jax.device_get(restored.params), saved.params) == 0.0
  kernel = restored.params["backbone"]["conv"]["kernel"]  # [3, 3, 3, 8]
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 4)
  momentum = jax.tree.leaves(restored.opt_state)
  assert any(getattr(m, "sharding", None) is not None and "fsdp" in str(m.sharding.spec)
             for m in momentum)  # optimizer moments are split like their params
  fsdp_state = _run(fstep, restored, fmesh, batches[2:])
  assert fsdp_state.params["backbone"]["conv"]["kernel"].sharding.spec == P(
      None, None, None, "fsdp")
  assert int(fsdp_state.step) == 4
  assert max_abs_diff(jax.device_get(fsdp_state.params), ref.params) < 1e-5
  assert max_abs_diff(jax.device_get(fsdp_state.batch_stats), ref.batch_stats) < 1e-5

  # And back: the FSDP checkpoint onto a one-device mesh.
  with ckpt_lib.Checkpointer(str(tmp_path / "fsdp")) as ck:
    ck.save(4, fsdp_state)
  _, _, _, _, _, one_abstract, _ = _setup(1, 1)
  with ckpt_lib.Checkpointer(str(tmp_path / "fsdp")) as ck:
    back = ck.restore_or_none(one_abstract)
  assert len(back.params["head"]["kernel"].sharding.device_set) == 1
  assert max_abs_diff(jax.device_get(back.params), jax.device_get(fsdp_state.params)) == 0.0
  np.testing.assert_array_equal(int(back.step), 4)
