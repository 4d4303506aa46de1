r"""CSRM on a VOC-layout folder: CAM baseline stage, then CSRM warm-started from it.

Same backbone and data as configs/voc/cam.py. The CSRM step trains with the reference's
optimizer (`reference_optimizer`) in both variants.

Full size (VOC 2012 + SBD, ResNet-50 weights on disk; reference VOC values of METHODS §2.4):
  wsss --config=configs/voc/csrm.py --config.data.root=/data/VOC2012 \
       --config.model.weights_path=/weights/resnet50.pth --workdir=runs/voc_csrm
CPU-sized on MSRC (the protocol of cam.py:runlocal: its shared 500-step baseline, then 200
CSRM steps in place of the control's 200 CAM steps; 64-wide BatchNorm heads):
  wsss --config=configs/voc/csrm.py:runlocal --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_csrm

Args: `runlocal`, `backbone`, `crf` (label CRF in the step: 1 on, 0 off; default on for the
full config, off for runlocal), `seg_cams` (pipeline CAMs from the segmentation head instead of the
classification branch).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ml_collections as mlc  # noqa: E402

from wsss_jax.methods import csrm  # noqa: E402

# Parameters that the CSRM step restores from the CAM baseline (`train.init_from`): the
# backbone and the CAM classifier `cam_head`. The reference trains a restored classifier at
# the pretrained LR (PNOC adds it to the scratch layers only without `--restore`); with the
# default `^backbone(/|$)` it would train at 10x, and L_s2c reaches the CAMs only through it
# and the backbone. The new decoder and rep head stay in the `head` group (x10). Without a
# warm start (`--config.train.init_from=''`) set `optim.pretrained_regex='^backbone(/|$)'`.
WARM_STARTED_REGEX = r"^(backbone|cam_head)(/|$)"
# LR multipliers: the reference's LR_ALPHA_SCRATCH=10, LR_ALPHA_BIAS=1 (biases at their
# group's LR, not PNOC's default 2x).
LR_MULT = dict(pretrained=1.0, pretrained_bias=1.0, head=10.0, head_bias=10.0)


def reference_optimizer(o: mlc.ConfigDict) -> mlc.ConfigDict:
  """`config.optim` of the CSRM step as the reference's runner (METHODS §2.4): SGD with
  Nesterov momentum 0.9, LR 0.007 (poly 0.9), global gradient-norm clip 1.0, LR multipliers
  `LR_MULT` with the warm-started `WARM_STARTED_REGEX` params as the pretrained group.
  Every csrm config (full size and CPU-sized) uses it; the baseline has its own block."""
  o.name = "nesterov"
  o.momentum = 0.9
  o.lr = 0.007
  o.schedule, o.poly_power = "poly", 0.9
  o.clip_global_norm = 1.0
  o.pretrained_regex = WARM_STARTED_REGEX
  o.lr_mult = mlc.ConfigDict(LR_MULT)
  return o


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="", crf=-1, seg_cams=False)
  cam_arg = ",".join(filter(None, [f"backbone={arg.backbone}" if arg.backbone else "",
                                   "runlocal" if arg.runlocal else ""]))
  c = common.load_config(__file__, "cam.py", cam_arg)
  total = int(c.train.num_steps)
  c.method = "csrm"
  c.stages = "data,baseline,train,cams,sweep,pseudo,seg,evaluate"
  c.csrm = csrm.default_csrm_config()
  c.csrm.cams_from = "seg" if arg.seg_cams else "class"
  c.train.init_from = "baseline"
  cam_optim = mlc.ConfigDict(c.optim.to_dict())
  reference_optimizer(c.optim)
  if arg.runlocal:
    # The protocol (cam.py:runlocal): the shared baseline, then `total` CSRM steps (the
    # control's method steps). A CSRM step runs three forwards of a stride-4 decoder; at
    # the reference width 256 that is 15x a CAM step (1158 vs 77 GFLOP), so the CPU
    # variant uses 64-ch heads. Batch 8 = 4 "L" + 4 "U" rows (csrm.unlabeled='split').
    # "Epochs" of 5 steps (40 at 200 steps; reference 15 x 46). Warm-up 5 epochs = 25
    # steps = 100 L images before L_s2c/L_u/L_contra start (reference: 46 steps x 32 = 1472
    # images). With the reference's 1 epoch (5 steps) the random-init segmentation branch is
    # still uninformed when those terms start and they pull the CAMs down (README, "Why
    # CSRM ..."; `--config.csrm.warmup_epochs=1` restores it).
    c.csrm.steps_per_epoch = 5
    c.csrm.warmup_epochs = 5
    c.csrm.head_width = 64
    # BatchNorm in the scratch heads instead of the reference's GroupNorm(4): at batch 8 and
    # 50 steps the GroupNorm heads barely learn (L_c2s stays near ln 16) and CSRM stays level
    # with the baseline; with BatchNorm its CAMs and pseudo-labels beat it over 3 seeds
    # (README, "Why CSRM ..."; `--config.csrm.head_norm=group` restores the reference).
    c.csrm.head_norm = "batch"
    # BatchNorm heads have statistics: the teacher averages them too (the reference's
    # GroupNorm heads have none, and it averages parameters only).
    c.csrm.ema_batch_stats = True
    c.csrm.use_crf = arg.crf == 1   # off by default (CPU time); on with :runlocal,crf=1
    c.csrm.num_queries = 64
    c.csrm.bank_size_fg, c.csrm.bank_size_bg = 3000, 5000
  else:
    # Reference VOC recipe (§2.4): 15 epochs of 46 steps after the CAM baseline (IRN-style
    # 5 epochs, cam.py); SGD Nesterov LR 0.007, clip 1.0, label smoothing 0.1, 256-ch heads,
    # label CRF in the step.
    c.baseline.num_steps = total
    c.train.num_steps = 15 * 46
    # Batch stays cam.py's 16 (8 L + 8 U) so the baseline stage equals cam.py; the
    # reference's 32 L + 32 U is --config.data.batch_size=64.
    # The baseline's own optimizer block: cam.py's (its CAM classifier is new: x10), with
    # Nesterov and clip as before, LR 0.1.
    c.baseline.optim = cam_optim
    c.baseline.optim.update(name="nesterov", clip_global_norm=1.0, lr=0.1)
    c.csrm.use_crf = arg.crf != 0
  return c
