r"""Throughput benchmark of the CAM train step (the shared step with the CAM method).

  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --steps=20 \
      [--dtype=bfloat16] [--step_impl=jit|shard_map] [--devices=-1]

Prints one JSON line per run: img/s/device, step time, compile time, XLA FLOPs, MFU
(accelerators with a known bf16 peak; None on CPU), peak memory (device `memory_stats`
where the backend has them, else the host's peak RSS) and the setup. Random inputs and
random init (`pretrained=False`): throughput does not depend on the weights. `--batch` is
the global batch; it is split over the devices of the `data` mesh axis.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import jax
import ml_collections as mlc
import numpy as np


def _base_config() -> mlc.ConfigDict:
  """configs/common.py's defaults when the repository is at hand, else the same blocks."""
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs")
  if os.path.isfile(os.path.join(configs_dir, "common.py")):
    sys.path.insert(0, configs_dir)
    try:
      import common  # pylint: disable=import-outside-toplevel,import-error
      return common.base_config(method="cam", dataset="synthetic", runlocal=False)
    finally:
      sys.path.remove(configs_dir)
  c = mlc.ConfigDict()
  c.method, c.seed = "cam", 0
  c.data = mlc.ConfigDict(dict(crop_size=224, batch_size=8))
  c.mesh = mlc.ConfigDict(dict(data=-1, step_impl="jit"))
  c.optim = mlc.ConfigDict(dict(
      name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="poly", poly_power=0.9,
      warmup_steps=0, clip_global_norm=0.0, no_decay_bias=True, frozen=(),
      lr_mult=dict(pretrained=1.0, pretrained_bias=2.0, head=10.0, head_bias=20.0)))
  c.train = mlc.ConfigDict(dict(num_steps=1000))
  c.model = mlc.ConfigDict(dict(backbone="resnet50", pretrained=False, weights_path="",
                                output_stride=16, norm="batch", frozen_bn=False, pool="gap",
                                dtype="float32"))
  return c


def _peak_memory() -> dict[str, Any]:
  stats = None
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_mem_gib": stats["peak_bytes_in_use"] / 2**30, "peak_mem_kind": "device"}
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"peak_mem_gib": rss_kib / 2**20, "peak_mem_kind": "host_rss"}


def run(backbone: str, batch: int, crop: int, steps: int, *, dtype: str = "float32",
        step_impl: str = "jit", devices: int = -1, warmup: int = 2, num_classes: int = 21,
        output_stride: int = 16, frozen_bn: bool = False, model=None) -> dict[str, Any]:
  """Benchmarks the CAM train step; returns the JSON record.

  Args:
    backbone: `config.model.backbone` (a `wsss_jax.models.BACKBONES` name).
    batch: global batch size.
    crop: square input size.
    steps: timed steps (after `warmup` untimed ones).
    dtype: compute dtype (`float32` | `bfloat16`); params stay float32.
    step_impl: `jit` | `shard_map`.
    devices: devices on the `data` axis (-1 = all).
    warmup: untimed steps after compilation.
    num_classes: C (background included); VOC = 21.
    output_stride: backbone output stride.
    frozen_bn: BatchNorm in inference mode and frozen.
    model: override the model (tests).
  """
  # Imported here so `--help` is instant.
  from wsss_jax.methods.cam import make_cam_method  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import log as log_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  cfg = _base_config()
  cfg.model.backbone, cfg.model.dtype, cfg.model.pretrained = backbone, dtype, False
  cfg.model.output_stride, cfg.model.frozen_bn = output_stride, frozen_bn
  cfg.mesh.data, cfg.mesh.step_impl = devices, step_impl
  cfg.data.batch_size, cfg.data.crop_size = batch, crop
  mesh = mesh_lib.make_mesh(cfg.mesh)
  n_dev = mesh_lib.num_data_devices(mesh)
  if batch % n_dev:
    raise ValueError(f"--batch={batch} is not divisible by {n_dev} devices")

  method = make_cam_method(cfg, num_classes, model=model)
  rng = np.random.default_rng(0)
  host = {"image": rng.normal(size=(batch, crop, crop, 3)).astype(np.float32),
          "labels": (rng.random((batch, num_classes - 1)) < 0.15).astype(np.float32)}
  batch_arrays = mesh_lib.to_global(host, mesh)
  optimizer = state_lib.make_optimizer_for(method, cfg, host)
  t0 = time.perf_counter()
  state = state_lib.create_train_state(method, cfg, mesh, host, optimizer=optimizer)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step = step_lib.make_train_step(method, optimizer, mesh, cfg)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t0
  flops = log_lib.xla_flops(compiled)

  for _ in range(warmup):
    state, metrics = compiled(state, batch_arrays)
  jax.block_until_ready(metrics)
  per_step = []
  t_all = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics["loss"])
    per_step.append(time.perf_counter() - t)
  total = time.perf_counter() - t_all
  step_time = total / steps
  loss = float(metrics["loss"])

  peak = log_lib.peak_flops_per_device(mesh.devices.flat[0])
  record = {
      "backbone": backbone, "batch": batch, "crop": crop, "dtype": dtype,
      "step_impl": step_impl, "devices": n_dev, "output_stride": output_stride,
      "device_kind": mesh.devices.flat[0].device_kind, "platform": jax.default_backend(),
      "steps": steps, "img/s": batch / step_time, "img/s/device": batch / step_time / n_dev,
      "step_time_s": step_time, "step_time_median_s": float(np.median(per_step)),
      "compile_s": compile_s, "init_s": init_s,
      "gflop_per_step_device": flops / 1e9 if flops else None,
      "gflop_per_image": flops * n_dev / batch / 1e9 if flops else None,
      "mfu": flops / step_time / peak if (flops and peak) else None,
      "loss": loss, "finite": bool(np.isfinite(loss)), "jax": jax.__version__,
  }
  record.update(_peak_memory())
  return record


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--crop", type=int, default=224)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--step_impl", default="jit", choices=["jit", "shard_map"])
  p.add_argument("--devices", type=int, default=-1)
  p.add_argument("--num_classes", type=int, default=21)
  p.add_argument("--output_stride", type=int, default=16)
  p.add_argument("--frozen_bn", action="store_true")
  p.add_argument("--out", default="", help="also append the JSON line to this file")
  a = p.parse_args(argv)
  rec = run(a.backbone, a.batch, a.crop, a.steps, dtype=a.dtype, step_impl=a.step_impl,
            devices=a.devices, warmup=a.warmup, num_classes=a.num_classes,
            output_stride=a.output_stride, frozen_bn=a.frozen_bn)
  line = json.dumps(rec)
  print(line, flush=True)
  if a.out:
    with open(a.out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
