"""Shared config blocks and the `file.py:arg` parser (big_vision style).

Every config file is `get_config(arg) -> ConfigDict`. `arg` is a comma list of `key=value`
or bare flags, e.g. `configs/voc/cam.py:runlocal` or `:backbone=resnet50,runlocal`. Unknown
keys fail with a message that lists the accepted ones.

Config contract (scripts and notebooks rely on these names): `stages`, `method`, `seed`,
`data.name`, `data.root`, `data.train_split`, `data.sweep_split`, `data.val_split`,
`model.backbone`.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import ml_collections as mlc

from wsss_jax.data import sources
from wsss_jax.data import voc_builder
from wsss_jax.stages import registry

# The default pipeline, from the one list of stages (wsss_jax/stages/registry.py).
ALL_STAGES = registry.DEFAULT_STAGES

# The package owns these; configs re-export them for config files.
VOC_CLASSES = voc_builder.VOC_CLASSES
default_cache_dir = sources.default_cache_dir


def load_module(config_file: str, relative: str) -> Any:
  """The config module at `relative` to `config_file`'s folder, loaded by path (as the
  --config flag loads files), e.g. a method config building on its dataset's `cam.py` or a
  COCO config on `../voc/<method>.py`. Each call loads a fresh module, so configs built
  from it never share state."""
  path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                       relative))
  name = "_config_" + re.sub(r"\W", "_", os.path.relpath(path, os.path.dirname(__file__)))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config_file: str, relative: str, arg: str | None = None) -> mlc.ConfigDict:
  """`get_config(arg)` of the config file at `relative` (see `load_module`)."""
  return load_module(config_file, relative).get_config(arg)


def parse_arg(arg: str | None, **spec: Any) -> mlc.ConfigDict:
  """Parses `k=v,flag` into a ConfigDict typed by the defaults in `spec`.

  Raises:
    ValueError: on a key not in `spec`, naming the accepted keys.
  """
  out = mlc.ConfigDict(spec)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in spec:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}; accepted: {sorted(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      if has_value and value.lower() not in ("true", "false", "1", "0", ""):
        raise ValueError(f"Config argument {key!r} wants a boolean, got {value!r}")
      out[key] = (not has_value) or value.lower() in ("true", "1", "")
    else:
      out[key] = type(default)(value)
  return out


def data_config(name: str, runlocal: bool) -> mlc.ConfigDict:
  """The `config.data` block: which dataset, where, and how it is augmented."""
  d = mlc.ConfigDict()
  d.name = name                # synthetic | voc | coco
  d.root = ""                  # VOC-layout folder (voc), COCO root (coco); unused by synthetic
  d.cache_dir = ""             # '' -> default_cache_dir(); prepared array_record files
  d.train_split = "train"      # VOC 2012 users: train_aug
  d.sweep_split = "train"      # where CAMs and pseudo-labels are scored
  d.val_split = "val"          # where the segmentation model is scored
  d.on_bad_input = "error"     # error | skip (skip logs each bad example and a count)
  d.class_names = ()           # () -> from classes.txt / the dataset's defaults
  # Synthetic generator (ignored for other datasets).
  d.synthetic = mlc.ConfigDict(dict(
      num_train=400 if runlocal else 2000, num_val=100 if runlocal else 500,
      image_size=128, seed=0, cooccurrence=0.8, max_objects=3))
  # Augmentation / batching.
  d.crop_size = 128 if runlocal else 448
  d.scale_range = (0.7, 1.3) if runlocal else (0.5, 1.5)
  d.flip = True
  d.color_jitter = 0.3         # brightness/contrast/saturation strength; 0 disables
  d.eval_pad_size = 0          # 0 -> max image side of the split, rounded up to 32
  d.batch_size = 16            # global batch
  d.eval_batch_size = 8        # global batch for inference stages
  d.num_workers = 0            # grain multiprocessing workers (0 = in-process)
  d.prefetch = 2
  return d


def mesh_config() -> mlc.ConfigDict:
  """`config.mesh`: devices on axis `data` (-1 = all / fsdp); step implementation;
  `fsdp` > 1 adds a parameter-sharding axis (FSDP, step_impl jit) whose leaves of at
  least `fsdp_min_size` elements are split (wsss_jax/train/mesh.py, state.py)."""
  return mlc.ConfigDict(dict(data=-1, step_impl="jit",  # jit | shard_map
                             fsdp=1, fsdp_min_size=2 ** 14))


def optim_config(runlocal: bool) -> mlc.ConfigDict:
  """`config.optim`: optax optimizer, schedule and parameter groups."""
  o = mlc.ConfigDict()
  o.name = "sgd"               # sgd | nesterov | adamw
  o.lr = 0.01 if runlocal else 0.01
  o.momentum = 0.9
  o.weight_decay = 1e-4
  o.schedule = "poly"          # poly | cosine | constant
  o.poly_power = 0.9
  o.warmup_steps = 0
  o.clip_global_norm = 0.0     # 0 disables
  # Learning-rate multipliers per parameter group (METHODS.md §1.4).
  o.lr_mult = mlc.ConfigDict(dict(pretrained=1.0, pretrained_bias=2.0, head=10.0,
                                  head_bias=20.0))
  o.no_decay_bias = True
  o.frozen = ()                # regexes of parameter paths that do not train
  # With model.frozen_bn: also freeze the BatchNorm scales and biases (False: IRN's
  # FixedBatchNorm, fixed statistics with a trained affine).
  o.freeze_bn_affine = True
  o.pretrained_regex = "^backbone(/|$)"  # paths that get the `pretrained` multipliers
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8   # adamw
  return o


def base_config(*, method: str, dataset: str, runlocal: bool) -> mlc.ConfigDict:
  """The full default config; method/dataset files adjust it."""
  c = mlc.ConfigDict()
  c.method = method
  c.seed = 0
  c.stages = ",".join(ALL_STAGES)
  # Outputs in the work directory made with other settings: '' stops before any work and
  # names the changed keys; 'changed' deletes them and what depends on them, then reruns.
  c.rerun = ""
  c.data = data_config(dataset, runlocal)
  c.mesh = mesh_config()
  c.optim = optim_config(runlocal)
  c.model = mlc.ConfigDict(dict(
      backbone="efficientnet_lite0" if runlocal else "resnet50",
      pretrained=True,          # real ImageNet weights (see WEIGHTS.md); False = random init
      weights_path="",          # torchvision/timm file for ResNet; '' = none available
      output_stride=16,
      norm="batch",             # batch | group (heads)
      frozen_bn=False,          # BatchNorm uses its (ImageNet) running statistics
      frozen_stride=0,          # >0: stem and stages of nominal stride <= this are frozen
      input_norm="imagenet",    # EfficientNet-Lite: imagenet | lite ((x-127)/128, its own)
      pool="gap",               # gap | tap
      dtype="float32",          # compute dtype: float32 | bfloat16
      # How layers are lowered (models/lowering.py): auto = the fast form on CPU
      # (shift-sum depthwise, 1x1 as matmul, max pool gradient via argmax), XLA's ops
      # elsewhere.
      depthwise_impl="auto",    # auto | shift | grouped
      pointwise_impl="auto",    # auto | dot | conv
      maxpool_impl="auto",      # auto | argmax | shift | window (ResNet stem)
  ))
  c.train = mlc.ConfigDict(dict(
      num_steps=150 if runlocal else 8000, log_every=10 if runlocal else 50,
      ckpt_every=50 if runlocal else 1000, eval_every=0, keep_checkpoints=2,
      tensorboard=False, progress=True,
      init_from="",             # '' | 'baseline' | path: warm start (stages/train.py)
      # NaN/Inf: roll back to the last finite checkpoint and retry with the learning rate
      # x nan_lr_factor, at most nan_retries times (0: stop; train/rollback.py).
      nan_retries=0, nan_lr_factor=0.5))
  # The `baseline` stage: the CAM model methods warm-start from and SPML takes CAMs from
  # (`plug_in` gives it its own optimizer block `baseline.optim`); `cache`: share finished
  # baselines across work directories (stages/baseline_cache.py).
  c.baseline = mlc.ConfigDict(dict(num_steps=c.train.num_steps, lr=0.0,  # lr 0: optim.lr
                                   cache=True))
  # CAM method: images without a foreground label train as all-negative unless ignored
  # (the reference repos' `ignore_bg_images`, METHODS.md §1.4).
  c.cam_train = mlc.ConfigDict(dict(ignore_bg_images=False))
  c.cams = mlc.ConfigDict(dict(scales=(0.5, 1.0, 1.5, 2.0), flip=True,
                               variables="train"))  # train | baseline
  c.sweep = mlc.ConfigDict(dict(thresholds=tuple(round(0.05 * i, 2) for i in range(1, 17))))
  c.pseudo = mlc.ConfigDict(dict(
      mode="crf",               # threshold | double | crf (ops/pseudo_labels.py)
      fg_threshold=-1.0,        # < 0: the sweep's best threshold
      bg_threshold=0.05, crf="label", crf_iters=10))
  c.seg = mlc.ConfigDict(dict(
      pseudo_source="pseudo",   # pseudo | gt (fully supervised upper bound)
      # The labels' folder, relative to the work directory or absolute (labels made
      # elsewhere): 'pseudo' = the pseudo stage's; SPML's configs set spml/pseudo.
      pseudo_dir="pseudo",
      decoder="deeplabv3plus",  # deeplabv3plus | light (models/heads.py LightSegHead)
      num_steps=150 if runlocal else 20000, lr=0.007, batch_size=16,
      scales=(1.0,) if runlocal else (0.5, 1.0, 1.5, 2.0), flip=True, crf=False))
  return c


def cpu_cam_recipe(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """The CPU-sized CAM recipe of the evaluation protocol (EfficientNet-Lite0 on MSRC-21;
  ../shared/CALIBRATION.md, README "Comparing methods"): frozen BatchNorm statistics with
  trained affine (IRN's FixedBatchNorm), stem and stride <= 8 stages frozen, AdamW 1e-4
  (heads x10), 256² crops, batch 8; the segmenter is a fresh ImageNet backbone with the
  light decoder, AdamW, the labels from a CRF over each image's classes."""
  c.model.frozen_bn = True
  c.model.frozen_stride = 8
  # The weights were trained in TF with inputs (x - 127) / 128; on MSRC seed 0 this gave
  # CAM 0.540 / pseudo 0.605 (train) against 0.524 / 0.584 with ImageNet mean/std.
  c.model.input_norm = "lite"
  o = c.optim
  o.name = "adamw"
  o.lr = 1e-4
  o.weight_decay = 1e-4
  o.freeze_bn_affine = False
  o.lr_mult = mlc.ConfigDict(dict(pretrained=1.0, pretrained_bias=1.0, head=10.0,
                                  head_bias=10.0))
  d = c.data
  d.crop_size = 256
  d.scale_range = (0.7, 1.3)
  d.batch_size = 8
  d.color_jitter = 0.0
  c.pseudo.mode = "threshold_crf"
  c.seg.decoder = "light"
  c.seg.lr = 1e-4
  c.seg.batch_size = 8
  return c


def plug_in(c: mlc.ConfigDict, *, baseline_steps: int, method_steps: int) -> mlc.ConfigDict:
  """The evaluation protocol: the `baseline` stage trains the CAM recipe for
  `baseline_steps` (one per seed, cached across work directories), then the `train` stage
  trains `config.method` for `method_steps`, warm-started from it. cam.py applies it (its
  train stage continues the CAM loss for the same steps: the control); method configs load
  cam.py and change only the method and its own settings, so the baseline, the total
  steps, the data and the later stages are the same in every row."""
  c.stages = "data,baseline,train,cams,sweep,pseudo,seg,evaluate"
  c.baseline.num_steps = int(baseline_steps)
  c.baseline.optim = mlc.ConfigDict(c.optim.to_dict())
  # The segmenter's own optimizer block, the control's (its learning rate is `seg.lr`):
  # a method config that changes `optim` for its train stage (SPML's SGD, CSRM's Nesterov)
  # must not change the segmentation model its labels are judged by.
  c.seg.optim = mlc.ConfigDict({k: v for k, v in c.optim.to_dict().items() if k != "lr"})
  c.train.num_steps = int(method_steps)
  c.train.init_from = "baseline"
  return c


# COCO 2014 (wsss_jax/data/coco_builder.py): 82,783 train / 40,504 val images, 81 classes.
COCO_TRAIN_IMAGES = 82783


def is_runlocal(arg: str | None) -> bool:
  """Whether a `file.py:arg` string asks for the CPU-sized variant."""
  return "runlocal" in [a.partition("=")[0] for a in (arg or "").split(",")]


def coco_method_config(config_file: str, voc_file: str, arg: str | None
                       ) -> tuple[mlc.ConfigDict, bool]:
  """A method's VOC config (`voc_file`, relative to `config_file`) moved to COCO.

  `:runlocal` keeps the VOC runlocal train steps (a method's CPU-sized split of baseline
  and method steps); full size takes `use_coco`'s schedule, which method files then
  adjust. Returns `(config, runlocal)`.
  """
  c = load_config(config_file, voc_file, arg)
  runlocal = is_runlocal(arg)
  steps = int(c.train.num_steps)
  use_coco(c, runlocal)
  if runlocal:
    c.train.num_steps = steps
  return c, runlocal


def use_coco(c: mlc.ConfigDict, runlocal: bool) -> mlc.ConfigDict:
  """Turns a VOC config into its COCO 2014 counterpart (configs/coco/*.py).

  Splits are the `instances_<split>.json` names; images without a foreground label are
  left out of classification training (the reference repos' `ignore_bg_images` on COCO,
  METHODS.md §1.4). The full-size schedule is the CAM baseline's IRN-style 5 epochs at
  batch 16 and the segmentation model's 100k steps at batch 16 (FBR's COCO setting,
  METHODS.md §3.4); method files adjust their own parts.
  """
  d = c.data
  d.name = "coco"
  d.train_split = "train2014"
  d.sweep_split = "train2014"
  d.val_split = "val2014"
  c.cam_train.ignore_bg_images = True
  if not runlocal:
    d.crop_size = 512
    d.batch_size = 16
    c.train.num_steps = 5 * COCO_TRAIN_IMAGES // 16
    c.seg.num_steps = 100000
    c.seg.batch_size = 16
  return c
