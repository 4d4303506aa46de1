"""Checkpoints: orbax `CheckpointManager` holding the train state, the grain iterator and
a JSON metadata item in one step directory (JAX_NOTES §3.2 (c)).

- `state` (StandardCheckpointHandler): the sharded TrainState; restored directly onto the
  abstract sharded target (`state.abstract_train_state`), no host gather, and it may be
  restored onto a different mesh.
- `data` (grain CheckpointHandler): the iterator position, one JSON per process, so a
  resumed run sees exactly the batches it would have seen. Skipped for non-grain iterators.
- `meta` (JsonCheckpointHandler): step, wall time and whatever the caller adds.

Saves are asynchronous: the device-to-host copy happens inside `save` (so the next step may
donate the state), the file writes in the background. `wait_until_finished` is called
before a restore, before reading what was saved, and on close. A non-finite state is never
saved (`NonFiniteError`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import grain
import orbax.checkpoint as ocp
from absl import logging

from wsss_jax import fs
from wsss_jax.train import nan_guard

PyTree = Any


def _is_grain_iterator(it: Any) -> bool:
  return it is not None and hasattr(it, "get_state") and hasattr(it, "set_state")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (state, data iterator, meta).

  Args:
    directory: where step folders go (created).
    max_to_keep: newest checkpoints kept (`config.train.keep_checkpoints`); None keeps all.
    async_save: write files in a background thread.
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 2, async_save: bool = True):
    self.directory = fs.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self.restored_meta: dict | None = None

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: PyTree, data_iter: Any = None,
           meta: Mapping[str, Any] | None = None, *, check_finite: bool = True) -> bool:
    """Saves `state` (and the iterator position, and `meta`) as checkpoint `step`.

    Args:
      step: the step number (normally `int(state.step)`).
      state: the TrainState (sharded arrays).
      data_iter: a grain iterator (`get_state`/`set_state`), or None.
      meta: JSON-serialisable extras.
      check_finite: raise instead of saving a state with a NaN/Inf.

    Returns:
      True if a save was started (False if this step is already saved).

    Raises:
      NonFiniteError: the state has a non-finite float leaf.
    """
    if step in self._mngr.all_steps():
      return False
    if check_finite and not nan_guard.tree_all_finite(state):
      raise nan_guard.NonFiniteError(
          f"Refusing to checkpoint step {step}: the train state has NaN/Inf values.",
          step=step)
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave({"step": int(step), "time": time.time(),
                                        **dict(meta or {})})}
    if _is_grain_iterator(data_iter):
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    elif data_iter is not None:
      logging.log_first_n(logging.WARNING, "Data iterator %s is not checkpointable; a "
                          "resumed run will not continue the same data order.", 1,
                          type(data_iter).__name__)
    return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

  def restore_or_none(self, abstract_state: PyTree, data_iter: Any = None,
                      step: int | None = None) -> PyTree | None:
    """Restores the latest (or given) checkpoint onto `abstract_state`'s shardings.

    Args:
      abstract_state: TrainState of `jax.ShapeDtypeStruct`s with `sharding` set.
      data_iter: a grain iterator whose position is restored in place (if saved).
      step: which step; default the latest.

    Returns:
      The restored TrainState, or None when there is no checkpoint. The metadata is left
      in `self.restored_meta`.
    """
    self._mngr.wait_until_finished()
    step = self._mngr.latest_step() if step is None else step
    if step is None:
      return None
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    has_data = fs.isdir(os.path.join(self.directory, str(step), "data"))
    if _is_grain_iterator(data_iter):
      if has_data:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      else:
        logging.warning("Checkpoint %d has no data-iterator state; data restarts.", step)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    self.restored_meta = dict(restored["meta"] or {})
    logging.info("Restored checkpoint step %d from %s", step, self.directory)
    return restored["state"]

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
