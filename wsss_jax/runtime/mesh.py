"""Device mesh and shardings for data-parallel (and FSDP) training.

`config.mesh.fsdp == 1` (default): one axis, `data`; the batch is split over it and the
train state is replicated (pure data parallelism).

`config.mesh.fsdp = F > 1`: two axes `('data', 'fsdp')` of sizes (D, F). The batch is
split over both (all D*F devices, `P(('data', 'fsdp'))`), and large parameters and their
optimizer state are split over `fsdp` (`train.state.state_shardings`): XLA all-gathers a
parameter where it is used and reduce-scatters its gradient, so memory per device for the
state drops by about F (FSDP / ZeRO-3). The math is that of the replicated step.

Meshes are built with `AxisType.Auto` on purpose: `jax.make_mesh` defaults to *Explicit*
axes in jax 0.10, under which a contraction over the sharded batch axis (global Gram
matrices, k-means updates) raises `ShardingTypeError` (JAX_NOTES P1).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def make_mesh(mesh_cfg: Mapping[str, Any] | None = None, devices=None) -> Mesh:
  """Builds the `('data',)` or `('data', 'fsdp')` mesh with Auto axis types.

  Args:
    mesh_cfg: the `config.mesh` block; `data` is the number of devices on the data axis
      (-1 = all devices / fsdp), `fsdp` the size of the parameter-sharding axis (default
      1: no such axis). `None` means all devices, data parallel.
    devices: the devices to choose from (default `jax.devices()`, all processes).

  Returns:
    A `Mesh` over the first `data * fsdp` devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = -1 if mesh_cfg is None else int(mesh_cfg.get("data", -1))
  fsdp = 1 if mesh_cfg is None else int(mesh_cfg.get("fsdp", 1) or 1)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {len(devices)} "
                     "devices")
  if n == -1:
    n = len(devices) // fsdp
  if fsdp > 1:
    if not 1 <= n * fsdp <= len(devices):
      raise ValueError(f"mesh.data={n} x mesh.fsdp={fsdp} needs {n * fsdp} devices; "
                       f"{len(devices)} are available")
    if n * fsdp == len(devices) and devices == list(jax.devices()):
      return jax.make_mesh((n, fsdp), (DATA_AXIS, FSDP_AXIS),
                           axis_types=(AxisType.Auto, AxisType.Auto))
    if jax.process_count() > 1:
      raise ValueError("A sub-mesh (mesh.data x mesh.fsdp < all devices) is "
                       "single-process only.")
    return Mesh(np.array(devices[:n * fsdp]).reshape(n, fsdp), (DATA_AXIS, FSDP_AXIS),
                axis_types=(AxisType.Auto, AxisType.Auto))
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


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: `('data',)` or `('data', 'fsdp')`."""
  return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over `data` (and `fsdp`)."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def num_data_devices(mesh: Mesh) -> int:
  """Number of devices the batch is split over (`data` x `fsdp`)."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array, np.number)) and np.asarray(x).dtype.kind in "biuf"


def data_shards(mesh: Mesh) -> tuple[int, int]:
  """(batch shards in the mesh, batch shards held by this process): the batch axes'
  total size, and how many distinct positions along them this process's devices hold."""
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"Mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis")
  axes = [mesh.axis_names.index(a) for a in batch_axes(mesh)]
  devices = np.asarray(mesh.devices)
  pid = jax.process_index()
  local = {tuple(idx[a] for a in axes) for idx in np.ndindex(devices.shape)
           if devices[idx].process_index == pid}
  return num_data_devices(mesh), max(1, len(local))


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
