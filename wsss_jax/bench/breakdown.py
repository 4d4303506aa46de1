"""Where a CAM train step's time goes: the same step cut into nested phases.

  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --what=breakdown

Phases, each a separately jitted function of the real model and loss at the config's
shapes (random weights and inputs: the work does not depend on them):

  fwd_eval   forward, BatchNorm with running statistics (inference): the convolutions
  fwd_train  forward, BatchNorm with batch statistics (what training runs)
  fwd_bwd    value_and_grad of the method's loss (forward + backward, no update)
  step       the project's full train step (`train/step.py`: + optimizer update, metrics)

Differences between consecutive phases attribute the time: fwd_train - fwd_eval is the
cost of batch-statistic BatchNorm, fwd_bwd - fwd_train the backward pass, step - fwd_bwd
the optimizer update and bookkeeping. `torch_baseline.measure_breakdown` cuts PyTorch's
eager step the same way, so the two frameworks can be compared phase by phase.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc

from wsss_jax import methods
from wsss_jax.bench import steps as steps_lib
from wsss_jax.bench import timing
from wsss_jax.methods import base

PHASES = ("fwd_eval", "fwd_train", "fwd_bwd", "step")


def measure_breakdown(config: mlc.ConfigDict, num_classes: int, *, steps: int = 5,
                      warmup: int = 1, repeats: int = 1) -> list[dict[str, Any]]:
  """One record per phase of the CAM-baseline step (`kind='breakdown'`, `phase`)."""
  config = steps_lib.bench_config(config)
  config.mesh.data = 1  # a one-device analysis: every phase runs on the first device
  batch, crop = int(config.data.batch_size), int(config.data.crop_size)
  method = methods.make_method(config, num_classes, name="cam")
  host = steps_lib.random_train_batch(batch, crop, num_classes)
  arrays = jax.tree.map(jax.numpy.asarray, host)
  variables = method.init(jax.random.key(0), host["image"][:1])
  model, ctx = method.model, base.StepContext(model=method.model)

  def fwd_eval(v, x):
    return model.apply(v, x, train=False)["cams"]

  def fwd_train(v, x):
    out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    return out["cams"]

  def fwd_bwd(v, b):
    def loss(params):
      return method.loss(params, v["batch_stats"], {}, b, jax.random.key(1),
                         jax.numpy.int32(0), ctx)
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(v["params"])
    return value, grads

  records = []
  for phase, fn, arg in (("fwd_eval", fwd_eval, arrays["image"]),
                         ("fwd_train", fwd_train, arrays["image"]),
                         ("fwd_bwd", fwd_bwd, arrays)):
    compiled, compile_s, flops = timing.compile_timed(jax.jit(fn), variables, arg)
    times = timing.time_calls(lambda c=compiled, a=arg: c(variables, a), warmup=warmup,
                              steps=steps, repeats=repeats)
    records.append({"kind": "breakdown", "phase": phase, "framework": "jax",
                    "method": "cam", "backbone": config.model.backbone, "batch": batch,
                    "crop": crop, "dtype": config.model.dtype, "devices": 1,
                    "compile_s": compile_s,
                    **times, **timing.throughput_fields(batch, 1, times["time_median_s"],
                                                        flops)})
  full = steps_lib.measure_train_step(config, num_classes, name="cam", steps=steps,
                                      warmup=warmup, repeats=repeats)
  records.append({**full, "kind": "breakdown", "phase": "step", "framework": "jax"})
  return records


def attribute(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """`{framework: {part: seconds}}` from breakdown records: convolutions (fwd_eval), batch
  BatchNorm (fwd_train - fwd_eval), backward (fwd_bwd - fwd_train), update (step - fwd_bwd).
  """
  out: dict[str, dict[str, float]] = {}
  for fw in sorted({r["framework"] for r in records}):
    t = {r["phase"]: r["time_median_s"] for r in records if r["framework"] == fw}
    if not all(p in t for p in PHASES):
      continue
    out[fw] = {"forward": t["fwd_eval"], "batchnorm_stats": t["fwd_train"] - t["fwd_eval"],
               "backward": t["fwd_bwd"] - t["fwd_train"], "update": t["step"] - t["fwd_bwd"],
               "step": t["step"]}
  return out


def format_attribution(records: list[dict[str, Any]]) -> str:
  """Text table: seconds per part and framework, and the JAX/PyTorch ratio (>1: JAX slower)."""
  parts = attribute(records)
  if not parts:
    return ""
  fws = list(parts)
  lines = ["part".ljust(16) + "".join(f.rjust(12) for f in fws)
           + ("  jax/torch" if set(fws) == {"jax", "torch"} else "")]
  for part in ("forward", "batchnorm_stats", "backward", "update", "step"):
    row = part.ljust(16) + "".join(f"{parts[f][part]:12.3f}" for f in fws)
    if set(fws) == {"jax", "torch"} and abs(parts["torch"][part]) > 1e-6:
      row += f"  {parts['jax'][part] / parts['torch'][part]:9.2f}"
    lines.append(row)
  return "\n".join(lines)
