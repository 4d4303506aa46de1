"""Runs `config.stages` in order in one work directory; each stage skips itself when done.

This is the library form of the `wsss` command: notebooks call `run_stages` directly.
"""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.data import sources
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import distributed
from wsss_jax.runtime import preemption

# Stage name -> module under wsss_jax.stages with `run(config, workdir) -> dict`.
# Modules are imported lazily so the `data` stage does not pay for model imports.
STAGE_MODULES = {
    "data": "wsss_jax.stages.data",
    "baseline": "wsss_jax.stages.baseline",
    "train": "wsss_jax.stages.train",
    "cams": "wsss_jax.stages.cams",
    "sweep": "wsss_jax.stages.sweep",
    "pseudo": "wsss_jax.stages.pseudo",
    "spml_labels": "wsss_jax.stages.spml_labels",
    "spml_bootstrap": "wsss_jax.stages.spml_bootstrap",
    "seg": "wsss_jax.stages.seg",
    "evaluate": "wsss_jax.stages.evaluate",
}
DATASETS = ("synthetic", "voc", "coco")


def parse_stages(stages: str | tuple[str, ...] | list[str]) -> list[str]:
  """Accepts 'a,b,c' or a sequence; rejects unknown names with the accepted list."""
  names = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
  names = [s for s in names if s]
  unknown = [s for s in names if s not in STAGE_MODULES]
  if unknown:
    raise ValueError(f"config.stages: unknown stage(s) {unknown}; known: {list(STAGE_MODULES)}")
  if not names:
    raise ValueError("config.stages is empty; give e.g. --config.stages=data,train")
  return names


def validate(config: mlc.ConfigDict) -> None:
  """Checks the keys whose values are enumerations, with messages that name the key."""
  parse_stages(config.stages)
  if config.data.name not in DATASETS:
    raise ValueError(f"config.data.name={config.data.name!r}; expected one of {DATASETS}")
  if config.data.name in ("voc", "coco") and not config.data.root:
    raise ValueError(f"config.data.name={config.data.name!r} needs --config.data.root=DIR")
  if config.data.name in ("voc", "coco") and not os.path.isdir(config.data.root):
    raise ValueError(f"config.data.root={config.data.root!r} is not a directory")
  if config.data.on_bad_input not in ("error", "skip"):
    raise ValueError(
        f"config.data.on_bad_input={config.data.on_bad_input!r}; expected 'error' or 'skip'")


def stage_function(name: str) -> Callable[[mlc.ConfigDict, str], dict[str, Any]]:
  return importlib.import_module(STAGE_MODULES[name]).run


def enable_compilation_cache() -> None:
  """Persists XLA executables under the cache dir unless the user chose a location.

  Stages and resumed runs compile the same train/inference functions again; on a 2-core
  CPU each compile costs tens of seconds, so reuse matters (`--jax_compilation_cache_dir`
  overrides; `WSSS_JAX_XLA_CACHE=0` disables).
  """
  if os.environ.get("WSSS_JAX_XLA_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(sources.default_cache_dir(), "xla"))


def run_stages(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes workdir/config.json, runs each stage, records timings; returns results.json.

  With several processes (`train.distributed`) every process runs every stage on its
  share of the work; `workdir` must be one folder all of them see (a shared file system).
  Process 0 writes config.json and results.json.
  """
  validate(config)
  # Before any build or compile: every config/environment problem at once, keys named.
  from wsss_jax.stages import preflight  # pylint: disable=g-import-not-at-top
  preflight.check(config, workdir)
  enable_compilation_cache()
  workdir = fs.absolute(workdir)
  chief = distributed.is_chief()
  fs.makedirs(workdir)
  if chief:
    wd.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    wd.update_results(workdir, versions=software_versions(), method=config.method,
                      dataset=config.data.name, backbone=config.model.backbone)
  # Every process prepares the dataset itself (no process waits in a collective through a
  # long build): concurrent builds of one folder are safe (builders.build_atomically), and
  # hosts with their own cache need their own copy anyway.
  distributed.check_shared_workdir(workdir)
  for name in parse_stages(config.stages):
    preemption.raise_if_requested(f"the start of stage {name!r}")
    logging.info("Stage %s: start", name)
    start = time.time()
    values = stage_function(name)(config, workdir) or {}
    seconds = round(time.time() - start, 2)
    distributed.barrier(f"stage:{name}")  # every process's files of the stage exist
    if chief:
      # Total wall time spent in the stage over all (resumed) runs of this workdir.
      timings = wd.read_results(workdir).get("timings", {})
      timings[name] = round(timings.get(name, 0.0) + seconds, 2)
      wd.update_results(workdir, timings=timings, **values)
    logging.info("Stage %s: done in %.1f s", name, seconds)
  distributed.barrier("stages:done")
  results = wd.read_results(workdir)
  if chief:
    print(summary_table(results))
  return results


def software_versions() -> dict[str, str]:
  import flax
  import jax
  import optax

  import wsss_jax
  return {"wsss_jax": wsss_jax.__version__, "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "backend": jax.default_backend(),
          "git": git_revision()}


def git_revision() -> str:
  """The commit of the wsss_jax checkout (`+dirty` with local changes), or 'unknown'.

  Recorded in results.json so a result can be traced to the code that made it.
  """
  package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", package_dir, "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", package_dir, "status", "--porcelain",
                            "--untracked-files=no"], check=True, capture_output=True,
                           text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"  # an installed wheel, or no git
  return head + ("+dirty" if dirty else "")


def summary_table(results: dict[str, Any]) -> str:
  """The short text table printed at the end of a run."""
  rows = [("method", results.get("method")), ("dataset", results.get("dataset")),
          ("backbone", results.get("backbone"))]
  for key in ("train_map", "cam_miou", "cam_threshold", "pseudo_miou", "seg_miou",
              "seg_gt_miou"):
    if key in results:
      value = results[key]
      rows.append((key, f"{value:.4f}" if isinstance(value, float) else value))
  for stage, seconds in results.get("timings", {}).items():
    rows.append((f"time[{stage}] s", seconds))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
