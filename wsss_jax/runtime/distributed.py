"""Multi-host JAX: start-up from the environment, barriers, and host-side gathers.

One Python process runs per host (TPU VM worker, SLURM task, or a localhost process in
tests); all processes run the same program on their share of the data. `initialize` starts
`jax.distributed` from, in order of precedence:

1. explicit arguments (`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
   on the command line), or the `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
   `JAX_PROCESS_ID` environment variables that `jax.distributed` itself reads;
2. `mode='on'`: JAX's own cluster detection (Cloud TPU VM metadata, GKE, SLURM, Open MPI);
   the TPU pod launcher uses this;
3. `mode='auto'` (the default): multi-task SLURM jobs (`SLURM_NTASKS` > 1 under `srun`)
   and TPU VMs whose `TPU_WORKER_HOSTNAMES` lists several workers; anything else is a
   single process and nothing is started.

After start-up every process sees every device (`jax.devices()`), the mesh spans them all,
and train batches are assembled from per-process shards (`runtime.mesh.to_global`).

The helpers below are no-ops (or trivial) in a single process, so stage code calls them
unconditionally. Results computed per process on the host (confusion matrices, per-image
scores) are merged with `sum_over_processes` / `gather_indexed`; both move raw bytes, so
int64 counts stay exact although JAX runs with 32-bit types.
"""
from __future__ import annotations

import os
from typing import Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from wsss_jax import fs

MODES = ("auto", "on", "off")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  try:
    return int(value) if value else None
  except ValueError as e:
    raise ValueError(f"Environment variable {name}={value!r} is not an integer") from e


def detect_cluster() -> str | None:
  """Names the multi-process launcher this process runs under, or None.

  Only launchers that say so in the environment are detected; a Cloud TPU VM found only
  through its metadata server needs `mode='on'` (the pod launcher passes it).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  ntasks = _env_int("SLURM_NTASKS") or _env_int("SLURM_NPROCS")
  if os.environ.get("SLURM_JOB_ID") and ntasks and ntasks > 1 and "SLURM_PROCID" in os.environ:
    return "slurm"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return "tpu"
  return None


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> bool:
  """Starts `jax.distributed` when this is one process of several (see module docstring).

  Must run before anything touches a JAX backend (`jax.devices()`, any array).

  Args:
    mode: `auto` | `on` | `off` (`--distributed`).
    coordinator_address: `host:port` of process 0 (explicit start-up).
    num_processes: total number of processes (explicit start-up).
    process_id: this process's index in `[0, num_processes)` (explicit start-up).
    local_device_ids: restrict this process to these local devices (e.g. one GPU per
      process); None = all.

  Returns:
    True when `jax.distributed` was started (or already running), False for a single
    process.

  Raises:
    ValueError: unknown mode, an incomplete explicit triple, an out-of-range process id,
      or a started system whose process count differs from `num_processes`.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}; expected one of {MODES}")
  if jax.distributed.is_initialized():
    return True
  if mode == "off":
    return False
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    missing = [n for n, v in zip(("coordinator_address", "num_processes", "process_id"),
                                 explicit) if v is None]
    if missing:
      raise ValueError(f"Explicit multi-process start-up needs --coordinator_address, "
                       f"--num_processes and --process_id; missing {missing}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, --num_processes="
                       f"{num_processes})")
    source = "flags"
  else:
    source = "jax cluster detection" if mode == "on" else detect_cluster()
    if source is None:
      return False
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
  logging.info("Starting jax.distributed (%s): coordinator=%s processes=%s id=%s", source,
               coordinator_address or "auto", num_processes or "auto",
               process_id if process_id is not None else "auto")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  check_started(num_processes)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def check_started(expected_processes: int | None = None) -> None:
  """Fails clearly when the started system is not what the launch asked for."""
  count = jax.process_count()
  if expected_processes is not None and count != expected_processes:
    raise ValueError(f"jax.distributed reports {count} processes but the launch asked "
                     f"for {expected_processes} (--num_processes / JAX_NUM_PROCESSES); "
                     "check that every process got the same value.")
  if count > 1 and jax.device_count() == jax.local_device_count():
    # CPU without a collectives implementation: each process sees only its own devices,
    # so "global" arrays would silently be per-process copies.
    raise ValueError(
        f"{count} processes are running but each sees only its {jax.local_device_count()} "
        "local devices; on CPU set jax_cpu_collectives_implementation='gloo' (the default "
        "in jax 0.10) before the backend starts.")


def is_chief() -> bool:
  """Process 0 writes the summary files, metrics and figures."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op in one process).

  Stages call it after writing per-process files to the shared work directory and before
  any process reads what the others wrote.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather(x: np.ndarray) -> np.ndarray:
  """`x` from every process, stacked: `[process_count, *x.shape]`, same dtype, exact.

  `x` must have the same shape and dtype on every process. The bytes are moved (as uint8),
  so int64 and float64 survive JAX's 32-bit default unchanged.
  """
  x = np.ascontiguousarray(x)
  if jax.process_count() == 1:
    return x[None]
  raw = x.reshape(-1).view(np.uint8)
  out = np.asarray(multihost_utils.process_allgather(raw, tiled=False))
  return out.view(x.dtype).reshape((jax.process_count(),) + x.shape)


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """Element-wise sum of `x` over processes (same shape everywhere), in `x`'s dtype."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  return allgather(x).sum(axis=0, dtype=x.dtype)


def all_processes_agree(flag: bool) -> bool:
  """True only when `flag` is true on every process (e.g. "this batch can be skipped")."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(allgather(np.asarray([bool(flag)], np.uint8)).min())


def gather_indexed(index: np.ndarray, values: Mapping[str, np.ndarray], num_records: int,
                   slots: int) -> dict[str, np.ndarray]:
  """Merges per-process rows into record order: what each process computed for its
  records becomes one array over all records, on every process.

  Args:
    index: int `[n]`, the record index of each local row (`n <= slots`).
    values: name -> `[n, ...]` local rows (same trailing shape and dtype everywhere).
    num_records: N, the number of records; every index in `[0, N)` must be given by
      exactly one process.
    slots: the most rows any process can hold (e.g. `num_batches_eval(N, B) * B //
      process_count`); rows are padded to it so every process sends the same shape.

  Returns:
    name -> `[N, ...]`, row i from the process that computed record i.

  Raises:
    ValueError: when a record is missing or computed twice.
  """
  index = np.asarray(index, np.int64).reshape(-1)
  if len(index) > slots:
    raise ValueError(f"gather_indexed: {len(index)} local rows > slots={slots}")
  padded_index = np.full((slots,), -1, np.int64)
  padded_index[:len(index)] = index
  all_index = allgather(padded_index).reshape(-1)
  live = all_index >= 0
  counts = np.bincount(all_index[live], minlength=num_records)
  if len(counts) > num_records or (counts != 1).any():
    bad = np.flatnonzero(counts != 1)[:5].tolist()
    raise ValueError(f"gather_indexed: records {bad} were computed {counts[bad].tolist()} "
                     f"times over {jax.process_count()} processes (expected once each)")
  out = {}
  for name, v in values.items():
    v = np.asarray(v)
    if v.shape[0] != len(index):
      raise ValueError(f"gather_indexed: {name!r} has {v.shape[0]} rows, index {len(index)}")
    padded = np.zeros((slots,) + v.shape[1:], v.dtype)
    padded[:len(v)] = v
    rows = allgather(padded).reshape((-1,) + v.shape[1:])
    merged = np.zeros((num_records,) + v.shape[1:], v.dtype)
    merged[all_index[live]] = rows[live]
    out[name] = merged
  return out


def check_shared_workdir(workdir: str) -> None:
  """Fails clearly when the processes do not share `workdir` (each would see only its own
  share of the per-image outputs). No-op in one process.

  Process 0 writes a fresh random token; every other process must read the same token.
  """
  if jax.process_count() == 1:
    return
  token = allgather(np.frombuffer(os.urandom(16), np.uint8))[0].tobytes().hex()
  path = os.path.join(workdir, ".wsss_shared_check")
  if is_chief():
    with fs.atomic_path(path) as tmp, open(tmp, "w") as f:
      f.write(token)
  barrier("shared_workdir:written")
  try:
    seen = fs.read_bytes(path).decode().strip()
  except OSError:
    seen = None
  ok = all_processes_agree(seen == token)  # returns once every process has read it
  if is_chief():
    try:
      fs.remove(path)
    except OSError:
      pass
  if not ok:
    raise ValueError(
        f"--workdir={workdir} is not shared by all {jax.process_count()} processes "
        f"(process {jax.process_index()} read {seen!r} from {path}, process 0 wrote "
        f"{token!r}); use a shared file system (NFS, Filestore) or a gs:// bucket.")


def shard_range(n: int) -> range:
  """The indices in `[0, n)` this process handles when host work is split round-robin."""
  return range(jax.process_index(), n, jax.process_count())
