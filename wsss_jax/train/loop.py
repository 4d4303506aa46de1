"""The training loop shared by every method: resume, step, log, eval, checkpoint, NaN guard.

`train(method, config, workdir, train_iter_factory, mesh)` runs `config.train.num_steps`
updates of the one train step (`step.make_train_step`), resuming from the newest checkpoint
in `workdir/checkpoints` (train state *and* data-iterator position). Outputs in `workdir`:

- `metrics.jsonl`: a `{"step": 0, "num_params": ..., "compile_s": ..., "gflop_per_step_device":
  ...}` header (at the resumed step after a restart), then every `train.log_every` steps `step, loss, lr, lr/<group>, l2_grads,
  l2_params, l2_updates`, the method's metrics (averaged over the steps since the last log;
  `lr*` and `l2_*` are the last step's values), `step_time`, `img/s`, `img/s/device`,
  `mfu` (accelerators), `tflop/s/device`, `data_wait_frac`, `eta_s`; eval results as
  `eval/<name>`; a final `{"step": s, "error": ...}` line if the NaN guard fires. A resumed
  run first drops what the interrupted one logged after the checkpoint it resumes from
  (`MetricWriter.rewind`): every step is logged once.
- `checkpoints/<step>/`: every `train.ckpt_every` steps and at the end, the newest
  `train.keep_checkpoints` kept.
- `tb/`: TensorBoard scalars when `train.tensorboard` and a TF-free writer exists.

NaN guard: each step's metrics stay on device (no per-step host sync); at every log,
eval and checkpoint step they are fetched and checked in order, so the error names the first
step and metric that went non-finite (`loss*`, `l2_*`). Training then stops with
`NonFiniteError`; no later checkpoint is written (the checkpointer also refuses non-finite
states), so the newest checkpoint on disk is the last finite one.

Preemption (`runtime/preemption.py`): after every step the loop polls the SIGTERM/SIGINT
flag; when set it saves a checkpoint of that step (data position included), writes a
`{"step": s, "preempted": ...}` line and raises `Preempted`. A rerun resumes exactly there.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from wsss_jax import fs
from wsss_jax.methods.base import Method
from wsss_jax.train import checkpoint as ckpt_lib
from wsss_jax.train import log as log_lib
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import nan_guard
from wsss_jax.train import optim as optim_lib
from wsss_jax.runtime import preemption
from wsss_jax.train import state as state_lib
from wsss_jax.train import step as step_lib
from wsss_jax.train.nan_guard import NonFiniteError
from wsss_jax.train.state import TrainState

EvalFn = Callable[[TrainState, int], Mapping[str, Any] | None]


def default_sample_batch_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """`{'image': (B, S, S, 3)}` from `config.data.batch_size` and `crop_size`."""
  s = int(config.data.crop_size)
  return {"image": (int(config.data.batch_size), s, s, 3)}


def _aggregate(records: list[dict[str, float]]) -> dict[str, float]:
  """Mean over the interval; last value for `lr*` and `l2_*` (they describe a state)."""
  if not records:
    return {}
  out = {}
  for k in records[-1]:
    if k.startswith(("lr", "l2_")):
      out[k] = records[-1][k]
    else:
      out[k] = float(np.mean([r[k] for r in records if k in r]))
  return out


def _num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train(method: Method, config: Any, workdir: str,
          train_iter_factory: Callable[[], Iterator[Mapping[str, Any]]], mesh: Mesh, *,
          eval_fn: EvalFn | None = None, optimizer: optim_lib.Optimizer | None = None,
          sample_batch_shapes: Mapping[str, Any] | None = None) -> TrainState:
  """Trains `method` for `config.train.num_steps` updates, resuming if possible.

  Args:
    method: the Method (model + losses).
    config: full config (`train`, `optim`, `mesh.step_impl`, `model`, `data.batch_size`,
      `data.crop_size`, `seed`).
    workdir: output folder (metrics.jsonl, checkpoints/, tb/).
    train_iter_factory: `() -> iterator` of this process's host batches (CONVENTIONS.md
      train format; string leaves are dropped). A grain `DatasetIterator` (or
      `DataLoaderIterator`) is checkpointed with the state, so a resumed run continues the
      same data order; other iterators restart.
    mesh: the device mesh (`mesh.make_mesh(config.mesh)`).
    eval_fn: `(state, step) -> {name: value}`, run every `train.eval_every` steps and at
      the last step (only there when `eval_every` is 0); its time is excluded from
      throughput.
    optimizer: override the optimizer built from `config.optim`.
    sample_batch_shapes: shapes for model init (default from `config.data`).

  Returns:
    The final TrainState (or the restored one if training was already complete).

  Raises:
    NonFiniteError: a guarded metric became NaN/Inf (message names step and metric).
  """
  tc = config.train
  num_steps = int(tc.num_steps)
  log_every = max(int(tc.get("log_every", 50)), 1)
  ckpt_every = int(tc.get("ckpt_every", 0))
  eval_every = int(tc.get("eval_every", 0))
  chief = jax.process_index() == 0
  fs.makedirs(workdir)
  if chief and hasattr(config, "to_json_best_effort"):
    # Atomic: a kill never leaves half a file.
    with fs.atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  sample_batch_shapes = sample_batch_shapes or default_sample_batch_shapes(config)
  optimizer = optimizer or state_lib.make_optimizer_for(method, config, sample_batch_shapes)
  abstract = state_lib.abstract_train_state(method, config, mesh, sample_batch_shapes,
                                            optimizer=optimizer)
  data_iter = iter(train_iter_factory())
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=tc.get("keep_checkpoints", 2))
  writer = log_lib.MetricWriter(workdir, tensorboard=bool(tc.get("tensorboard", False)))
  progress = None
  try:
    state = checkpointer.restore_or_none(abstract, data_iter)
    if state is None:
      state = state_lib.create_train_state(method, config, mesh, sample_batch_shapes,
                                           optimizer=optimizer)
    start = int(state.step)
    if start >= num_steps:
      logging.info("Training already complete (step %d >= %d).", start, num_steps)
      return state
    # What an earlier (killed, pre-empted or rolled back) run logged after this step is
    # logged again below: forget it, so metrics.jsonl has each step once.
    writer.rewind(start)
    if start > 0:
      logging.info("Resuming training in %s from checkpoint step %d.", workdir, start)

    # Compiling can take minutes on big models: honour a SIGTERM that came meanwhile.
    preemption.raise_if_requested(f"the start of training in {workdir} (step {start})")
    step_fn = step_lib.make_train_step(
        method, optimizer, mesh, config,
        state_shardings=jax.tree.map(lambda a: a.sharding, abstract))
    t_wait = time.perf_counter()
    batch = mesh_lib.to_global(next(data_iter), mesh)
    data_wait = time.perf_counter() - t_wait
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = log_lib.xla_flops(compiled)
    global_batch = int(batch["image"].shape[0])
    n_dev = mesh_lib.num_data_devices(mesh)
    peak = log_lib.peak_flops_per_device(mesh.devices.flat[0])
    header = {"num_params": _num_params(state.params), "compile_s": compile_s,
              "global_batch": global_batch, "devices": n_dev,
              "step_impl": config.mesh.get("step_impl", "jit"),
              "device_kind": mesh.devices.flat[0].device_kind}
    if flops:
      header["gflop_per_step_device"] = flops / 1e9
      header["gflop_per_image"] = flops * n_dev / global_batch / 1e9
    writer.write(start, header)
    logging.info("Train from step %d to %d: %s", start, num_steps, header)

    chrono = log_lib.Chrono(global_batch, n_dev, num_steps, flops, peak)
    progress = log_lib.Progress(num_steps, start, bool(tc.get("progress", True)))
    pending: list[tuple[int, dict]] = []   # device metrics not yet fetched
    logged: list[dict[str, float]] = []    # host metrics since the last log

    def flush() -> None:
      """Fetches pending metrics, runs the NaN guard on them in step order."""
      host = jax.device_get(pending)
      pending.clear()
      bad = nan_guard.first_non_finite(host)
      if bad is not None:
        bad_step, metric, value = bad
        checkpointer.wait_until_finished()
        last = checkpointer.latest_step()
        msg = (f"NaN guard: {metric} = {value} at train step {bad_step} (the update from "
               f"step {bad_step - 1}). Training stopped; the newest checkpoint, "
               f"{'none' if last is None else f'step {last}'} in {checkpointer.directory}, "
               "holds the last finite state.")
        writer.write(bad_step, {"error": msg})
        logging.error(msg)
        raise NonFiniteError(msg, step=bad_step, metric=metric, value=value)
      logged.extend({k: float(v) for k, v in m.items()} for _, m in host)

    def stop_for_preemption(s: int) -> None:
      """Saves step `s` (state + data position) and raises `Preempted` (SIGTERM)."""
      flush()  # the NaN guard first: never checkpoint a broken state
      checkpointer.save(s, state, data_iter, {"method": method.name, "preempted": True})
      checkpointer.wait_until_finished()  # finalized on disk before the process exits
      writer.write(s, {"preempted": f"stopped after step {s}, checkpoint saved"})
      logging.warning("Preempted: checkpoint step %d saved in %s", s, checkpointer.directory)
      raise preemption.Preempted(f"train step {s}", step=s,
                                 checkpoint=checkpointer.directory)

    for step in range(start, num_steps):
      if step > start:
        t_wait = time.perf_counter()
        batch = mesh_lib.to_global(next(data_iter), mesh)
        data_wait += time.perf_counter() - t_wait
      state, metrics = compiled(state, batch)
      s = step + 1
      pending.append((s, metrics))
      if not chrono.started:
        # Exclude the first step (allocation, autotuning) from throughput.
        jax.block_until_ready(metrics)
        chrono.start(s)
        data_wait = 0.0
      is_log = s % log_every == 0 or s == num_steps
      is_eval = eval_fn is not None and ((eval_every > 0 and s % eval_every == 0)
                                         or s == num_steps)
      is_ckpt = (ckpt_every > 0 and s % ckpt_every == 0) or s == num_steps
      if is_log or is_eval or is_ckpt:
        flush()
      if is_log:
        record = _aggregate(logged)
        logged.clear()
        timing = chrono.tick(s)
        if timing:
          interval = timing.pop("interval_s")
          record.update(timing)
          record["data_wait_frac"] = min(data_wait / interval, 1.0)
        data_wait = 0.0
        writer.write(s, record)
        progress.update(0, record)
      progress.update(1)
      if is_eval:
        chrono.pause()
        try:
          results = eval_fn(state, s) or {}
        except preemption.Preempted:  # raised between eval batches: keep step s
          stop_for_preemption(s)
        writer.write(s, {(k if "/" in k else f"eval/{k}"): v for k, v in results.items()})
        chrono.resume()
      if is_ckpt:
        chrono.pause()
        checkpointer.save(s, state, data_iter, {"method": method.name})
        chrono.resume()
      if s < num_steps and preemption.should_stop():
        stop_for_preemption(s)
    checkpointer.wait_until_finished()
    return state
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    checkpointer.close()

