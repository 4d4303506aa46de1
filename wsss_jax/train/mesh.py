"""Device mesh and shardings for data-parallel training.

The mesh has one axis, `data`. It is built with `AxisType.Auto` on purpose: `jax.make_mesh`
defaults to *Explicit* axes in jax 0.10, under which a contraction over the sharded batch
axis (global Gram matrices, k-means updates) raises `ShardingTypeError` (JAX_NOTES P1).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_cfg: Mapping[str, Any] | None = None, devices=None) -> Mesh:
  """Builds a 1-D `('data',)` mesh with Auto axis type.

  Args:
    mesh_cfg: the `config.mesh` block; `data` is the number of devices on the axis
      (-1 = all devices). `None` means all devices.
    devices: the devices to choose from (default `jax.devices()`, all processes).

  Returns:
    A `Mesh` over the first `data` devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = -1 if mesh_cfg is None else int(mesh_cfg.get("data", -1))
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"mesh.data={n} but only {len(devices)} devices are available")
  if n == len(devices) and devices == list(jax.devices()):
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))
  if jax.process_count() > 1:
    raise ValueError("A sub-mesh (mesh.data < all devices) is single-process only.")
  return Mesh(np.array(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (the train state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def num_data_devices(mesh: Mesh) -> int:
  """Number of devices on the `data` axis."""
  return int(mesh.shape[DATA_AXIS])


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array, np.number)) and np.asarray(x).dtype.kind in "biuf"


def data_shards(mesh: Mesh) -> tuple[int, int]:
  """(size of the mesh's `data` axis, data-axis positions held by this process)."""
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"Mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis")
  axis = mesh.axis_names.index(DATA_AXIS)
  devices = np.asarray(mesh.devices)
  pid = jax.process_index()
  local = {idx[axis] for idx in np.ndindex(devices.shape)
           if devices[idx].process_index == pid}
  return devices.shape[axis], max(1, len(local))


def to_global(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's share of a batch into global arrays sharded `P('data')`.

  Non-numeric leaves (string ids) are dropped: they cannot live on a device. Arrays that
  already are global with the batch sharding pass through unchanged.

  Args:
    local_batch: dict of host arrays with the per-process batch on axis 0.
    mesh: the mesh; the global batch is `process_count` times the local one.

  Returns:
    Dict of global `jax.Array`s.

  Raises:
    ValueError: when a local batch does not split evenly over this process's data
      devices (the global batch size must divide by the mesh's data axis size).
  """
  sharding = batch_sharding(mesh)
  data_size, local_shards = data_shards(mesh)
  out = {}
  for k, v in local_batch.items():
    if isinstance(v, Mapping):
      out[k] = to_global(v, mesh)
    elif isinstance(v, jax.Array) and v.sharding.is_equivalent_to(sharding, v.ndim):
      out[k] = v  # Already a global batch with the right sharding.
    elif _is_array_like(v):
      v = np.asarray(v)
      if v.ndim == 0 or v.shape[0] % local_shards:
        raise ValueError(
            f"to_global: {k!r} has local batch {v.shape[:1]}, not divisible by this "
            f"process's {local_shards} devices on the '{DATA_AXIS}' axis (mesh data size "
            f"{data_size}); the global batch size must divide by {data_size}.")
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
