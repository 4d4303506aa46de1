"""Fingerprint records: every stage's outputs say which settings and inputs made them.

Each stage writes a record beside its outputs (`Stage.record`, e.g. `train/fingerprint.json`,
`sweep.fingerprint.json`) when it starts (`status: running`) and when it finishes
(`status: done`, with its headline values and the seconds it took):

  {"stage": "cams", "status": "done", "fingerprint": "...", "settings": {...},
   "inputs": {"data": "...", "train": "..."}, "report": {...}, "values": {...},
   "seconds": 12.3}

`plan(config, workdir, stages)` compares every record on disk with what `config` would make
(`registry.identities`), before any work:

- a record whose fingerprint differs is stale: its outputs came from other settings (the
  keys are named by diffing the recorded settings) or from other inputs;
- outputs without a record (a work directory from before fingerprints) are judged by the
  `config.json` that was written with them; with no config.json either (made outside the
  runner, e.g. by `train.loop` directly) they are taken as this config's, with a warning;
- `config.rerun=''` (default) stops with one message naming every changed key (old -> new),
  the outputs it invalidates and the two ways out; `config.rerun='changed'` deletes the
  stale outputs (the stages downstream of a change are stale too: their fingerprints cover
  their inputs') so the listed stages recompute them.

`results(config, workdir)` rebuilds results.json from the records, so it describes exactly
the outputs on disk.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.stages import registry
from wsss_jax.stages import workdir as wd

RERUN_MODES = ("", "changed")
CONFIG_FILE = "config.json"


class StaleWorkdirError(registry.ConfigError):
  """The work directory holds outputs another config made; nothing was started."""


@dataclasses.dataclass(frozen=True)
class Outputs:
  """One stage's output set in a work directory (a stage with variants has several)."""
  stage: registry.Stage
  config: mlc.ConfigDict        # the config variant these outputs belong to
  home: str                     # relative home (e.g. 'seg/', 'sweep.json')
  identity: registry.Identity   # what `config` would make
  record: dict[str, Any] | None  # on disk (None: none)
  current: bool                 # the variant the config addresses

  @property
  def name(self) -> str:
    return self.stage.name

  def done(self, workdir: str) -> bool:
    """Finished with this config's fingerprint, every marker on disk."""
    return (self.record is not None and self.record.get("status") == "done"
            and self.record.get("fingerprint") == self.identity.fingerprint
            and all(fs.exists(os.path.join(workdir, m))
                    for m in self.stage.markers(self.config)))


@dataclasses.dataclass(frozen=True)
class Stale:
  """Outputs whose recorded identity differs from the config's."""
  outputs: Outputs
  changed: list[tuple[str, Any, Any]]   # (key, old, new)
  inputs: list[str]                     # needed stages whose fingerprints changed
  unknown: str = ""                     # why the origin is unknown ('' when known)


@dataclasses.dataclass
class Plan:
  """What `plan` found: every output set on disk, the stale ones, and the rescored."""
  outputs: list[Outputs]
  stale: list[Stale]

  def current(self, name: str) -> Outputs:
    """The output set of stage `name` that the config addresses."""
    return next(o for o in self.outputs if o.name == name and o.current)


def record_path(workdir: str, stage: registry.Stage, config: mlc.ConfigDict) -> str:
  return os.path.join(workdir, stage.record(config))


def read_record(workdir: str, stage: registry.Stage, config: mlc.ConfigDict
                ) -> dict[str, Any] | None:
  path = record_path(workdir, stage, config)
  return wd.read_json(path) if fs.exists(path) else None


def write_record(workdir: str, stage: registry.Stage, config: mlc.ConfigDict,
                 identity: registry.Identity, *, status: str,
                 values: dict[str, Any] | None = None, seconds: float = 0.0) -> None:
  """Writes the stage's record (process 0 only; atomic)."""
  wd.write_json(record_path(workdir, stage, config), {
      "stage": stage.name, "status": status, "fingerprint": identity.fingerprint,
      "settings": identity.settings, "inputs": identity.inputs, "report": identity.report,
      "values": values or {}, "seconds": round(seconds, 2)})


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """`(key, old value, new value)` for every key whose value differs (None: absent)."""
  missing = object()
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, missing), new.get(key, missing)
    if a != b:
      out.append((key, None if a is missing else a, None if b is missing else b))
  return out


def _legacy_identity(workdir: str, name: str, scans: dict[str, Any]
                     ) -> tuple[registry.Identity | None, str]:
  """The identity the outputs of a work directory without records were made with: that of
  its `config.json` (written at the start of the run that made them)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not fs.exists(path):
    return None, ""   # made outside the runner (e.g. loop.train): nothing says otherwise
  try:
    old = mlc.ConfigDict(wd.read_json(path))
    return registry.identities(old, scans)(name), ""
  except Exception as e:  # pylint: disable=broad-except  (an old root gone, a key missing)
    return None, f"no fingerprint record, and its config.json cannot say ({e})"


def plan(config: mlc.ConfigDict, workdir: str) -> Plan:
  """Compares every stage's outputs in `workdir` with what `config` would make."""
  outputs, stale = [], []
  scans: dict[str, Any] = {}      # each data block scanned once
  judged: dict[str, Any] = {}     # one memo per variant config
  for stage in registry.STAGES:
    for variant in stage.variants(config):
      key = registry.digest(variant.to_dict())
      if key not in judged:
        judged[key] = registry.identities(variant, scans)
      identity = judged[key](stage.name)
      home = stage.makes(variant)[0]
      rec = read_record(workdir, stage, variant)
      out = Outputs(stage, variant, home, identity, rec, variant is config)
      outputs.append(out)
      if rec is None:
        if not fs.exists(os.path.join(workdir, home.rstrip("/"))):
          continue
        old, why = _legacy_identity(workdir, stage.name, scans)
        if old is None and not why:
          logging.warning("%s: outputs without a fingerprint record or a config.json "
                          "(made outside the runner); taken as this config's.",
                          os.path.join(workdir, home))
          continue
        if old is not None and old.fingerprint == identity.fingerprint:
          continue   # adopted: its record is written when the stage next runs
        if old is None:
          stale.append(Stale(out, [], [], why))
          continue
        rec = {"settings": old.settings, "inputs": old.inputs}
      elif rec.get("fingerprint") == identity.fingerprint:
        continue
      changed = changed_keys(rec.get("settings", {}), identity.settings)
      inputs = [k for k, v in identity.inputs.items() if rec.get("inputs", {}).get(k) != v]
      stale.append(Stale(out, changed, inputs))
  return Plan(outputs, stale)


def _show(value: Any) -> str:
  return "(unset)" if value is None else json.dumps(value)


def stale_message(workdir: str, stale: list[Stale]) -> str:
  """One message: each changed key (old -> new) with the stages it changes, the outputs
  that are invalid, and the two ways out."""
  by_key: dict[str, tuple[Any, Any, list[str]]] = {}
  for s in stale:
    for key, old, new in s.changed:
      by_key.setdefault(key, (old, new, []))[2].append(s.outputs.name)
  lines = [f"The work directory {workdir} holds outputs made with other settings than this "
           "run's; nothing was started."]
  if by_key:
    lines.append("Changed keys (old -> new, the stages they decide):")
    width = max(len(k) for k in by_key)
    for key, (old, new, names) in sorted(by_key.items()):
      lines.append(f"  {key:<{width}}  {_show(old)} -> {_show(new)}  "
                   f"({', '.join(dict.fromkeys(names))})")
  lines.append("Outputs they invalidate:")
  for s in stale:
    why = (s.unknown if s.unknown else
           "settings changed" if s.changed else
           f"made from other {', '.join(s.inputs)} outputs")
    home = os.path.join(workdir, s.outputs.home)
    lines.append(f"  {s.outputs.name}: {home} ({why})")
    if s.outputs.home.endswith("/") and fs.isdir(home):
      lines.append(f"      holding {_listing(home)}")
  lines.append("Delete them and recompute with --config.rerun=changed (it deletes exactly "
               "these outputs, then the listed stages remake theirs), or use a new "
               "--workdir.")
  return "\n".join(lines)


def _listing(folder: str, most: int = 8) -> str:
  """What a folder holds (its record left out), for the user deciding to delete it."""
  names = sorted(n for n in fs.listdir(folder) if n != registry.FINGERPRINT_FILE)
  more = f" and {len(names) - most} more" if len(names) > most else ""
  return (", ".join(names[:most]) + more) if names else "nothing"


def needs_problems(config: mlc.ConfigDict, stages: list[str], stale: list[Stale]
                   ) -> list[str]:
  """Listed stages that read a stale output which no earlier listed stage remakes."""
  gone = {s.outputs.name for s in stale if s.outputs.current}
  problems = []
  for position, name in enumerate(stages):
    for need in registry.stage(name).needs(config):
      if need.stage in gone and need.stage not in stages[:position] and need.stage != "data":
        problems.append(f"stage {name!r} needs the outputs of {need.stage!r}, which are "
                        f"stale and would be deleted: add {need.stage!r} before {name!r} "
                        f"in config.stages (now {','.join(stages)})")
  return problems


def delete(workdir: str, stale: list[Stale]) -> None:
  """Removes every output and the record of each stale output set (process 0)."""
  for s in stale:
    stage, variant = s.outputs.stage, s.outputs.config
    for rel in stage.makes(variant) + (stage.record(variant),):
      path = os.path.join(workdir, rel.rstrip("/"))
      if rel.endswith("/") and fs.isdir(path):
        fs.rmtree(path)
      elif fs.exists(path):
        fs.remove(path)
    logging.info("Deleted the stale outputs of stage %s (%s): --config.rerun=changed",
                 stage.name, os.path.join(workdir, s.outputs.home))


def check(config: mlc.ConfigDict, workdir: str, stages: list[str]) -> Plan:
  """Stops (raises `StaleWorkdirError`) or, with `config.rerun='changed'`, deletes stale
  outputs (process 0) before any work; returns the plan of what is on disk now."""
  found = plan(config, workdir)
  if not found.stale:
    return found
  rerun = str(registry.get(config, "rerun", "") or "")
  if rerun != "changed":
    raise StaleWorkdirError(stale_message(workdir, found.stale))
  problems = needs_problems(config, stages, found.stale)
  if problems:
    raise registry.ConfigError(
        "--config.rerun=changed cannot run as given (nothing was deleted):\n  - "
        + "\n  - ".join(problems))
  from wsss_jax.runtime import distributed  # pylint: disable=import-outside-toplevel
  if distributed.is_chief():
    delete(workdir, found.stale)
  distributed.barrier("provenance:deleted")
  return plan(config, workdir)


def results(config: mlc.ConfigDict, workdir: str, header: dict[str, Any]) -> dict[str, Any]:
  """results.json from the records on disk: `header`, then each finished output set's
  values in pipeline order, `timings` (seconds per stage) and `fingerprints`."""
  out = dict(header)
  timings: dict[str, float] = {}
  fingerprints: dict[str, str] = {}
  for stage in registry.STAGES:
    # The other variants first: where both set a key (`seg_pseudo_source`), the config's
    # own outputs have the last word.
    for variant in reversed(stage.variants(config)):
      rec = read_record(workdir, stage, variant)
      if rec is None or rec.get("status") != "done":
        continue
      out.update(rec.get("values", {}))
      timings[stage.name] = round(timings.get(stage.name, 0.0) + rec.get("seconds", 0.0), 2)
      if variant is config:  # the other variants' values are kept, not their keys here
        fingerprints[stage.name] = rec["fingerprint"]
  out["timings"] = timings
  out["fingerprints"] = fingerprints
  return out
