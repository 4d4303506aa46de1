"""Checks a config against itself and its environment before any stage does expensive work.

`check(config, workdir)` runs at the start of `runner.run_stages`, after the dataset keys
are validated (`runner.validate`) and before a dataset is built or a model compiled. It
collects every problem and raises one `ConfigError` listing them, each naming its key:

- enumerations: `method`, `model.backbone`, `model.dtype`, `model.norm`, `model.pool`,
  `model.{depthwise,pointwise,maxpool}_impl`,
  `optim.name`, `optim.schedule`, `mesh.step_impl`, `pseudo.mode`, `pseudo.crf`,
  `seg.pseudo_source`, `cams.variables`, `spml.superpixels.method` (for 'hed': its weights
  file and h5py are installed);
- counts: step counts of the listed training stages are positive; the global batch sizes
  (`data.batch_size`, `data.eval_batch_size`, `seg.batch_size`) divide by the number of
  processes and by the devices on the mesh's data axis (`mesh.data` <= devices);
- inputs of each listed stage: produced by an earlier listed stage or already in the work
  directory (e.g. `train.init_from='baseline'` without a `baseline` stage or
  `workdir/baseline/final_variables.msgpack`; `stages=sweep` without CAMs);
- the environment: the work directory is writable and its file system has at least
  `MIN_FREE_MB` MiB free (`$WSSS_JAX_MIN_FREE_MB` overrides; 0 disables).

Unknown or misspelt keys never reach this point: configs are locked, so
`--config.optim.lrr=0.1` fails while the command line is parsed; `parse_flags_or_exit`
(the `wsss` flag parser) turns ml_collections' traceback into one line naming the argument
and the closest existing key.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from typing import Any, Callable

import ml_collections as mlc

from wsss_jax import fs

MIN_FREE_MB = 200
OPTIMIZERS = ("sgd", "nesterov", "adamw")   # train/optim.py:_group_tx
STEP_IMPLS = ("jit", "shard_map")           # train/step.py:make_train_step
NORMS = ("batch", "group")                  # models/heads.py:Norm
POOLS = ("gap", "tap")                      # models/heads.py:CAMHead
# Names users reach for that the config spells differently (issue #12 says `on_error`).
RENAMED = {"on_error": "on_bad_input"}


class ConfigError(ValueError):
  """The config cannot run as given; the message lists every problem with its key."""


def _get(config: mlc.ConfigDict, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (mlc.ConfigDict, dict)) or part not in node:
      return default
    node = node[part]
  return node


def _enum_problems(config: mlc.ConfigDict, stages: list[str]) -> list[str]:
  # Imported here: the registries pull in models and methods, which `--help` need not load.
  from wsss_jax import methods  # pylint: disable=g-import-not-at-top
  from wsss_jax.models import lowering, registry  # pylint: disable=g-import-not-at-top
  from wsss_jax.ops import pseudo_labels  # pylint: disable=g-import-not-at-top
  from wsss_jax.stages import cams, pseudo, seg  # pylint: disable=g-import-not-at-top
  from wsss_jax.train import optim  # pylint: disable=g-import-not-at-top

  choices: list[tuple[str, tuple[Any, ...], bool]] = [
      ("method", tuple(k for k in methods.FACTORIES if k != "seg"), True),
      ("model.backbone", registry.BACKBONES, True),
      ("model.norm", NORMS, True),
      ("model.pool", POOLS, True),
      ("model.depthwise_impl", lowering.DEPTHWISE_IMPLS, True),
      ("model.pointwise_impl", lowering.POINTWISE_IMPLS, True),
      ("model.maxpool_impl", lowering.MAXPOOL_IMPLS, True),
      ("optim.name", OPTIMIZERS, True),
      ("mesh.step_impl", STEP_IMPLS, True),
      ("cams.variables", cams.CAM_VARIABLES, "cams" in stages),
      ("pseudo.mode", pseudo_labels.MODES, "pseudo" in stages),
      ("pseudo.crf", tuple(pseudo.CRF_PRESETS), "pseudo" in stages),
      ("seg.pseudo_source", seg.PSEUDO_SOURCES, bool({"seg", "evaluate"} & set(stages))),
  ]
  problems = []
  for key, allowed, relevant in choices:
    value = _get(config, key)
    if relevant and value is not None and value not in allowed:
      problems.append(f"{key}={value!r}; expected one of {list(allowed)}")
  problems += _superpixel_problems(config, stages)
  for call in (lambda: registry.compute_dtype(config.model),
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


def _stage_inputs(config: mlc.ConfigDict, workdir: str
                  ) -> dict[str, list[tuple[str, str, Callable[[], bool]]]]:
  """Stage -> [(what it needs, the stage that makes it, whether it is on disk now)]."""
  from wsss_jax.stages import inference  # pylint: disable=g-import-not-at-top
  weights = inference.VARIABLES_FILE

  def exists(*parts: str) -> Callable[[], bool]:
    return lambda: fs.exists(os.path.join(workdir, *parts))

  d = config.data
  which = str(_get(config, "cams.variables", "train"))
  seg_dir = "seg" if _get(config, "seg.pseudo_source", "pseudo") == "pseudo" else "seg_gt"
  splits = list(dict.fromkeys([d.train_split, d.sweep_split]))
  needs: dict[str, list[tuple[str, str, Callable[[], bool]]]] = {
      "cams": [(f"{which}/{weights} (cams.variables={which!r})", which,
                exists(which, weights))],
      "sweep": [(f"cams/{d.sweep_split}/complete.json", "cams",
                 exists("cams", d.sweep_split, "complete.json"))],
      "pseudo": [(f"cams/{s}/complete.json", "cams", exists("cams", s, "complete.json"))
                 for s in splits],
      "evaluate": [(f"{seg_dir}/{weights}", "seg", exists(seg_dir, weights))],
  }
  if float(_get(config, "pseudo.fg_threshold", 0.0)) < 0:
    needs["pseudo"].append(("sweep.json (pseudo.fg_threshold<0 takes its best threshold)",
                            "sweep", exists("sweep.json")))
  # A method may train the segmenter from its own label folder (SPML: seg.pseudo_dir,
  # made by its own stage); only the pseudo stage's folder has a known producer.
  own_labels = (_get(config, "seg.pseudo_dir", "") or "pseudo") != "pseudo"
  if _get(config, "seg.pseudo_source", "pseudo") == "pseudo" and not own_labels:
    needs["seg"] = [("pseudo/complete.json (seg.pseudo_source='pseudo')", "pseudo",
                     exists("pseudo", "complete.json"))]
  init_from = str(_get(config, "train.init_from", "") or "")
  if init_from == "baseline":
    needs["train"] = [(f"baseline/{weights} (train.init_from='baseline')", "baseline",
                       exists("baseline", weights))]
  return needs


def _input_problems(config: mlc.ConfigDict, stages: list[str], workdir: str) -> list[str]:
  from wsss_jax.stages import inference  # pylint: disable=g-import-not-at-top
  problems = []
  needs = _stage_inputs(config, workdir)
  for position, stage in enumerate(stages):
    earlier = stages[:position]
    for what, producer, on_disk in needs.get(stage, []):
      if producer not in earlier and not on_disk():
        problems.append(
            f"stage {stage!r} needs {os.path.join(workdir, what)}, which does not exist and "
            f"no earlier stage makes it: add {producer!r} before {stage!r} in config.stages "
            f"(now {','.join(stages)})")
  init_from = str(_get(config, "train.init_from", "") or "")
  if "train" in stages and init_from not in ("", "baseline"):
    path = init_from
    if fs.isdir(path):
      path = os.path.join(path, inference.VARIABLES_FILE)
    if not fs.exists(path):
      problems.append(f"train.init_from={init_from!r}: {path} does not exist; give a "
                      f"{inference.VARIABLES_FILE} written by a train or baseline stage")
  return problems


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


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an override of a key the config lacks.

  ml_collections raises a KeyError/AttributeError deep in flag parsing (`'lrr'\nDid you
  mean "lr"?`); this names the command-line argument, the suggestion, and exits with 1
  as absl does for other flag errors.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
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


def check(config: mlc.ConfigDict, workdir: str) -> None:
  """Raises `ConfigError` listing every problem found; returns quietly otherwise."""
  from wsss_jax.stages import runner  # pylint: disable=g-import-not-at-top
  stages = runner.parse_stages(config.stages)
  workdir = fs.absolute(workdir)
  problems = (_enum_problems(config, stages) + _count_problems(config, stages)
              + _input_problems(config, stages, workdir) + free_space_problems(workdir))
  if problems:
    raise ConfigError(f"The config cannot run ({len(problems)} problem"
                      f"{'s' if len(problems) > 1 else ''}; nothing was started):\n  - "
                      + "\n  - ".join(problems))
