r"""SPML on COCO 2014: our extension (SPML reports no COCO tag setting, METHODS.md §5);
the CAM baseline gets configs/coco/cam.py's schedule, the SPML steps stay those of
configs/voc/spml.py.

  wsss --config=configs/coco/spml.py --config.data.root=/data/coco2014 --workdir=runs/coco_spml
`:runlocal` is CPU-sized (configs/voc/spml.py:runlocal) for a small COCO-format folder. The
method's arguments are those of configs/voc/spml.py.
"""
import os
import sys

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _CONFIGS)
import common  # noqa: E402


def get_config(arg: str | None = None):
  c, runlocal = common.coco_method_config(__file__, "../voc/spml.py", arg)
  if runlocal:
    return c
  c.baseline.num_steps = 5 * common.COCO_TRAIN_IMAGES // 16
  # SPML's own stage keeps its VOC length (no COCO setting exists for SPML).
  c.train.num_steps = int(common.load_config(__file__, "../voc/spml.py", arg).train.num_steps)
  return c
