"""Optional recovery from NaN/Inf: roll back to the last finite checkpoint, lower the LR.

With `config.train.nan_retries = N > 0`, a `NonFiniteError` from the training loop does not
end the stage: the learning rate is multiplied by `config.train.nan_lr_factor` (default
0.5) and training resumes from the newest checkpoint, which the NaN guard guarantees is
finite (`train/nan_guard.py`). After N retries the error is raised as before, naming the
step, the metric and the retries made.

The scale in force is kept in `<out_dir>/nan_retries.json` (written atomically), so a run
that is killed and rerun keeps training with the lowered rate: the schedule is not silently
reset, and reruns stay reproducible. The optimizer state does not depend on the learning
rate (SGD momentum, Adam moments), so the checkpoint restores unchanged into the
optimizer with the new rate.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

from absl import logging
import jax
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.train.nan_guard import NonFiniteError

RETRY_FILE = "nan_retries.json"
T = TypeVar("T")


def read_record(out_dir: str) -> dict[str, Any]:
  """`{'lr_scale': float, 'retries': [{step, metric, value, lr_scale}, ...]}`."""
  path = os.path.join(out_dir, RETRY_FILE)
  if not fs.exists(path):
    return {"lr_scale": 1.0, "retries": []}
  with fs.open_file(path) as f:
    return json.load(f)


def _write_record(out_dir: str, record: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  # Atomic (temporary file + rename or one upload): a kill must not leave a half record.
  with fs.atomic_path(os.path.join(out_dir, RETRY_FILE)) as tmp, open(tmp, "w") as f:
    json.dump(record, f, indent=2)


def scaled_config(config: mlc.ConfigDict, lr_scale: float) -> mlc.ConfigDict:
  """A copy of `config` with `optim.lr` multiplied by `lr_scale` (the same object if 1)."""
  if lr_scale == 1.0:
    return config
  c = mlc.ConfigDict(config.to_dict())
  c.optim.lr = float(config.optim.lr) * lr_scale
  return c


def train_with_rollback(train_once: Callable[[mlc.ConfigDict], T], config: mlc.ConfigDict,
                        out_dir: str) -> T:
  """Calls `train_once(config with the current LR scale)`, retrying after a NaN/Inf.

  Args:
    train_once: trains (resuming from `out_dir`'s checkpoints) with the given config.
    config: the stage's config (`train.nan_retries`, `train.nan_lr_factor`, `optim.lr`).
    out_dir: the training folder (holds the checkpoints and `nan_retries.json`).

  Raises:
    NonFiniteError: when the retries are used up (or `nan_retries` is 0).
  """
  max_retries = int(config.train.get("nan_retries", 0) or 0)
  factor = float(config.train.get("nan_lr_factor", 0.5))
  if max_retries > 0 and not 0.0 < factor < 1.0:
    raise ValueError(f"config.train.nan_lr_factor={factor}: must be in (0, 1)")
  while True:
    record = read_record(out_dir)
    try:
      return train_once(scaled_config(config, float(record["lr_scale"])))
    except NonFiniteError as e:
      done = len(record["retries"])
      if done >= max_retries:
        if max_retries:
          record_path = os.path.join(out_dir, RETRY_FILE)
          e.args = (f"{e.args[0]} Gave up after {done} rollback(s) with the learning rate "
                    f"scaled to {record['lr_scale']:g} ({record_path}).",)
        else:
          e.args = (f"{e.args[0]} To roll back and retry with a lower learning rate, set "
                    "--config.train.nan_retries=N.",)
        raise
      record["lr_scale"] = float(record["lr_scale"]) * factor
      record["retries"].append({"step": e.step, "metric": e.metric,
                                "value": None if e.value is None else str(e.value),
                                "lr_scale": record["lr_scale"]})
      _write_record(out_dir, record)
      logging.warning("NaN guard fired at step %s (%s); rollback %d/%d: resuming from the "
                      "last finite checkpoint with the learning rate x %g.", e.step,
                      e.metric, done + 1, max_retries, record["lr_scale"])
