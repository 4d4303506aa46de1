r"""CAM baseline on a VOC-layout folder (VOC 2012 + SBD, MSRC-21, or your own data).

Full size (GPU/TPU, VOC 2012 with SBD on disk):
  wsss --config=configs/voc/cam.py --config.data.root=/data/VOC2012 \
       --config.model.weights_path=/weights/resnet50.pth --workdir=runs/voc_cam
CPU-sized, on the real MSRC photos that ship beside the repository:
  wsss --config=configs/voc/cam.py:runlocal --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_cam
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


# The protocol's steps on MSRC (:runlocal): B baseline steps + N method steps.
BASELINE_STEPS = 500
METHOD_STEPS = 200


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="")
  c = common.base_config(method="cam", dataset="voc", runlocal=arg.runlocal)
  if arg.backbone:
    c.model.backbone = arg.backbone
  d = c.data
  if arg.runlocal:
    # MSRC-sized (276 train images, ~320x230), EfficientNet-Lite0 with its ImageNet
    # weights: the evaluation protocol's control (README, "Comparing methods"). The shared
    # baseline trains BASELINE_STEPS of the CPU CAM recipe; this config's train stage then
    # continues the CAM loss for METHOD_STEPS, as every method's :runlocal trains its own
    # loss for those steps from the same baseline.
    common.cpu_cam_recipe(c)
    common.plug_in(c, baseline_steps=BASELINE_STEPS, method_steps=METHOD_STEPS)
    d.eval_batch_size = 8
    c.train.log_every = 20
    c.train.ckpt_every = 100
    c.cams.scales = (0.5, 1.0, 1.5)
    c.seg.num_steps = 400
    c.seg.scales = (1.0,)
  else:
    # IRN-style recipe (METHODS.md §1.1 S1): ResNet-50 OS16, crop 512, batch 16, LR 0.1.
    d.train_split = "train_aug"
    d.crop_size = 512
    d.batch_size = 16
    c.optim.lr = 0.1
    c.train.num_steps = 5 * 10582 // 16
    c.seg.num_steps = 30000
    c.seg.batch_size = 16
  return c
