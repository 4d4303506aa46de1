r"""CAM baseline on COCO 2014 (81 classes; `annotations/instances_{train,val}2014.json`).

Full size (ResNet-50 OS16, crop 512, batch 16, 5 epochs = 25,869 steps, LR 0.1):
  wsss --config=configs/coco/cam.py --config.data.root=/data/coco2014 \
       --config.model.weights_path=/weights/resnet50.pth --workdir=runs/coco_cam
A TPU pod or SLURM cluster runs the same command on every host (README, "Scaling out").
`:runlocal` is CPU-sized (configs/voc/cam.py:runlocal) for a small COCO-format folder.
"""
import os
import sys

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _CONFIGS)
import common  # noqa: E402


def get_config(arg: str | None = None):
  c = common.load_config(__file__, "../voc/cam.py", arg)  # same args: runlocal, backbone
  return common.use_coco(c, common.is_runlocal(arg))
