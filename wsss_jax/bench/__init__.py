"""Throughput benchmarks (issue #9): `python -m wsss_jax.bench --help`.

`steps.py` times the project's real jitted functions from a config (method train steps,
CAM inference, segmentation step); `kernels.py` the kernels the methods add (k-means, dense
CRF, memory banks, contrastive losses) against their CPU references; `timing.py` holds the
measurement rules (synchronised steady-state samples, XLA FLOPs, MFU, peak memory).
"""
