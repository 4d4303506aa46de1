r"""DSCNet-R (reconstruction) on COCO 2014, with the CAM baseline's COCO schedule
(configs/coco/cam.py); the paper reports COCO val 34.6 / 35.8 but gives no COCO settings.

  wsss --config=configs/coco/dscnet.py --config.data.root=/data/coco2014 --workdir=runs/coco_dscnet
`:runlocal` is CPU-sized (configs/voc/dscnet.py:runlocal) for a small COCO-format folder. The
method's arguments are those of configs/voc/dscnet.py.
"""
import os
import sys

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _CONFIGS)
import common  # noqa: E402


def get_config(arg: str | None = None):
  return common.coco_method_config(__file__, "../voc/dscnet.py", arg)[0]
