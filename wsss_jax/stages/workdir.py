"""The work directory: atomic writes, results.json, stage completion markers.

Every stage writes its outputs through these helpers (`fs.atomic_path`): a file is
written to a temporary name and renamed (or uploaded) into place, so a killed run never
leaves a half file that a later run would take as complete. The work directory may be a
local folder or a `gs://` URL (`wsss_jax/fs.py`).
"""
from __future__ import annotations

import os
from typing import Any

from wsss_jax import fs
# Re-exported: stages write through them.
from wsss_jax.fs import atomic_path, read_json, write_json  # noqa: F401

RESULTS = "results.json"
SWEEP_FILE = "sweep.json"      # the sweep stage's result


def read_results(workdir: str) -> dict[str, Any]:
  """workdir/results.json (`{}` when missing); the runner rebuilds it from the stage
  records (`provenance.results`)."""
  path = os.path.join(workdir, RESULTS)
  return read_json(path) if fs.exists(path) else {}


def foreground_threshold(config: Any, workdir: str) -> float:
  """The pseudo-labels' foreground threshold: `pseudo.fg_threshold`, or when it is < 0 the
  best background threshold of `workdir/sweep.json` (the `sweep` stage's)."""
  t = float(config.pseudo.fg_threshold)
  if t >= 0:
    return t
  path = os.path.join(workdir, SWEEP_FILE)
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} missing: pseudo.fg_threshold<0 takes the sweep's best "
                            "threshold, so run the sweep stage first")
  return float(read_json(path)["best_threshold"])
