"""Benchmarks of the project's real jitted functions from a config: each method's train
step, multi-scale CAM inference and the segmentation step.

Inputs are random arrays with the shapes and dtypes of real batches (every step is
shape-static, so the content does not change the work; k-means and CRF run fixed
iterations) and weights are random (`model.pretrained=False`): throughput does not depend
on either. The mask is random class ids with an ignore border, standing in for the
pseudo-labels that SPML and the segmentation step train on.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections as mlc
import numpy as np

from wsss_jax import methods
from wsss_jax.bench import timing
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import state as state_lib
from wsss_jax.train import step as step_lib

# Extra per-pixel batch keys some methods train with: key -> host array maker.
BatchExtras = dict[str, Callable[[np.random.Generator, int, int], np.ndarray]]


def bench_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """A copy with random init (no weight files needed) and no warm start."""
  c = mlc.ConfigDict(config.to_dict())
  c.model.pretrained = False
  if "init_from" in c.train:
    c.train.init_from = ""
  return c


def random_train_batch(batch: int, crop: int, num_classes: int, seed: int = 0,
                       extras: BatchExtras | None = None) -> dict[str, np.ndarray]:
  """A host train batch of CONVENTIONS.md shapes: image, mask (255 border), labels."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((batch, num_classes - 1)) < 0.15).astype(np.float32)
  mask = rng.integers(0, num_classes, size=(batch, crop, crop)).astype(np.int32)
  mask[:, :, -crop // 8:] = 255
  out = {"image": rng.normal(size=(batch, crop, crop, 3)).astype(np.float32),
         "mask": mask, "labels": labels}
  for key, make in (extras or {}).items():
    out[key] = make(rng, batch, crop)
  return out


def grid_blocks(rng: np.random.Generator, batch: int, crop: int, block: int = 16
                ) -> np.ndarray:
  """[B, S, S] int32 ids of `block`-pixel squares: a stand-in superpixel map (SLIC on a
  224 crop gives a similar count of a few hundred regions)."""
  del rng
  yy, xx = np.mgrid[:crop, :crop] // block
  ids = (yy * ((crop + block - 1) // block) + xx).astype(np.int32)
  return np.broadcast_to(ids, (batch, crop, crop)).copy()


def config_extras(config: mlc.ConfigDict) -> BatchExtras:
  """The per-pixel maps `config.data.extra_maps` asks for (e.g. SPML's superpixels)."""
  return {key: grid_blocks for key in (config.data.get("extra_maps", ()) or ())}


def _setup(config: mlc.ConfigDict) -> tuple[Any, int]:
  mesh = mesh_lib.make_mesh(config.mesh)
  return mesh, mesh_lib.num_data_devices(mesh)


def _describe(config: mlc.ConfigDict, kind: str, name: str, batch: int, crop: int,
              n_dev: int) -> dict[str, Any]:
  return {"kind": kind, "method": name, "backbone": config.model.backbone, "batch": batch,
          "crop": crop, "dtype": config.model.dtype,
          "step_impl": config.mesh.get("step_impl", "jit"), "devices": n_dev,
          "output_stride": int(config.model.output_stride)}


def build_train_call(config: mlc.ConfigDict, num_classes: int, *, name: str | None = None,
                     batch: int | None = None, extras: BatchExtras | None = None
                     ) -> tuple[Callable[[], Any], Any, dict[str, Any]]:
  """The compiled `make_train_step` of method `name` (default `config.method`) on a random
  batch, as `(call, compiled, facts)`: each `call()` runs one step, carries the state to
  the next call and returns the loss; `facts` has the record fields, `compile_s` and
  `flops` (XLA's per-device count for one step, or None).

  `batch` defaults to `config.data.batch_size` (`config.seg.batch_size` for `seg`).
  """
  config = bench_config(config)
  name = name or config.method
  if batch is None:
    batch = int(config.seg.batch_size if name == "seg" else config.data.batch_size)
  crop = int(config.data.crop_size)
  mesh, n_dev = _setup(config)
  if batch % n_dev:
    raise ValueError(f"batch {batch} is not divisible by the {n_dev} devices of the mesh")
  method = methods.make_method(config, num_classes, name=name)
  if extras is None and name != "seg":
    extras = config_extras(config)
  host = random_train_batch(batch, crop, num_classes, extras=extras)
  arrays = mesh_lib.to_global(host, mesh)
  optimizer = state_lib.make_optimizer_for(method, config, host)
  state = state_lib.create_train_state(method, config, mesh, host, optimizer=optimizer)
  step = step_lib.make_train_step(method, optimizer, mesh, config)
  compiled, compile_s, flops = timing.compile_timed(step, state, arrays)
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], arrays)
    return metrics["loss"]

  facts = {**_describe(config, "train_step", name, batch, crop, n_dev),
           "compile_s": compile_s, "flops": flops}
  return call, compiled, facts


def measure_train_step(config: mlc.ConfigDict, num_classes: int, *, name: str | None = None,
                       batch: int | None = None, steps: int = 10, warmup: int = 2,
                       repeats: int = 1, extras: BatchExtras | None = None
                       ) -> dict[str, Any]:
  """Times `make_train_step` for method `name` (default `config.method`); see
  `build_train_call` for `batch` and `extras`."""
  call, _, facts = build_train_call(config, num_classes, name=name, batch=batch,
                                    extras=extras)
  flops = facts.pop("flops")
  times = timing.time_calls(call, warmup=warmup, steps=steps, repeats=repeats)
  loss = float(call())
  return {**facts, **times,
          **timing.throughput_fields(facts["batch"], facts["devices"],
                                     times["time_median_s"], flops),
          "loss": loss, "finite": bool(np.isfinite(loss)), **timing.peak_memory()}


def measure_cam_inference(config: mlc.ConfigDict, num_classes: int, *,
                          batch: int | None = None, size: int | None = None,
                          steps: int = 5, warmup: int = 1, repeats: int = 1
                          ) -> dict[str, Any]:
  """Times the `cams` stage's jitted function (all `config.cams.scales`, flip) on one
  eval batch padded to `size` (default `data.eval_pad_size`, else the crop)."""
  from wsss_jax.stages import cams as cams_stage  # pylint: disable=import-outside-toplevel
  config = bench_config(config)
  batch = int(batch or config.data.eval_batch_size)
  size = int(size or config.data.get("eval_pad_size", 0) or config.data.crop_size)
  mesh, n_dev = _setup(config)
  method = methods.make_method(config, num_classes)
  rng = np.random.default_rng(0)
  host = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "valid": np.ones((batch, size, size), bool),
          "labels": (rng.random((batch, num_classes - 1)) < 0.3).astype(np.float32)}
  arrays = mesh_lib.to_global(host, mesh)
  variables = jax.device_put(method.init(jax.random.key(0), host["image"][:1]),
                             mesh_lib.replicated(mesh))
  fn = jax.jit(cams_stage.cam_batch_fn(config, method.model))
  compiled, compile_s, flops = timing.compile_timed(fn, variables, arrays)
  times = timing.time_calls(lambda: compiled(variables, arrays), warmup=warmup, steps=steps,
                            repeats=repeats)
  return {**_describe(config, "cam_inference", config.method, batch, size, n_dev),
          "scales": list(config.cams.scales), "flip": bool(config.cams.flip),
          "compile_s": compile_s, **times,
          **timing.throughput_fields(batch, n_dev, times["time_median_s"], flops),
          **timing.peak_memory()}
