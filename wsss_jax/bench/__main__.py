r"""Benchmarks from a config; one JSON line per measurement, then a table.

  python -m wsss_jax.bench --config=configs/voc/csrm.py:runlocal --what=train,cams,seg
  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=448 --dtype=bfloat16
  python -m wsss_jax.bench --config=configs/voc/fbr.py:runlocal \
      --sweep=data.batch_size=8,16 --sweep=model.dtype=float32,bfloat16
  python -m wsss_jax.bench --what=kernels
  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --steps=5 \
      --sweep=model.maxpool_impl=window,argmax --interleave=3

`--interleave=N` runs the sweep points alternately, each in a fresh process, N rounds, and
reports each point's ratio to the first point per round: on a host whose speed drifts,
the comparison to trust (`bench/interleave.py`).

`--config` defaults to the embedded default (`configs/synthetic/cam.py`); `--backbone`,
`--batch`, `--crop`, `--dtype`, `--step_impl`, `--devices` are shortcuts for the config
keys `model.backbone`, `data.batch_size`, `data.crop_size`, `model.dtype`,
`mesh.step_impl`, `mesh.data`. `--method` benchmarks another method's step with the same
config (its own config blocks must be present, so prefer that method's config file).
What: `train` (config.method's train step), `baseline` (the CAM step with the same
config), `seg` (the segmentation step), `cams` (multi-scale CAM inference), `kernels`,
`torch` (the PyTorch eager ResNet-50 CAM step at the same batch/crop; `.[torch-bench]`),
`breakdown` (the CAM step cut into forward / BatchNorm / backward / update, JAX and, where
torch is installed, PyTorch; `bench/breakdown.py`), `profile` (config.method's train step,
time per HLO op from a profiler trace, grouped by forward/backward and convolution /
matmul / copy / ...; `bench/op_profile.py`; the trace is kept in `--trace_dir`):

  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --what=train,torch
  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --what=breakdown
  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --what=profile
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO_CONFIGS, "synthetic", "cam.py"),
    "Config file, `path.py` or `path.py:arg`.", lock_config=False)
_WHAT = flags.DEFINE_list("what", ["train"],
                          "train, baseline, seg, cams, kernels, torch, breakdown, profile")
_METHOD = flags.DEFINE_string("method", None, "Override config.method for `train`.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats (the spread is reported).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 21, "C incl. background (VOC: 21).")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "`key=v1,v2`: benchmark every combination of the listed values.")
_OUT = flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
_INTERLEAVE = flags.DEFINE_integer(
    "interleave", 0, "N > 0: N rounds, each running every --sweep point once in its own "
    "process, alternating; reports per-round medians and ratios (bench/interleave.py).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/wsss_jax_profile",
                                 "`profile`: where the profiler trace is written.")
_TOP = flags.DEFINE_integer("top", 15, "`profile`: the slowest ops listed (and emitted).")
_SHORTCUTS = {
    "backbone": ("model.backbone", flags.DEFINE_string("backbone", None, "model.backbone")),
    "batch": ("data.batch_size", flags.DEFINE_integer("batch", None, "data.batch_size")),
    "crop": ("data.crop_size", flags.DEFINE_integer("crop", None, "data.crop_size")),
    "dtype": ("model.dtype", flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                                               "model.dtype")),
    "step_impl": ("mesh.step_impl", flags.DEFINE_enum("step_impl", None,
                                                      ["jit", "shard_map"], "step impl")),
    "devices": ("mesh.data", flags.DEFINE_integer("devices", None, "mesh.data")),
}
jax.config.parse_flags_with_absl()

def main(argv) -> None:
  del argv
  from wsss_jax.bench import interleave  # pylint: disable=import-outside-toplevel
  from wsss_jax.bench import kernels  # pylint: disable=import-outside-toplevel
  from wsss_jax.bench import steps  # pylint: disable=import-outside-toplevel
  from wsss_jax.bench import sweep  # pylint: disable=import-outside-toplevel
  base = _CONFIG.value
  for key, (dotted, flag) in _SHORTCUTS.items():
    if flag.value is not None:
      sweep.set_key(base, dotted, flag.value)
  if _METHOD.value:
    base.method = _METHOD.value
  kw = dict(steps=_STEPS.value, warmup=_WARMUP.value, repeats=_REPEATS.value)
  records = []

  def emit(record):
    line = json.dumps(record)
    print(line, flush=True)
    records.append(record)
    if _OUT.value:
      with open(_OUT.value, "a") as f:
        f.write(line + "\n")

  if _INTERLEAVE.value:
    interleave.run(sys.argv[1:], sweep.sweep_points(_SWEEP.value), _INTERLEAVE.value, emit)
    print(interleave.format_rounds(records))
    return
  for point in sweep.sweep_points(_SWEEP.value):
    config = type(base)(base.to_dict())
    for k, v in point.items():
      sweep.set_key(config, k, v)
    c = _NUM_CLASSES.value
    for what in _WHAT.value:
      if what == "train":
        emit({**steps.measure_train_step(config, c, **kw), "sweep": point})
      elif what == "baseline":
        emit({**steps.measure_train_step(config, c, name="cam", **kw), "sweep": point})
      elif what == "seg":
        emit({**steps.measure_train_step(config, c, name="seg", **kw), "sweep": point})
      elif what == "cams":
        emit({**steps.measure_cam_inference(config, c, **kw), "sweep": point})
      elif what == "torch":
        from wsss_jax.bench import torch_baseline  # pylint: disable=import-outside-toplevel
        emit({**torch_baseline.measure_train_step(
            int(config.data.batch_size), int(config.data.crop_size), c,
            output_stride=int(config.model.output_stride), dtype=str(config.model.dtype),
            **kw), "sweep": point})
      elif what == "breakdown":
        from wsss_jax.bench import breakdown  # pylint: disable=import-outside-toplevel
        parts = breakdown.measure_breakdown(config, c, **kw)
        if importlib.util.find_spec("torch") is not None:
          from wsss_jax.bench import torch_baseline  # pylint: disable=import-outside-toplevel
          parts += torch_baseline.measure_breakdown(
              int(config.data.batch_size), int(config.data.crop_size), c,
              output_stride=int(config.model.output_stride), dtype=str(config.model.dtype),
              **kw)
        for record in parts:
          emit({**record, "sweep": point})
        print(breakdown.format_attribution(parts))
      elif what == "profile":
        from wsss_jax.bench import op_profile  # pylint: disable=import-outside-toplevel
        call, compiled, facts = steps.build_train_call(config, c)
        facts.pop("flops")
        result = op_profile.profile(call, compiled, calls=_STEPS.value,
                                    warmup=_WARMUP.value, trace_dir=_TRACE_DIR.value)
        for group in op_profile.summarize(result["ops"]):
          emit({**facts, "kind": "op_profile_group", **group, "sweep": point})
        for op in result["ops"][:_TOP.value]:
          emit({**facts, "kind": "op_profile_op", **op, "sweep": point})
        print(op_profile.format_profile(result, _TOP.value))
        print(f"trace: {result['trace']}")
      elif what == "kernels":
        for record in kernels.run_all(repeats=_REPEATS.value):
          emit(record)
      else:
        raise app.UsageError(f"--what: unknown {what!r}")
  table = sweep.format_table(records)
  if "\n" in table:  # a header alone: only kernel / op-profile records, printed above
    print(table)


if __name__ == "__main__":
  app.run(main)
