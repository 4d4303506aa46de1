r"""CSRM on COCO 2014: the runner's COCO block (METHODS.md §2.4): CAM baseline (5 epochs),
then 15 "epochs" of 256 steps, crop 640 (ratio 400/640..800/640), batch 32 (16 L + 16 U),
delta_fg 0.40, high rank 12, no label smoothing.

  wsss --config=configs/coco/csrm.py --config.data.root=/data/coco2014 --workdir=runs/coco_csrm
`:runlocal` is CPU-sized (configs/voc/csrm.py:runlocal) for a small COCO-format folder. The
method's arguments are those of configs/voc/csrm.py.
"""
import os
import sys

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _CONFIGS)
import common  # noqa: E402


def get_config(arg: str | None = None):
  c, runlocal = common.coco_method_config(__file__, "../voc/csrm.py", arg)
  if runlocal:
    return c
  c.baseline.num_steps = 5 * common.COCO_TRAIN_IMAGES // 16
  c.train.num_steps = 15 * 256
  c.csrm.steps_per_epoch = 256
  c.data.crop_size = 640
  c.data.scale_range = (400 / 640, 800 / 640)
  c.data.batch_size = 32
  c.csrm.fg_threshold = 0.40
  c.csrm.high_rank = 12
  c.csrm.label_smoothing = 0.0
  return c
