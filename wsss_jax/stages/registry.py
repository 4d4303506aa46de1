"""Every pipeline stage, declared once: what it needs, what it makes, what decides it.

The runner, preflight, `wsss --help` and `configs/common.py` read this list; there is no
other. A `Stage` names its module (`run(config, workdir) -> dict` of headline values), the
stages whose outputs it reads (`needs`), the paths it writes under the work directory
(`makes`) and the files whose presence means it finished (`markers`), and the config values
that decide its outputs (`settings`: flat `{dotted key: value}`, named as the user types
them on the command line).

Fingerprints (`fingerprint(config, name)`): sha256 of a stage's settings and of the
fingerprints of the stages it needs, the `data` stage's being the prepared dataset's
content identity (`data.sources.dataset_identity`). A fingerprint is a function of the
config alone: it never depends on the work directory, `config.stages`, `config.rerun`,
logging, progress, checkpoint cadence or the mesh shape (a checkpoint restores onto any
mesh). So two runs whose fingerprints of a stage agree would write the same outputs for it,
which is what `stages/provenance.py` checks before any work (every output records the
fingerprint and settings that made it) and what a cache of trained baselines can key on.

`report` settings decide only numbers a stage reports about itself (the split its
classifier is scored on), never what later stages read: a change of them reruns the
stage's scoring but invalidates nothing.

This module imports no JAX (configs import it); stage modules and the dataset scan are
imported when first needed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from typing import Any, Callable, Mapping

import ml_collections as mlc

Config = mlc.ConfigDict | Mapping[str, Any]
Settings = dict[str, Any]
# Bumped when what a fingerprint covers changes, so old records read as changed.
SCHEMA = 1
VARIABLES_FILE = "final_variables.msgpack"   # written by the training stages when done
FINGERPRINT_FILE = "fingerprint.json"


class ConfigError(ValueError):
  """The config cannot run as given; the message names every problem and its key."""


# Keys of `data` and `train` outside a training stage's own settings: the dataset (its
# identity is the `data` stage's fingerprint, an input of every stage), what only
# inference or scoring reads, the schedule (recorded under the stage's own key), and what
# decides nothing: where files go, how often to log or checkpoint, loader workers.
_NOT_TRAINING = {
    "data": ("name", "root", "cache_dir", "synthetic", "on_bad_input", "class_names",
             "sweep_split", "val_split", "eval_batch_size", "eval_pad_size", "num_workers",
             "prefetch"),
    "train": ("log_every", "ckpt_every", "keep_checkpoints", "tensorboard", "progress",
              "eval_every", "init_from", "num_steps"),
}
# The config blocks a method's training reads, beyond model/optim/data/train.
METHOD_BLOCKS = {"cam": ("cam_train",), "csrm": ("csrm",), "fbr": ("fbr",),
                 "spml": ("spml",), "dscnet_r": ("dscnet_r",), "seg": ()}
SPML_LABELS_DIR = "spml"        # the spml_labels stage's folder
SPML_BOOT_DIR = "spml_boot"     # the spml_bootstrap stage's folder
# Label folders (`seg.pseudo_dir`, `spml_labels.train_labels`) -> the stage that makes them.
LABEL_STAGE_DIRS = {"pseudo": "pseudo", f"{SPML_LABELS_DIR}/pseudo": "spml_labels",
                    f"{SPML_BOOT_DIR}/pseudo": "spml_bootstrap"}


# ---------------------------------------------------------------------------------------
# Reading config values.
# ---------------------------------------------------------------------------------------
def get(config: Config, dotted: str, default: Any = None) -> Any:
  """`config.a.b` for `dotted='a.b'`, or `default` where a part is missing."""
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, (mlc.ConfigDict, dict)) or part not in node:
      return default
    node = node[part]
  return node


def _plain(value: Any) -> Any:
  """JSON-stable form: ConfigDicts and tuples become dicts and lists."""
  if isinstance(value, mlc.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flat(config: Config, block: str, exclude: tuple[str, ...] = ()) -> Settings:
  """`{'block.key': value}` for every key of `config.block` except `exclude` (sub-blocks
  are flattened too, e.g. `spml.superpixels.method`)."""
  out: Settings = {}

  def walk(node: Any, prefix: str) -> None:
    if isinstance(node, (mlc.ConfigDict, dict)):
      for k in sorted(node.keys()):
        if prefix == block and k in exclude:
          continue
        walk(node[k], f"{prefix}.{k}")
    else:
      out[prefix] = _plain(node)

  walk(get(config, block, {}), block)
  return out


def _keys(config: Config, *dotted: str) -> Settings:
  return {k: _plain(get(config, k)) for k in dotted}


def splits(config: Config) -> list[str]:
  """The splits CAMs and pseudo-labels are made for: train, then sweep (deduplicated)."""
  return list(dict.fromkeys([get(config, "data.train_split"),
                             get(config, "data.sweep_split")]))


def training_settings(config: Config, method: str, *, steps: str, lr: str,
                      batch: str) -> Settings:
  """What decides the weights a training stage writes: seed, model, optimizer, training
  data and augmentation, the step implementation and the method's own block.

  `steps`, `lr` and `batch` name the keys the stage takes its schedule from (e.g.
  `seg.num_steps`, `seg.lr`, `seg.batch_size` for the segmentation model); their values
  are recorded under those names, so a message names the key the user changes.
  """
  out = {"seed": _plain(get(config, "seed")), "method": method,
         "mesh.step_impl": _plain(get(config, "mesh.step_impl", "jit"))}
  out.update(_flat(config, "model"))
  out.update(_flat(config, "optim", exclude=("lr",)))
  out.update(_flat(config, "data", exclude=_NOT_TRAINING["data"] + ("batch_size",)))
  out.update(_flat(config, "train", exclude=_NOT_TRAINING["train"]))
  out.update(_keys(config, steps, lr, batch))
  for block in METHOD_BLOCKS.get(method, ("cam_train", method)):
    out.update(_flat(config, block))
  return out


def _inference_settings(config: Config) -> Settings:
  # The padded size of inference batches (edge pixels of a model's receptive field).
  return _keys(config, "data.eval_pad_size")


# ---------------------------------------------------------------------------------------
# The stage record.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Need:
  """An input of a stage: the outputs of `stage`; `why` names the config key that asks
  for it (shown in messages), e.g. `train.init_from='baseline'`."""
  stage: str
  why: str = ""


def _no_settings(config: Config) -> Settings:
  del config
  return {}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One pipeline stage.

  Attributes:
    name: as in `config.stages`.
    module: the module whose `run(config, workdir) -> dict` runs it.
    summary: one line for `wsss --help`.
    needs: `config -> (Need, ...)`: the stages whose outputs it reads.
    makes: `config -> (path, ...)` relative to the work directory (folders end in '/');
      the first is its home, where its fingerprint record lives.
    markers: `config -> (path, ...)`: files that exist once it has finished.
    settings: `config -> {dotted key: value}` that decide its outputs.
    report: `config -> {dotted key: value}` that decide only its own reported scores.
    choices: `() -> {dotted key: allowed values}` it accepts (preflight checks them).
    variant: `(key, values)` when a key selects one of several coexisting output sets
      (`seg.pseudo_source`: `seg/` and `seg_gt/`); `None` otherwise.
    default: in the default `config.stages`.
    always_run: cheap and idempotent; run even when up to date (`data` prints statistics).
  """
  name: str
  module: str
  summary: str
  needs: Callable[[Config], tuple[Need, ...]]
  makes: Callable[[Config], tuple[str, ...]]
  markers: Callable[[Config], tuple[str, ...]]
  settings: Callable[[Config], Settings]
  report: Callable[[Config], Settings] = _no_settings
  choices: Callable[[], dict[str, tuple[Any, ...]]] = dict
  variant: tuple[str, tuple[str, ...]] | None = None
  default: bool = False
  always_run: bool = False

  def function(self) -> Callable[[mlc.ConfigDict, str], dict[str, Any]]:
    """The stage's `run(config, workdir)` (imports its module)."""
    return importlib.import_module(self.module).run

  def record(self, config: Config) -> str:
    """Path of its fingerprint record, relative to the work directory: inside its home
    folder (`train/fingerprint.json`), or beside its home file (`sweep.fingerprint.json`)."""
    home = self.makes(config)[0]
    if home.endswith("/"):
      return home + FINGERPRINT_FILE
    return os.path.splitext(home)[0] + "." + FINGERPRINT_FILE

  def variants(self, config: mlc.ConfigDict) -> list[mlc.ConfigDict]:
    """`config` once per coexisting output set (the current one first)."""
    if self.variant is None:
      return [config]
    key, values = self.variant
    out = [config]
    for value in values:
      if value != get(config, key):
        other = mlc.ConfigDict(config.to_dict())
        block, leaf = key.rsplit(".", 1)
        other[block][leaf] = value
        out.append(other)
    return out


# ---------------------------------------------------------------------------------------
# The stages (in pipeline order; SPML runs `train` after `pseudo`, see configs/voc/spml.py).
# ---------------------------------------------------------------------------------------
def _data_settings(config: Config) -> Settings:
  from wsss_jax.data import sources  # pylint: disable=import-outside-toplevel
  out = {"data.dataset": sources.dataset_identity(config.data)}
  out.update(_keys(config, "data.on_bad_input", "data.class_names"))
  return out


def _own_lr(config: Config, key: str) -> str:
  """`key` when it is set (> 0), else `optim.lr`: the learning rate a stage trains with."""
  return key if float(get(config, key, 0.0) or 0.0) > 0 else "optim.lr"


def _baseline_settings(config: Config) -> Settings:
  if get(config, "baseline.optim") is not None:
    # The protocol's baseline has its own optimizer block (configs/common.py:plug_in): the
    # method phase's `optim.*` does not decide it.
    out = training_settings(config, "cam", steps="baseline.num_steps",
                            lr="baseline.optim.lr", batch="data.batch_size")
    out = {k: v for k, v in out.items() if not k.startswith("optim.")}
    out.update(_flat(config, "baseline.optim"))
  else:
    out = training_settings(config, "cam", steps="baseline.num_steps",
                            lr=_own_lr(config, "baseline.lr"), batch="data.batch_size")
  # The plain dataset records: a method's weak labels and extra maps (SPML's) do not reach
  # it, so the baselines of all methods' configs can be shared.
  for key in ("data.weak_label", "data.extra_maps"):
    out.pop(key, None)
  return out


def _train_settings(config: Config) -> Settings:
  method = get(config, "method")
  out = training_settings(config, method, steps="train.num_steps", lr="optim.lr",
                          batch="data.batch_size")
  init_from = str(get(config, "train.init_from", "") or "")
  if init_from and init_from != "baseline":
    out["train.init_from"] = init_from   # a file outside the work directory
  if method == "spml":
    out.update(_keys(config, "spml_labels.train_labels"))
  return out


def _train_needs(config: Config) -> tuple[Need, ...]:
  needs = [Need("data")]
  if str(get(config, "train.init_from", "") or "") == "baseline":
    needs.append(Need("baseline", "train.init_from='baseline'"))
  if get(config, "method") == "spml" and get(config, "data.weak_label", "tags") == "tags":
    folder = str(get(config, "spml_labels.train_labels", "pseudo"))
    if folder in LABEL_STAGE_DIRS:
      needs.append(Need(LABEL_STAGE_DIRS[folder], f"spml_labels.train_labels={folder!r}"))
  return tuple(needs)


def _cams_needs(config: Config) -> tuple[Need, ...]:
  which = str(get(config, "cams.variables", "train"))
  return (Need("data"), Need(which, f"cams.variables={which!r}"))


def _cam_markers(config: Config) -> tuple[str, ...]:
  return tuple(f"cams/{s}/complete.json" for s in splits(config))


def _per_image(block: str) -> Callable[[Config], Settings]:
  """The settings of a stage that maps each image of the train and sweep splits: its
  block, the splits and the inference batches' padded size."""

  def settings(config: Config) -> Settings:
    out = _flat(config, block)
    out["data.splits"] = splits(config)
    out.update(_inference_settings(config))
    return out

  return settings


def _cams_choices() -> dict[str, tuple[Any, ...]]:
  from wsss_jax.stages import cams  # pylint: disable=import-outside-toplevel
  return {"cams.variables": cams.CAM_VARIABLES}


def _uses_sweep_threshold(config: Config) -> bool:
  return float(get(config, "pseudo.fg_threshold", 0.0)) < 0


def _pseudo_needs(config: Config) -> tuple[Need, ...]:
  needs = [Need("data"), Need("cams")]
  if _uses_sweep_threshold(config):
    needs.append(Need("sweep", "pseudo.fg_threshold<0 takes its best threshold"))
  return tuple(needs)


def _pseudo_choices() -> dict[str, tuple[Any, ...]]:
  from wsss_jax.ops import crf  # pylint: disable=import-outside-toplevel
  from wsss_jax.ops import pseudo_labels  # pylint: disable=import-outside-toplevel
  return {"pseudo.mode": pseudo_labels.MODES, "pseudo.crf": tuple(crf.PRESETS)}


def _weak_label(config: Config) -> str:
  return str(get(config, "data.weak_label", "tags"))


def _spml_labels_needs(config: Config) -> tuple[Need, ...]:
  needs = [Need("data"), Need("train")]
  if _weak_label(config) == "tags":
    needs.append(Need("cams", "data.weak_label='tags' walks the CAMs"))
    if _uses_sweep_threshold(config):
      needs.append(Need("sweep", "pseudo.fg_threshold<0 takes its best threshold"))
  return tuple(needs)


def _spml_labels_settings(config: Config) -> Settings:
  out = _per_image("spml_labels")(config)
  out.update(_keys(config, "data.weak_label"))
  if _weak_label(config) == "tags":
    out.update(_keys(config, "pseudo.fg_threshold"))
  return out


def _classifier_report(config: Config) -> Settings:
  return _keys(config, "data.val_split")


def _spml_bootstrap_settings(config: Config) -> Settings:
  out = training_settings(config, "spml", steps="spml_bootstrap.steps",
                          lr=_own_lr(config, "spml_bootstrap.lr"),
                          batch="spml_bootstrap.batch_size")
  out.update(_flat(config, "spml_labels"))   # the propagation of the rounds' labels
  out.update(_per_image("spml_bootstrap")(config))
  return out


def seg_home(config: Config) -> str:
  """The segmentation stage's folder: `seg` (pseudo-labels) or `seg_gt` (ground truth)."""
  return "seg" if get(config, "seg.pseudo_source", "pseudo") == "pseudo" else "seg_gt"


SEG_EVAL_KEYS = ("scales", "flip", "crf")   # evaluation only: the evaluate stage's
DEFAULT_LABEL_DIR = "pseudo"   # seg.pseudo_dir's default: the pseudo stage's folder


def _label_dir(config: Config) -> str:
  return str(get(config, "seg.pseudo_dir", DEFAULT_LABEL_DIR) or DEFAULT_LABEL_DIR)


def recorded_seg_keys(seg_block: dict[str, Any]) -> dict[str, Any]:
  """The `config.seg` keys a segmenter's records hold (its fingerprint, its inputs.json):
  all but the evaluation ones, and `pseudo_dir` only away from its default, so that work
  directories made before every config had the key keep their fingerprints."""
  return {k: v for k, v in seg_block.items() if k not in SEG_EVAL_KEYS
          and not (k == "pseudo_dir" and (v or DEFAULT_LABEL_DIR) == DEFAULT_LABEL_DIR)}


def _seg_needs(config: Config) -> tuple[Need, ...]:
  if get(config, "seg.pseudo_source", "pseudo") != "pseudo":
    return (Need("data"),)
  producer = LABEL_STAGE_DIRS.get(_label_dir(config))
  return (Need("data"),) + ((Need(producer, f"seg.pseudo_dir={_label_dir(config)!r}"),)
                            if producer else ())


def _seg_settings(config: Config) -> Settings:
  out = training_settings(config, "seg", steps="seg.num_steps", lr="seg.lr",
                          batch="seg.batch_size")
  if get(config, "seg.optim") is not None:
    # The protocol's segmenter has its own optimizer block (configs/common.py:plug_in,
    # flattened with `seg` below): the method phase's `optim.*` does not decide it.
    out = {k: v for k, v in out.items() if not k.startswith("optim.")}
  out.update(_flat(config, "seg", exclude=SEG_EVAL_KEYS + ("num_steps", "lr", "batch_size",
                                                           "pseudo_dir")))
  if _label_dir(config) != DEFAULT_LABEL_DIR:
    out["seg.pseudo_dir"] = _label_dir(config)   # see recorded_seg_keys
  return out


def _seg_choices() -> dict[str, tuple[Any, ...]]:
  from wsss_jax.methods import seg as seg_method  # pylint: disable=import-outside-toplevel
  from wsss_jax.stages import seg  # pylint: disable=import-outside-toplevel
  return {"seg.pseudo_source": seg.PSEUDO_SOURCES, "seg.decoder": tuple(seg_method.DECODERS)}


def _evaluate_file(config: Config) -> str:
  return f"{seg_home(config)}_evaluate.json"


def _evaluate_settings(config: Config) -> Settings:
  out = {f"seg.{k}": _plain(get(config, f"seg.{k}")) for k in SEG_EVAL_KEYS}
  out.update(_keys(config, "seg.pseudo_source", "data.val_split"))
  out.update(_inference_settings(config))
  return out


def _figure(name: str) -> str:
  return f"figures/{name}.png"


STAGES: tuple[Stage, ...] = (
    Stage("data", "wsss_jax.stages.data",
          "prepares the dataset once (array_record) and prints its statistics",
          needs=lambda c: (), makes=lambda c: ("data_stats.json",),
          markers=lambda c: ("data_stats.json",), settings=_data_settings,
          report=lambda c: {"data.splits": _plain([get(c, "data.train_split"),
                                                   get(c, "data.sweep_split"),
                                                   get(c, "data.val_split")])},
          default=True, always_run=True),
    Stage("baseline", "wsss_jax.stages.baseline",
          "trains the CAM baseline that CSRM warm-starts from and SPML takes CAMs from",
          needs=lambda c: (Need("data"),), makes=lambda c: ("baseline/",),
          markers=lambda c: (f"baseline/{VARIABLES_FILE}",), settings=_baseline_settings,
          report=_classifier_report),
    Stage("train", "wsss_jax.stages.train",
          "trains config.method; scores its classifier (mAP) on data.val_split",
          needs=_train_needs, makes=lambda c: ("train/",),
          markers=lambda c: (f"train/{VARIABLES_FILE}",), settings=_train_settings,
          report=_classifier_report, default=True),
    Stage("cams", "wsss_jax.stages.cams",
          "multi-scale + flip CAMs of the train and sweep splits",
          needs=_cams_needs, makes=lambda c: ("cams/", _figure("cam_overlays")),
          markers=_cam_markers, settings=_per_image("cams"), choices=_cams_choices,
          default=True),
    Stage("sweep", "wsss_jax.stages.sweep",
          "background threshold sweep on data.sweep_split -> cam_miou, cam_threshold",
          needs=lambda c: (Need("data"), Need("cams")),
          makes=lambda c: ("sweep.json", _figure("threshold_curve")),
          markers=lambda c: ("sweep.json",),
          settings=lambda c: _keys(c, "sweep.thresholds", "data.sweep_split"),
          default=True),
    Stage("pseudo", "wsss_jax.stages.pseudo",
          "pseudo-label PNGs (threshold, double or CRF) -> pseudo_miou",
          needs=_pseudo_needs, makes=lambda c: ("pseudo/", _figure("pseudo_gallery")),
          markers=lambda c: ("pseudo/complete.json",), settings=_per_image("pseudo"),
          choices=_pseudo_choices, default=True),
    Stage("spml_labels", "wsss_jax.stages.spml_labels",
          "SPML: random walk + nearest-prototype labels from the trained embedding",
          needs=_spml_labels_needs, makes=lambda c: (f"{SPML_LABELS_DIR}/",),
          markers=lambda c: (f"{SPML_LABELS_DIR}/complete.json",), settings=_spml_labels_settings,
          report=_classifier_report),
    Stage("spml_bootstrap", "wsss_jax.stages.spml_bootstrap",
          "SPML: two bootstrapped softmax classifiers on the frozen embedding",
          needs=lambda c: (Need("data"), Need("train"), Need("spml_labels")),
          makes=lambda c: (f"{SPML_BOOT_DIR}/",),
          markers=lambda c: (f"{SPML_BOOT_DIR}/complete.json",),
          settings=_spml_bootstrap_settings, report=_classifier_report),
    Stage("seg", "wsss_jax.stages.seg",
          "DeepLabV3+ on the pseudo-labels (or the ground truth: seg.pseudo_source=gt)",
          needs=_seg_needs, makes=lambda c: (seg_home(c) + "/",),
          markers=lambda c: (f"{seg_home(c)}/{VARIABLES_FILE}",), settings=_seg_settings,
          choices=_seg_choices, variant=("seg.pseudo_source", ("pseudo", "gt")),
          default=True),
    Stage("evaluate", "wsss_jax.stages.evaluate",
          "multi-scale + flip (+ CRF) segmentation on data.val_split -> seg_miou",
          needs=lambda c: (Need("data"), Need("seg")),
          makes=lambda c: (_evaluate_file(c), _figure(f"{seg_home(c)}_gallery"),
                           _figure("per_class_iou")),
          markers=lambda c: (_evaluate_file(c),), settings=_evaluate_settings,
          variant=("seg.pseudo_source", ("pseudo", "gt")), default=True),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
DEFAULT_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.default)


def stage(name: str) -> Stage:
  """The stage called `name`; a `KeyError` names the known ones."""
  if name not in BY_NAME:
    raise KeyError(f"unknown stage {name!r}; known: {', '.join(NAMES)}")
  return BY_NAME[name]


def parse_stages(stages: str | tuple[str, ...] | list[str]) -> list[str]:
  """`'a,b,c'` or a sequence -> names; a `ValueError` names unknown ones and the known."""
  names = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
  names = [s for s in names if s]
  unknown = [s for s in names if s not in BY_NAME]
  if unknown:
    raise ValueError(f"config.stages: unknown stage(s) {unknown}; known: {list(NAMES)}")
  if not names:
    raise ValueError("config.stages is empty; give e.g. --config.stages=data,train")
  return names


# ---------------------------------------------------------------------------------------
# Fingerprints.
# ---------------------------------------------------------------------------------------
def stage_settings(config: Config, name: str) -> Settings:
  """The config values that decide stage `name`'s outputs: `{dotted key: value}`."""
  return stage(name).settings(config)


def digest(obj: Any) -> str:
  """16 hex digits of the sha256 of `obj`'s canonical JSON."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Identity:
  """What made (or would make) a stage's outputs.

  Attributes:
    fingerprint: `digest` of the other three fields and the schema.
    settings: `stage_settings`.
    inputs: needed stage -> its fingerprint.
    report: the stage's `report` settings (not in the fingerprint).
  """
  fingerprint: str
  settings: Settings
  inputs: dict[str, str]
  report: Settings


def identities(config: Config, scans: dict[str, Settings] | None = None
               ) -> Callable[[str], Identity]:
  """A memoised `name -> Identity` for `config` (each stage's settings read once).

  `scans`: a dict shared by the callers that judge one work directory (a config, its
  variants, the config a directory was made with), so each `config.data` block is scanned
  once (a COCO root is 120k files).
  """
  memo: dict[str, Identity] = {}
  visiting: list[str] = []
  scans = {} if scans is None else scans

  def settings_of(s: Stage) -> Settings:
    if s.name != "data":
      return s.settings(config)
    key = digest(_plain(get(config, "data", {})))
    if key not in scans:
      scans[key] = s.settings(config)
    return scans[key]

  def identity(name: str) -> Identity:
    if name in memo:
      return memo[name]
    if name in visiting:
      raise ValueError("config.stages: the stages' inputs form a cycle: "
                       + " -> ".join(visiting[visiting.index(name):] + [name]))
    visiting.append(name)
    s = stage(name)
    settings = settings_of(s)
    inputs = {n.stage: identity(n.stage).fingerprint for n in s.needs(config)}
    visiting.pop()
    fp = digest({"schema": SCHEMA, "stage": name, "settings": settings, "inputs": inputs})
    memo[name] = Identity(fp, settings, inputs, s.report(config))
    return memo[name]

  return identity


def fingerprint(config: Config, name: str) -> str:
  """Stage `name`'s fingerprint under `config` (see the module docstring).

  E.g. `fingerprint(config, 'baseline')` covers the seed, the dataset's content, the model
  (backbone, weights file, ...), the optimizer, `baseline.num_steps`/`baseline.lr`, the
  training augmentation and `cam_train`; not the work directory, the logging or the stages.
  """
  return identities(config)(name).fingerprint


def downstream(config: Config, names: set[str]) -> set[str]:
  """`names` and every stage that needs one of them, directly or not."""
  out = set(names)
  changed = True
  while changed:
    changed = False
    for s in STAGES:
      if s.name not in out and any(n.stage in out for n in s.needs(config)):
        out.add(s.name)
        changed = True
  return out
