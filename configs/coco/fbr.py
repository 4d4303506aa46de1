r"""FBR on COCO 2014 (METHODS.md §3.4: the paper gives only the 200k NROI bank for COCO;
the rest follows its baseline, here the IRN-style CAM schedule of configs/coco/cam.py).

  wsss --config=configs/coco/fbr.py --config.data.root=/data/coco2014 --workdir=runs/coco_fbr
`:runlocal` is CPU-sized (configs/voc/fbr.py:runlocal) for a small COCO-format folder. The
method's arguments are those of configs/voc/fbr.py.
"""
import os
import sys

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _CONFIGS)
import common  # noqa: E402


def get_config(arg: str | None = None):
  c, runlocal = common.coco_method_config(__file__, "../voc/fbr.py", arg)
  if runlocal:
    return c
  c.fbr.bank_size = 200000
  return c
