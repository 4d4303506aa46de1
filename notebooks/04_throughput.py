# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Throughput
#
# Reads the JSON lines of `python -m wsss_jax.bench` and plots images per second per
# device and model FLOP utilisation (MFU) against the batch size. Make the input with a
# batch-size sweep, for example
#
# ```
# python -m wsss_jax.bench --backbone=resnet50 --crop=448 --dtype=bfloat16 \
#     --sweep=data.batch_size=8,16,32,64 --out=runs/bench.jsonl
# ```
#
# `WSSS_BENCH` (or the cell below) lists one or more such files, comma-separated; files
# from several machines or settings can be plotted together (one line per setting).

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display

from wsss_jax import viz
from wsss_jax.analysis import reader

BENCH = [p for p in os.environ.get("WSSS_BENCH", "../runs/bench.jsonl").split(",") if p]

records = reader.read_bench(BENCH)
steps = [r for r in records if "kernel" not in r]
kernels = [r for r in records if "kernel" in r]
print(f"{len(steps)} step measurements, {len(kernels)} kernel measurements from {BENCH}")

# %% [markdown]
# ## Measurements
#
# One row per measurement. Times are medians over device-synchronised calls after warm-up,
# with the 10th and 90th percentiles: a wide p10–p90 range means the machine was not
# steady (other jobs, thermal throttling) and the point deserves a rerun. MFU is XLA's
# FLOP count per step over the step time and the device's bf16 peak; it is empty on CPU
# and on devices whose peak the library does not know.

# %%
COLUMNS = ("kind", "method", "backbone", "batch", "crop", "dtype", "devices", "device_kind",
           "time_median_s", "time_p10_s", "time_p90_s", "img/s/device", "mfu", "compile_s")
display(Markdown(reader.markdown([{c: r.get(c) for c in COLUMNS} for r in steps])))

# %% [markdown]
# ## img/s/device and MFU against the batch size
#
# Throughput per device should rise with the batch while the device is underused and
# flatten once it is saturated; the batch where it flattens is the smallest one that uses
# the device fully. MFU rising with it says the same in FLOP terms; a low MFU plateau points
# at memory-bound layers (depthwise convolutions, normalisation) or host overhead. A drop
# at large batches usually means the compiler had to rematerialise or spill.

# %%
if steps:
  display(viz.throughput(steps, x="batch"))
else:
  print("no step measurements: run `python -m wsss_jax.bench ... --out=FILE` first")

# %% [markdown]
# ## Scaling against the smallest batch
#
# img/s/device of each measurement divided by that of the smallest batch with the same
# setting: 1.0 means no gain from batching.

# %%
groups = {}
for r in steps:
  groups.setdefault(tuple(r.get(k) for k in viz.GROUP_KEYS), []).append(r)
rows = []
for key, rs in groups.items():
  rs = sorted(rs, key=lambda r: r["batch"])
  for r in rs:
    rows.append({"setting": " ".join(str(v) for v in key if v is not None), "batch": r["batch"],
                 "img/s/device": r["img/s/device"],
                 "vs smallest batch": r["img/s/device"] / rs[0]["img/s/device"]})
display(Markdown(reader.markdown(rows)))
if kernels:
  display(Markdown("### Kernel micro-benchmarks\n\n" + reader.markdown(kernels)))
