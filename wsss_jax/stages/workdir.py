"""The work directory: atomic writes, results.json, stage completion markers.

Every stage writes its outputs through these helpers (`fs.atomic_path`): a file is
written to a temporary name and renamed (or uploaded) into place, so a killed run never
leaves a half file that a later run would take as complete. The work directory may be a
local folder or a `gs://` URL (`wsss_jax/fs.py`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from wsss_jax import fs
from wsss_jax.fs import atomic_path  # noqa: F401  (re-exported: stages write through it)

RESULTS = "results.json"


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically (NaN/Inf become null: strict JSON)."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(_finite(obj), f, indent=2, sort_keys=True, default=_json_default,
              allow_nan=False)
    f.write("\n")


def read_json(path: str) -> Any:
  """Reads a JSON file, naming the file in the error if it is corrupt."""
  try:
    with fs.open_file(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); delete it to recompute") from e


def update_results(workdir: str, **values: Any) -> dict[str, Any]:
  """Merges flat keys into workdir/results.json (created if missing); returns the result."""
  path = os.path.join(workdir, RESULTS)
  results = read_json(path) if fs.exists(path) else {}
  results.update(values)
  write_json(path, results)
  return results


def read_results(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RESULTS)
  return read_json(path) if fs.exists(path) else {}


def _finite(obj: Any) -> Any:
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if hasattr(obj, "tolist"):  # numpy arrays and scalars
    return _finite(obj.tolist())
  return obj


def _json_default(obj: Any) -> Any:
  # numpy scalars and arrays appear in metrics; JSON wants plain Python values.
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if hasattr(obj, "item"):
    return obj.item()
  raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")
