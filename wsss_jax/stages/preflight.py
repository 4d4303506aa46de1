"""Checks a config against itself and its environment before any stage does expensive work.

`check(config, workdir)` runs first in `runner.run_stages`, before a dataset is built, a
model compiled or a file written. It collects every problem and raises one `ConfigError`
listing them, each naming its key:

- the stage list (`config.stages`: names known to `stages/registry.py`), the dataset
  (`data.name`, a `data.root` that exists and is in the VOC/COCO layout, the splits),
  `data.on_bad_input`, `rerun`;
- enumerations: `method`, `model.backbone`, `model.dtype`, `model.norm`, `model.pool`,
  `model.{depthwise,pointwise,maxpool}_impl`, `optim.name`, `optim.schedule`,
  `mesh.step_impl`, and those each listed stage declares in the registry (`cams.variables`,
  `pseudo.mode`, `pseudo.crf`, `seg.pseudo_source`); `spml.superpixels.method` (for
  'hed': its weights file and h5py are installed);
- counts: step counts of the listed training stages are positive; the global batch sizes
  (`data.batch_size`, `data.eval_batch_size`, `seg.batch_size`) divide by the number of
  processes and by the devices on the mesh's data axis (`mesh.data` <= devices);
- inputs of each listed stage (`Stage.needs`): made by an earlier listed stage or already
  in the work directory (`Stage.markers` of the stage that makes them), e.g.
  `train.init_from='baseline'` without a `baseline` stage or
  `workdir/baseline/final_variables.msgpack`; `stages=sweep` without CAMs;
- the environment: the work directory is writable and its file system has at least
  `MIN_FREE_MB` MiB free (`$WSSS_JAX_MIN_FREE_MB` overrides; 0 disables).

Unknown or misspelt keys never reach this point: configs are locked, so
`--config.optim.lrr=0.1` fails while the command line is parsed; `parse_flags_or_exit`
(the `wsss` flag parser) turns ml_collections' traceback into one line naming the argument
and the closest existing key, as it does for an unknown `file.py:arg` or a missing config
file.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from typing import Any, NoReturn

import ml_collections as mlc

from wsss_jax import fs
from wsss_jax.stages import registry

MIN_FREE_MB = 200
OPTIMIZERS = ("sgd", "nesterov", "adamw")   # train/optim.py:_group_tx
STEP_IMPLS = ("jit", "shard_map")           # train/step.py:make_train_step
NORMS = ("batch", "group")                  # models/heads.py:Norm
POOLS = ("gap", "tap")                      # models/heads.py:CAMHead
# Names users reach for that the config spells differently (issue #12 says `on_error`).
RENAMED = {"on_error": "on_bad_input"}


ConfigError = registry.ConfigError
_get = registry.get


def _enum_problems(config: mlc.ConfigDict, stages: list[str]) -> list[str]:
  # Imported here: the registries pull in models and methods, which `--help` need not load.
  from wsss_jax import methods  # pylint: disable=g-import-not-at-top
  from wsss_jax.models import lowering  # pylint: disable=g-import-not-at-top
  from wsss_jax.models import registry as models  # pylint: disable=g-import-not-at-top
  from wsss_jax.train import optim  # pylint: disable=g-import-not-at-top

  choices: dict[str, tuple[Any, ...]] = {
      "method": tuple(k for k in methods.FACTORIES if k != "seg"),
      "model.backbone": models.BACKBONES,
      "model.norm": NORMS,
      "model.pool": POOLS,
      "model.depthwise_impl": lowering.DEPTHWISE_IMPLS,
      "model.pointwise_impl": lowering.POINTWISE_IMPLS,
      "model.maxpool_impl": lowering.MAXPOOL_IMPLS,
      "optim.name": OPTIMIZERS,
      "mesh.step_impl": STEP_IMPLS,
  }
  # Each listed stage's own enumerations, declared once in the registry (evaluate reads
  # the seg stage's `seg.pseudo_source`).
  for name in stages + (["seg"] if "evaluate" in stages else []):
    choices.update(registry.stage(name).choices())
  problems = []
  for key, allowed in choices.items():
    value = _get(config, key)
    if value is not None and value not in allowed:
      problems.append(f"{key}={value!r}; expected one of {list(allowed)}")
  problems += _superpixel_problems(config, stages)
  for call in (lambda: models.compute_dtype(config.model),
               lambda: optim.make_schedule(config.optim, max(int(config.train.num_steps), 1))):
    try:
      call()
    except (ValueError, KeyError) as e:
      problems.append(str(e))
  return problems


def _superpixel_problems(config: mlc.ConfigDict, stages: list[str]) -> list[str]:
  """SPML's superpixel method is known and, for 'hed', its weights and h5py are there (the
  maps are computed when SPML training starts, after the baseline stages)."""
  key = "spml.superpixels.method"
  method = _get(config, key)
  if (_get(config, "method") != "spml" or method is None
      or not {"train", "spml_labels"} & set(stages)):
    return []
  from wsss_jax.data import superpixels  # pylint: disable=g-import-not-at-top
  if method not in superpixels.METHODS + ("none",):
    return [f"{key}={method!r}; expected one of {list(superpixels.METHODS + ('none',))}"]
  if method != "hed":
    return []
  from wsss_jax.models import weights  # pylint: disable=g-import-not-at-top
  problems = []
  if importlib.util.find_spec("h5py") is None:
    problems.append(f"{key}='hed' reads its weights with h5py: `pip install -e \".[hed]\"`")
  path = _get(config, "spml.superpixels.hed_weights") or ""
  if path and not fs.exists(path):
    problems.append(f"spml.superpixels.hed_weights={path!r}: no such file")
  elif not path:
    try:
      weights.hed_weights_file()
    except weights.WeightsError as e:
      problems.append(f"{key}='hed': {e}")
  return problems


def _count_problems(config: mlc.ConfigDict, stages: list[str]) -> list[str]:
  from wsss_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from wsss_jax.runtime import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  problems = []
  steps = {"train": "train.num_steps", "baseline": "baseline.num_steps",
           "seg": "seg.num_steps"}
  for stage, key in steps.items():
    value = _get(config, key)
    if stage in stages and value is not None and int(value) <= 0:
      problems.append(f"{key}={value}: the {stage} stage needs a positive number of steps")
  try:
    mesh = mesh_lib.make_mesh(config.mesh)
  except ValueError as e:
    return problems + [f"config.mesh: {e}"]
  batches = [("data.batch_size", bool({"train", "baseline"} & set(stages))),
             ("data.eval_batch_size", True),
             ("seg.batch_size", "seg" in stages)]
  for key, relevant in batches:
    value = _get(config, key)
    if relevant and value is not None:
      try:
        pipeline.local_batch_size(int(value), mesh=mesh, name=key)
      except ValueError as e:
        problems.append(str(e))
  return problems


def _input_problems(config: mlc.ConfigDict, stages: list[str], workdir: str) -> list[str]:
  """Each listed stage's inputs (`Stage.needs`) come from an earlier listed stage or are on
  disk (the `markers` of the stage that makes them); `train.init_from=PATH` exists."""
  problems = []
  for position, name in enumerate(stages):
    earlier = stages[:position]
    for need in registry.stage(name).needs(config):
      maker = registry.stage(need.stage)
      if need.stage == "data" or need.stage in earlier:
        continue  # every stage prepares the dataset itself
      why = f" ({need.why})" if need.why else ""
      for marker in maker.markers(config):
        if not fs.exists(os.path.join(workdir, marker)):
          problems.append(
              f"stage {name!r} needs {os.path.join(workdir, marker)}{why}, which does not "
              f"exist and no earlier stage makes it: add {need.stage!r} before {name!r} in "
              f"config.stages (now {','.join(stages)})")
  init_from = str(_get(config, "train.init_from", "") or "")
  if "train" in stages and init_from not in ("", "baseline"):
    path = init_from
    if fs.isdir(path):
      path = os.path.join(path, registry.VARIABLES_FILE)
    if not fs.exists(path):
      problems.append(f"train.init_from={init_from!r}: {path} does not exist; give a "
                      f"{registry.VARIABLES_FILE} written by a train or baseline stage")
  return problems


def _setup_problems(config: mlc.ConfigDict, scans: dict[str, Any]
                    ) -> tuple[list[str], list[str]]:
  """(the listed stages, problems of the stage list, dataset, data root and `rerun`).

  The dataset is scanned here (a listing, nothing is built), so a root that is not in the
  VOC/COCO layout or lacks a configured split is one line, not a traceback from the build.
  """
  from wsss_jax.stages import provenance  # pylint: disable=g-import-not-at-top
  problems = []
  try:
    stages = registry.parse_stages(_get(config, "stages", ""))
  except ValueError as e:
    stages = [s for s in str(_get(config, "stages", "")).split(",") if s in registry.BY_NAME]
    problems.append(str(e))
  rerun = _get(config, "rerun", "")
  if rerun not in provenance.RERUN_MODES:
    problems.append(f"rerun={rerun!r}; expected '' (stop when outputs on disk came from "
                    "other settings) or 'changed' (recompute them)")
  d = config.data
  on_bad = _get(config, "data.on_bad_input", "error")
  if on_bad not in ("error", "skip"):
    problems.append(f"data.on_bad_input={on_bad!r}; expected 'error' or 'skip'")
  from wsss_jax.data import sources  # pylint: disable=g-import-not-at-top
  if d.name not in sources.DATASETS:
    problems.append(f"config.data.name={d.name!r}; expected one of {sources.DATASETS}")
  elif d.name in ("voc", "coco") and not d.root:
    problems.append(f"config.data.name={d.name!r} needs --config.data.root=DIR")
  elif d.name in ("voc", "coco") and not os.path.isdir(d.root):
    problems.append(f"config.data.root={d.root!r} is not a directory")
  elif on_bad in ("error", "skip"):
    try:
      registry.identities(config, scans)("data")   # scans the root, builds nothing
    except ValueError as e:  # BadInputError: the layout; ValueError: a split
      problems.append(f"config.data.root={d.root!r}: {e}" if d.name != "synthetic"
                      else f"config.data: {e}")
  return stages, problems


def free_space_problems(workdir: str, min_free_mb: float | None = None) -> list[str]:
  """The work directory must be writable, with `min_free_mb` MiB free on its disk.

  A bucket URL has no disk to measure: it must be reachable (gcsfs installed, credentials).
  """
  if fs.is_remote(workdir):
    try:
      fs.exists(workdir)
    except Exception as e:  # pylint: disable=broad-except  (ImportError, auth, network)
      return [f"--workdir={workdir}: cannot be reached ({type(e).__name__}: {e})"]
    return []
  if min_free_mb is None:
    min_free_mb = float(os.environ.get("WSSS_JAX_MIN_FREE_MB", MIN_FREE_MB))
  existing = workdir
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK):
    return [f"--workdir={workdir}: {existing} is not writable"]
  free_mb = shutil.disk_usage(existing).free / 2**20
  if min_free_mb > 0 and free_mb < min_free_mb:
    return [f"--workdir={workdir}: only {free_mb:.0f} MiB free on its disk, less than the "
            f"{min_free_mb:.0f} MiB a run needs at least (checkpoints, CAMs); free space or "
            "set WSSS_JAX_MIN_FREE_MB"]
  return []


def fatal(where: str, error: BaseException | str) -> NoReturn:
  """Exits with 1 after one line `FATAL: <where>: <what>`, as absl does for flag errors.

  ml_collections reports what a config file raised (an unknown `:arg`, a file that does
  not exist or does not load) with a traceback in the text: only its last line is kept.
  """
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[-1] if lines else type(error).__name__
  sys.stderr.write(f"FATAL: {where + ': ' if where else ''}{reason}\n")
  sys.exit(1)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line instead of a traceback for what the config file
  rejects: an override of a key the config lacks, an unknown `file.py:arg`, a config file
  that does not exist or does not load.

  ml_collections raises a KeyError/AttributeError deep in flag parsing (`'lrr'\nDid you
  mean "lr"?`); this names the command-line argument, the suggestion, and exits with 1
  as absl does for other flag errors.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)   # what absl's app.run does, with our messages on failure
  except (flags.Error, ValueError, OSError) as e:
    text = str(e)
    flag, sep, rest = text.partition(": ")
    if isinstance(e, flags.Error) and sep:   # "flag --config=...: <what went wrong>"
      fatal(flag.removeprefix("flag "), rest)
    given = [a for a in argv[1:] if a.startswith("--config=")]
    fatal(given[0] if given and not isinstance(e, flags.Error) else "", text)
  except (AttributeError, KeyError) as e:
    # The text is a (nested) repr: `'\'lrr\'\nDid you mean "lr" instead of "lrr"?'`.
    text = str(e)
    found = re.search(r"[A-Za-z_]\w*", text)
    key = found.group(0) if found else text
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    hint = f"did you mean {suggestion.group(1)!r}?" if suggestion else ""
    if key in RENAMED:
      hint = f"did you mean {RENAMED[key]!r}?"
    culprits = [a for a in argv[1:] if a.startswith("--config.")
                and key in a[2:].partition("=")[0].split(".")[1:]]
    where = culprits[0] if culprits else f"a --config override ({key!r})"
    sys.stderr.write(f"FATAL: {where}: the config has no key {key!r}"
                     f"{'; ' + hint if hint else ''} (see configs/common.py for the keys)\n")
    sys.exit(1)


def check(config: mlc.ConfigDict, workdir: str) -> list[str]:
  """Returns the listed stages; raises `ConfigError` listing every problem found."""
  workdir = fs.absolute(workdir)
  scans: dict[str, Any] = {}   # the dataset is scanned once
  stages, problems = _setup_problems(config, scans)
  problems += _enum_problems(config, stages) + _count_problems(config, stages)
  if not problems:
    try:  # the stages' inputs form no cycle (and the settings can be read)
      identity = registry.identities(config, scans)
      for name in stages:
        identity(name)
    except ValueError as e:
      problems.append(str(e))
  problems += _input_problems(config, stages, workdir) + free_space_problems(workdir)
  if problems:
    raise ConfigError(f"The config cannot run ({len(problems)} problem"
                      f"{'s' if len(problems) > 1 else ''}; nothing was started):\n  - "
                      + "\n  - ".join(problems))
  return stages
