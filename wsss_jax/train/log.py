"""Training telemetry: JSONL metrics (+ optional TensorBoard), tqdm progress, throughput/MFU.

- `MetricWriter`: one JSON object per line in `workdir/metrics.jsonl` (big_vision style;
  `pandas.read_json(path, lines=True)` reads it). TensorBoard event files are written only
  if `tensorboardX` is importable, or `flax.metrics.tensorboard` imports (it needs
  TensorFlow); otherwise a message is logged once and TensorBoard is skipped. In the pinned
  TF-free stack neither is available (checked: `tensorboardX` not installed,
  `flax.metrics.tensorboard` raises `ModuleNotFoundError: tensorflow`).
- `Chrono`: img/s, img/s/device, step time, MFU and ETA between log points, excluding
  compile and the time spent in evals and checkpoints (`pause`/`resume`).
- `xla_flops`, `peak_flops_per_device`: the MFU inputs (JAX_NOTES §3.2 (g)). XLA's
  `cost_analysis` of a sharded program counts FLOPs *per device*; MFU is achieved FLOP/s per
  device over the device's dense bf16 peak (also for float32 runs, which therefore show a
  low MFU by design). None where the peak is unknown (CPU).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from wsss_jax import fs

# Dense bf16 (fp16 for V100) peak FLOP/s per JAX device. TPU v2/v3 expose one device per
# core (half a chip); v4/v5p are megacore (device = chip).
_PEAK_FLOPS = (
    ("tpu v2", 22.5e12), ("tpu v3", 61.5e12), ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("gh200", 989e12),
    ("b200", 2250e12), ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12),
    ("l4", 121e12), ("a10g", 70e12), ("a10", 125e12), ("v100", 125e12),
)


def peak_flops_per_device(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default the first device); None if unknown/CPU."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for name, peak in _PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def xla_flops(compiled: Any) -> float | None:
  """FLOPs per device of one call of a compiled function (`jit(f).lower(...).compile()`)."""
  try:
    ca = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  (backend without cost analysis)
    logging.warning("cost_analysis unavailable: %s", e)
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  flops = float(ca["flops"])
  return flops if flops > 0 else None


def _to_json_value(v: Any) -> Any:
  if isinstance(v, (str, bool, int)) or v is None:
    return v
  a = np.asarray(v)
  if a.ndim == 0:
    return a.item() if a.dtype.kind in "biu" else float(a)
  return a.tolist()


def _end_cut_line(path: str) -> None:
  """Ends a last line cut off by a killed writer, so appended records start on a new line
  (readers then skip the one broken line instead of losing the next record with it)."""
  if fs.is_remote(path):
    return  # objects are uploaded whole (fs.append_text): no cut-off line is possible
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
      f.write(b"\n")


def is_event(record: Mapping[str, Any]) -> bool:
  """A record of something that happened (a NaN stop, a pre-emption), not a measurement:
  a resumed run keeps it even past the step it resumes from."""
  return "error" in record or "preempted" in record


def is_header(record: Mapping[str, Any]) -> bool:
  """The record `loop.train` writes when a run (re)starts: model size, compile time."""
  return "num_params" in record


class MetricWriter:
  """Appends `{'step': s, **metrics}` lines to `workdir/metrics.jsonl` (process 0 only).

  A resumed run first calls `rewind(step)`, so every step is logged once: the measurements
  a killed run logged after its last checkpoint are forgotten before they are logged again.

  Args:
    workdir: folder for `metrics.jsonl` (and `tb/` event files).
    tensorboard: also write TensorBoard scalars when a TF-free writer is importable.
    filename: the JSONL file name.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = False,
               filename: str = "metrics.jsonl"):
    self.chief = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if self.chief:
      fs.makedirs(workdir)
      _end_cut_line(self.path)
      if tensorboard:
        self._tb = _make_tb_writer(os.path.join(workdir, "tb"))

  def rewind(self, step: int) -> None:
    """Drops what earlier runs logged after `step` (the step this run starts from) and
    their start headers at `step`; events (`is_event`) stay. Lines cut by a kill go too.
    The file is rewritten atomically."""
    if not self.chief or not fs.exists(self.path):
      return
    kept, dropped = [], 0
    for line in fs.read_bytes(self.path).decode().splitlines():
      try:
        record = json.loads(line)
        s = int(record.get("step", -1))
      except (ValueError, TypeError, AttributeError):
        dropped += 1
        continue
      if is_event(record) or s < step or (s == step and not is_header(record)):
        kept.append(line)
      else:
        dropped += 1
    if dropped:
      with fs.atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
      logging.info("%s: dropped %d records logged after step %d by an earlier run (it "
                   "resumes from step %d).", self.path, dropped, step, step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.chief:
      return
    record = {"step": int(step)}
    record.update({k: _to_json_value(v) for k, v in metrics.items()})
    fs.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class _FlaxTB:
  """Adapter giving flax's SummaryWriter the tensorboardX method names."""

  def __init__(self, writer):
    self._w = writer

  def add_scalar(self, tag, value, step):
    self._w.scalar(tag, value, step)

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


def _make_tb_writer(logdir: str):
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX.SummaryWriter(logdir)
  except ImportError:
    pass
  try:
    from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
    return _FlaxTB(tensorboard.SummaryWriter(logdir))
  except ImportError as e:
    logging.warning("train.tensorboard=True but no TF-free TensorBoard writer is available "
                    "(tensorboardX not installed; flax.metrics.tensorboard: %s). Skipping "
                    "TensorBoard; metrics are in metrics.jsonl.", e)
    return None


class Chrono:
  """Throughput between log points, big_vision style.

  Call `start(step)` once the first (compiling/warming-up) step has finished, `pause()` /
  `resume()` around evals and checkpoints, and `tick(step)` at each log point after
  `jax.block_until_ready`.

  Args:
    global_batch: images per step (all devices).
    num_devices: devices the batch is split over.
    total_steps: for the ETA.
    flops_per_step: XLA FLOPs per device per step (None: no MFU).
    peak_flops: peak FLOP/s per device (None: no MFU).
  """

  def __init__(self, global_batch: int, num_devices: int, total_steps: int,
               flops_per_step: float | None = None, peak_flops: float | None = None):
    self.global_batch, self.num_devices = global_batch, num_devices
    self.total_steps = total_steps
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self._t = self._step = None
    self._paused_at = None
    self._paused = 0.0
    self.ema_step_time: float | None = None

  def start(self, step: int) -> None:
    self._t, self._step, self._paused = time.perf_counter(), step, 0.0

  @property
  def started(self) -> bool:
    return self._t is not None

  def pause(self) -> None:
    if self._paused_at is None:
      self._paused_at = time.perf_counter()

  def resume(self) -> None:
    if self._paused_at is not None:
      self._paused += time.perf_counter() - self._paused_at
      self._paused_at = None

  def tick(self, step: int) -> dict[str, float]:
    """Measures since the last tick/start; `{}` before `start` or with no new steps."""
    if self._t is None or step <= self._step:
      return {}
    now = time.perf_counter()
    dt = max(now - self._t - self._paused, 1e-9)
    n = step - self._step
    step_time = dt / n
    self.ema_step_time = step_time
    out = {"interval_s": dt, "step_time": step_time, "img/s": self.global_batch / step_time,
           "img/s/device": self.global_batch / step_time / self.num_devices,
           "eta_s": step_time * max(self.total_steps - step, 0)}
    if self.flops_per_step and self.peak_flops:
      out["mfu"] = self.flops_per_step / step_time / self.peak_flops
    if self.flops_per_step:
      out["tflop/s/device"] = self.flops_per_step / step_time / 1e12
    self._t, self._step, self._paused = now, step, 0.0
    return out


class Progress:
  """tqdm bar over steps with loss, img/s and ETA; a no-op when disabled or not process 0."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self._bar = None
    if enabled and jax.process_index() == 0:
      try:
        from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel
        self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                              smoothing=0.1)
      except ImportError:
        logging.info("tqdm not installed; no progress bar.")

  def update(self, n: int, metrics: Mapping[str, Any] | None = None) -> None:
    if self._bar is None:
      return
    if metrics:
      post = {}
      if "loss" in metrics:
        post["loss"] = f"{float(metrics['loss']):.4f}"
      if "img/s" in metrics:
        post["img/s"] = f"{float(metrics['img/s']):.1f}"
      self._bar.set_postfix(post, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  h, rem = divmod(int(seconds), 3600)
  return f"{h}h{rem // 60:02d}m"
