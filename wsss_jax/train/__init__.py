"""Training core shared by every method.

- `mesh`: `make_mesh(config.mesh)` (axis `data`, + `fsdp` for FSDP, AxisType.Auto),
  shardings, `to_global`.
- `distributed`: multi-host start-up (`initialize`), barriers, host-side gathers.
- `aot`: compile check for a TPU topology (`python -m wsss_jax.train.aot`).
- `state`: `TrainState`, `create_train_state`, `abstract_train_state`, `make_optimizer_for`.
- `optim`: optax from `config.optim` (groups, schedules, decay masks, freezing).
- `step`: `make_train_step` (jit or shard_map; one step for all methods).
- `checkpoint`: `Checkpointer` (orbax: state + grain iterator + JSON meta).
- `loop`: `train(method, config, workdir, train_iter_factory, mesh)`.
- `log`: JSONL/TensorBoard writer, Chrono throughput + MFU, tqdm progress.
- `nan_guard`: non-finite detection.
"""
