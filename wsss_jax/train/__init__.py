"""Training core shared by every method.

- `aot`: compile check for a TPU topology (`python -m wsss_jax.train.aot`).
- `state`: `TrainState`, `create_train_state`, `abstract_train_state`, `make_optimizer_for`.
- `optim`: optax from `config.optim` (groups, schedules, decay masks, freezing).
- `step`: `make_train_step` (jit or shard_map; one step for all methods).
- `checkpoint`: `Checkpointer` (orbax: state + grain iterator + JSON meta).
- `loop`: `train(method, config, workdir, train_iter_factory, mesh)`.
- `log`: JSONL/TensorBoard writer, Chrono throughput + MFU, tqdm progress.
- `nan_guard`: non-finite detection.

The mesh, multi-host start-up and pre-emption live in `wsss_jax.runtime` (the data layer
needs them too).
"""
