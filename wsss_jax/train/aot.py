r"""Ahead-of-time compile check for a target topology, before any pod time is bought.

    python -m wsss_jax.train.aot --config=configs/coco/cam.py --topology=v5e:4x4
    python -m wsss_jax.train.aot --config=configs/voc/fbr.py --topology=v4:2x2x2 \
        --config.mesh.fsdp=4 --what=train,seg

The train step (and the segmentation step) of the config is traced, partitioned and
compiled by XLA for the devices of the topology (`jax.experimental.topologies`, compile-only
devices: no TPU is attached), with abstract inputs of the real shapes and shardings. What
this catches on a CPU VM: sharding errors (a batch that does not divide the mesh, a bad
`mesh.fsdp`), shape errors, and programs that do not fit: XLA's memory analysis per device
(arguments + outputs + temporaries - aliased donations) is compared to the device's HBM and
the check fails when it is over `--memory_fraction` of it.

TPU topologies need libtpu (`pip install "jax[tpu]==0.10.2"`), which builds them without a
TPU. Without `--topology` the check compiles for the attached devices (`--num_devices` of
them), which is how the tests exercise the same path on CPU.

Prints one JSON line per compiled function and exits non-zero if any check failed.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from wsss_jax.train import log as log_lib
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import state as state_lib
from wsss_jax.train import step as step_lib

# HBM per JAX device (bytes). TPU v2/v3 expose one device per core.
HBM_BYTES = (("tpu v2", 8 << 30), ("tpu v3", 16 << 30), ("tpu v4", 32 << 30),
             ("tpu v5 lite", 16 << 30), ("tpu v5e", 16 << 30), ("tpu v5p", 95 << 30),
             ("tpu v5", 95 << 30), ("tpu v6 lite", 32 << 30), ("tpu v6e", 32 << 30),
             ("tpu7x", 192 << 30))
# Classes per dataset when the data is not on the compile machine (background included).
NUM_CLASSES = {"voc": 21, "coco": 81, "synthetic": 11}


def hbm_bytes(device: Any) -> int | None:
  """Device memory in bytes for known TPU kinds; None if unknown (e.g. CPU)."""
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, size in HBM_BYTES:
    if name in kind:
      return size
  return None


def topology_devices(topology: str = "", num_devices: int = 0) -> list[Any]:
  """The compile-only devices of a TPU `topology` (e.g. 'v5e:4x4', 'v4:2x2x2'), or the
  first `num_devices` attached devices (all when 0) if `topology` is empty."""
  if not topology:
    devices = jax.devices()
    return devices[:num_devices] if num_devices else devices
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # Compile-only: keep libtpu from querying the GCE metadata server for this machine's
  # TPU workers (off a TPU VM those queries hang for minutes before failing).
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_WORKER_ID", "0")):
    os.environ.setdefault(key, value)
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except RuntimeError as e:
    raise RuntimeError(f"--topology={topology}: cannot build a TPU topology here ({e}). "
                       'Install libtpu: pip install "jax[tpu]==0.10.2"') from e


def mesh_for(mesh_cfg: Any, devices: Sequence[Any]) -> Mesh:
  """The config's mesh over `devices` in the topology's physical order."""
  fsdp = int(mesh_cfg.get("fsdp", 1) or 1)
  data = int(mesh_cfg.get("data", -1))
  if len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
  data = len(devices) // fsdp if data == -1 else data
  if data * fsdp != len(devices):
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} != {len(devices)} devices of "
                     "the topology; AOT compiles for the whole topology")
  shape, names = ((data, fsdp), (mesh_lib.DATA_AXIS, mesh_lib.FSDP_AXIS)) if fsdp > 1 else (
      (data,), (mesh_lib.DATA_AXIS,))
  try:
    grid = mesh_utils.create_device_mesh(shape, list(devices))
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.array(devices).reshape(shape)  # CPU devices have no physical topology
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(shape))


def abstract_batch(config: mlc.ConfigDict, mesh: Mesh, batch: int, num_classes: int
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """A train batch (CONVENTIONS.md) as sharded ShapeDtypeStructs; `data.extra_maps`
  (e.g. SPML's superpixels) are int32 `[B, S, S]` maps."""
  s = int(config.data.crop_size)
  sharding = mesh_lib.batch_sharding(mesh)
  out = {"image": ((batch, s, s, 3), jnp.float32), "mask": ((batch, s, s), jnp.int32),
         "valid": ((batch, s, s), jnp.bool_),
         "labels": ((batch, num_classes - 1), jnp.float32)}
  for name in config.data.get("extra_maps", ()) or ():
    out[name] = ((batch, s, s), jnp.int32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in out.items()}


def compile_train_step(config: mlc.ConfigDict, devices: Sequence[Any], num_classes: int, *,
                       name: str | None = None, memory_fraction: float = 0.9
                       ) -> dict[str, Any]:
  """Compiles method `name`'s train step (`seg`: the segmentation step) for `devices`.

  Returns:
    A JSON-able report: devices, mesh, batch, per-device bytes (arguments, outputs,
    temporaries, total), the device's HBM, FLOPs per device, `ok` and `error`.
  """
  from wsss_jax import methods  # pylint: disable=import-outside-toplevel
  c = mlc.ConfigDict(config.to_dict())
  c.model.pretrained = False  # shapes only: no weight files on the compile machine
  if "init_from" in c.train:
    c.train.init_from = ""
  name = name or c.method
  batch = int(c.seg.batch_size if name == "seg" else c.data.batch_size)
  report: dict[str, Any] = {"what": f"train_step:{name}", "devices": len(devices),
                            "device_kind": str(devices[0].device_kind), "batch": batch,
                            "crop": int(c.data.crop_size), "backbone": c.model.backbone,
                            "ok": False}
  try:
    mesh = mesh_for(c.mesh, devices)
    report["mesh"] = dict(mesh.shape)
    n = mesh_lib.num_data_devices(mesh)
    if batch % n:
      raise ValueError(f"batch {batch} does not divide over the {n} devices of the mesh "
                       f"{dict(mesh.shape)}")
    method = methods.make_method(c, num_classes, name=name)
    sample = {"image": (batch, int(c.data.crop_size), int(c.data.crop_size), 3)}
    optimizer = state_lib.make_optimizer_for(method, c, sample)
    abstract = state_lib.abstract_train_state(method, c, mesh, sample, optimizer=optimizer)
    step = step_lib.make_train_step(
        method, optimizer, mesh, c,
        state_shardings=jax.tree.map(lambda a: a.sharding, abstract))
    compiled = step.lower(abstract, abstract_batch(c, mesh, batch, num_classes)).compile()
  except Exception as e:  # pylint: disable=broad-except  (reported, not raised)
    report["error"] = f"{type(e).__name__}: {e}"
    return report
  flops = log_lib.xla_flops(compiled)
  if flops:
    report["gflop_per_device"] = flops / 1e9
  mem = compiled.memory_analysis()
  if mem is not None:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    report.update(argument_bytes=int(mem.argument_size_in_bytes),
                  output_bytes=int(mem.output_size_in_bytes),
                  temp_bytes=int(mem.temp_size_in_bytes),
                  alias_bytes=int(mem.alias_size_in_bytes), total_bytes=int(total))
    hbm = hbm_bytes(devices[0])
    if hbm:
      report["hbm_bytes"] = hbm
      report["hbm_fraction"] = total / hbm
      if total > memory_fraction * hbm:
        report["error"] = (f"out of memory: {total / 2**30:.2f} GiB per device needed, "
                           f"{memory_fraction:.0%} of {hbm / 2**30:.0f} GiB HBM available")
        return report
  report["ok"] = True
  return report


def define_flags() -> dict[str, Any]:
  """The command-line flags, defined only when this module runs as a program (absl flags
  are process-global: defining them at import would clash with other CLIs' `--config`)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Config file (configs/...).",
                                                lock_config=True),
      "topology": flags.DEFINE_string("topology", "", "TPU topology, e.g. v5e:4x4, v4:2x2x2; "
                                      "empty = the attached devices."),
      "num_devices": flags.DEFINE_integer("num_devices", 0, "Without --topology: this many "
                                          "of the attached devices (0 = all)."),
      "what": flags.DEFINE_list("what", ["train"], "train (config.method's step), seg."),
      "num_classes": flags.DEFINE_integer("num_classes", 0, "Classes incl. background (0 = "
                                          "by data.name: voc 21, coco 81, synthetic 11)."),
      "memory_fraction": flags.DEFINE_float("memory_fraction", 0.9, "Fail above this "
                                            "fraction of the device's HBM."),
  }


_FLAGS: dict[str, Any] = {}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _FLAGS["config"].value
  num_classes = _FLAGS["num_classes"].value or NUM_CLASSES.get(config.data.name)
  if not num_classes:
    raise app.UsageError(f"--num_classes is needed for data.name={config.data.name!r}")
  devices = topology_devices(_FLAGS["topology"].value, _FLAGS["num_devices"].value)
  failed = False
  for what in _FLAGS["what"].value:
    if what not in ("train", "seg"):
      raise app.UsageError(f"--what={what!r}; expected train or seg")
    report = compile_train_step(config, devices, num_classes,
                                name="seg" if what == "seg" else None,
                                memory_fraction=_FLAGS["memory_fraction"].value)
    report["topology"] = _FLAGS["topology"].value or "attached"
    print(json.dumps(report), flush=True)
    failed |= not report["ok"]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  flags.mark_flags_as_required(["config"])
  app.run(main)
