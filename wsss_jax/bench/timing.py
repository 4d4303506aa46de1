"""Timing and device facts shared by every benchmark: steady-state step times with the
device synchronised, spread over repeats, XLA FLOPs, MFU and peak memory.

Why per-call `block_until_ready`: JAX dispatch is asynchronous, so a loop of calls timed
without a barrier measures dispatch, not execution. Synchronising each call costs one
host-device round trip per step (microseconds), which is negligible next to the steps
measured here and makes every sample a complete step.
"""
from __future__ import annotations

import resource
import time
from typing import Any, Callable

import jax
import numpy as np

from wsss_jax.train import log as log_lib


def time_calls(call: Callable[[], Any], *, warmup: int, steps: int, repeats: int = 1
               ) -> dict[str, float]:
  """Times `call()` (which must return something to block on) after `warmup` calls.

  Returns seconds per call: median, mean, min, p10 and p90 over all `steps * repeats`
  samples, and the spread of the per-repeat means (`repeat_means_s`) so a user sees whether
  the machine was steady.
  """
  for _ in range(warmup):
    jax.block_until_ready(call())
  samples, means = [], []
  for _ in range(max(1, repeats)):
    chunk = []
    for _ in range(steps):
      t = time.perf_counter()
      jax.block_until_ready(call())
      chunk.append(time.perf_counter() - t)
    samples += chunk
    means.append(float(np.mean(chunk)))
  s = np.asarray(samples)
  return {"time_median_s": float(np.median(s)), "time_mean_s": float(s.mean()),
          "time_min_s": float(s.min()), "time_p10_s": float(np.percentile(s, 10)),
          "time_p90_s": float(np.percentile(s, 90)), "repeat_means_s": means,
          "samples": int(s.size)}


def compile_timed(fn: Any, *args: Any) -> tuple[Any, float, float | None]:
  """(compiled executable, compile seconds, XLA FLOPs per device per call or None)."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t, log_lib.xla_flops(compiled)


def peak_memory() -> dict[str, Any]:
  """Peak device memory where the backend reports it, else the host process's peak RSS."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_mem_gib": stats["peak_bytes_in_use"] / 2**30, "peak_mem_kind": "device"}
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"peak_mem_gib": rss_kib / 2**20, "peak_mem_kind": "host_rss"}


def throughput_fields(images: int, n_devices: int, seconds: float, flops: float | None
                      ) -> dict[str, Any]:
  """img/s, img/s/device, GFLOP per image and MFU (None on CPU or unknown devices).

  `flops` is XLA's per-device count for one call, so per image it is
  `flops * n_devices / images` and MFU = flops / seconds / peak.
  """
  device = jax.devices()[0]
  peak = log_lib.peak_flops_per_device(device)
  return {
      "img/s": images / seconds, "img/s/device": images / seconds / n_devices,
      "gflop_per_call_device": flops / 1e9 if flops else None,
      "gflop_per_image": flops * n_devices / images / 1e9 if flops else None,
      "mfu": flops / seconds / peak if (flops and peak) else None,
      "peak_tflops_device": peak / 1e12 if peak else None,
      "device_kind": device.device_kind, "platform": jax.default_backend(),
      "jax": jax.__version__,
  }
