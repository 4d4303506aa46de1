"""Runs `config.stages` in order in one work directory, after checking the config and the
outputs already there (`preflight`, `provenance`); a stage that is up to date is skipped.

This is the library form of the `wsss` command: notebooks call `run_stages` directly.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any

from absl import logging
import jax
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.data import sources
from wsss_jax.runtime import distributed
from wsss_jax.runtime import preemption
from wsss_jax.stages import preflight
from wsss_jax.stages import provenance
from wsss_jax.stages import registry
from wsss_jax.stages import workdir as wd


def enable_compilation_cache() -> None:
  """Persists XLA executables under the cache dir unless the user chose a location.

  Stages and resumed runs compile the same train/inference functions again; on a 2-core
  CPU each compile costs tens of seconds, so reuse matters (`--jax_compilation_cache_dir`
  overrides; `WSSS_JAX_XLA_CACHE_DIR=DIR` puts it in DIR whatever the data cache, so runs
  with separate data caches share executables, as the test suite does;
  `WSSS_JAX_XLA_CACHE=0` disables).
  """
  if os.environ.get("WSSS_JAX_XLA_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("WSSS_JAX_XLA_CACHE_DIR")
                    or os.path.join(sources.default_cache_dir(), "xla"))


def run_stages(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Checks, then runs each stage of `config.stages`; returns results.json.

  Before any work: every config and environment problem (`preflight.check`), then every
  output already in `workdir` against this config's fingerprints (`provenance.check`:
  stops naming the changed keys, or with `config.rerun='changed'` deletes what they
  invalidate). Only then is `config.json` written. A stage whose outputs are complete with
  this config's fingerprint is skipped; one with partial outputs resumes. results.json is
  rebuilt from the stage records after each stage, so it lists only outputs on disk.

  With several processes (`runtime.distributed`) every process runs every stage on its
  share of the work; `workdir` must be one folder all of them see (a shared file system).
  Process 0 writes config.json, the records and results.json.
  """
  stages = preflight.check(config, workdir)
  workdir = fs.absolute(workdir)
  current = provenance.check(config, workdir, stages)
  enable_compilation_cache()
  # Every process decides what to skip from the same disk state, before any is written.
  distributed.barrier("stages:checked")
  chief = distributed.is_chief()
  fs.makedirs(workdir)
  # Every process prepares the dataset itself (no process waits in a collective through a
  # long build): concurrent builds of one folder are safe (builders.build_atomically), and
  # hosts with their own cache need their own copy anyway.
  distributed.check_shared_workdir(workdir)
  header = {"versions": software_versions(), "method": config.method,
            "dataset": config.data.name, "backbone": config.model.backbone}
  if chief:
    wd.write_json(os.path.join(workdir, provenance.CONFIG_FILE), config.to_dict())
    wd.write_json(os.path.join(workdir, wd.RESULTS),
                  provenance.results(config, workdir, header))
  for name in stages:
    preemption.raise_if_requested(f"the start of stage {name!r}")
    outputs = current.current(name)
    run, reason = _skip_or_resume(outputs, workdir)
    if not run:
      logging.info("Stage %s: skipped, %s", name, reason)
      continue
    logging.info("Stage %s: start%s", name, f" ({reason})" if reason else "")
    if chief:
      provenance.write_record(workdir, outputs.stage, config, outputs.identity,
                              status="running", seconds=_seconds(outputs))
    start = time.time()
    values = outputs.stage.function()(config, workdir) or {}
    seconds = time.time() - start
    distributed.barrier(f"stage:{name}")  # every process's files of the stage exist
    if chief:
      # Wall time spent in the stage over all (resumed) runs with this fingerprint.
      provenance.write_record(workdir, outputs.stage, config, outputs.identity,
                              status="done", values=values,
                              seconds=_seconds(outputs) + seconds)
      wd.write_json(os.path.join(workdir, wd.RESULTS),
                    provenance.results(config, workdir, header))
    logging.info("Stage %s: done in %.1f s", name, seconds)
  distributed.barrier("stages:done")
  results = wd.read_results(workdir)
  if chief:
    print(summary_table(results, workdir, stages))
  return results


def _seconds(outputs: provenance.Outputs) -> float:
  """Seconds already spent on these outputs (a resumed or rescored stage adds to them)."""
  rec = outputs.record or {}
  same = rec.get("fingerprint") == outputs.identity.fingerprint
  return float(rec.get("seconds", 0.0)) if same else 0.0


def _skip_or_resume(outputs: provenance.Outputs, workdir: str) -> tuple[bool, str]:
  """(whether the stage runs, why; '' for a fresh start)."""
  rec = outputs.record
  fp = outputs.identity.fingerprint
  if outputs.done(workdir):
    if rec.get("report") != outputs.identity.report:
      changed = ", ".join(k for k, _, _ in provenance.changed_keys(rec.get("report", {}),
                                                                   outputs.identity.report))
      return True, f"outputs up to date (fingerprint {fp}); rescoring: {changed} changed"
    if outputs.stage.always_run:
      return True, f"cheap, so it always runs; outputs up to date (fingerprint {fp})"
    return False, f"its outputs are up to date (fingerprint {fp})"
  if rec is not None:
    return True, f"resuming the partial outputs in {outputs.home} (fingerprint {fp})"
  if fs.exists(os.path.join(workdir, outputs.home.rstrip("/"))):
    return True, (f"resuming {outputs.home}: outputs without a fingerprint record, "
                  "adopted (see the check above)")
  return True, ""


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


# Headline scores and the results.json key that names the split each is computed on.
HEADLINE_SPLITS = (("train_map", "train_map_split"), ("cam_miou", "cam_split"),
                   ("cam_threshold", "cam_split"), ("pseudo_miou", "pseudo_split"),
                   ("seg_miou", "seg_split"), ("seg_gt_miou", "seg_split"))


def summary_table(results: dict[str, Any], workdir: str = "",
                  stages: list[str] | None = None) -> str:
  """The short text table printed at the end of a run: headline scores with their split,
  stage times in pipeline order (`stages` first), and where the files are."""
  rows = [("method", results.get("method")), ("dataset", results.get("dataset")),
          ("backbone", results.get("backbone"))]
  for key, split_key in HEADLINE_SPLITS:
    if key in results:
      value = results[key]
      split = results.get(split_key)
      rows.append((f"{key} ({split})" if split else key,
                   f"{value:.4f}" if isinstance(value, float) else value))
  timings = results.get("timings", {})
  order = list(dict.fromkeys(list(stages or []) + list(registry.NAMES)))
  for stage in order:
    if stage in timings:
      rows.append((f"time[{stage}] s", timings[stage]))
  if workdir:
    rows.append(("results", os.path.join(workdir, wd.RESULTS)))
    if fs.isdir(os.path.join(workdir, "figures")):
      rows.append(("figures", os.path.join(workdir, "figures") + os.sep))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
