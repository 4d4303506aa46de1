r"""FBR on a VOC-layout folder; same backbone, data and steps as configs/voc/cam.py.

Full size (VOC 2012 + SBD, ResNet-50 weights on disk):
  wsss --config=configs/voc/fbr.py --config.data.root=/data/VOC2012 \
       --config.model.weights_path=/weights/resnet50.pth --workdir=runs/voc_fbr
CPU-sized on MSRC (paper semantics; the released code's behaviour with `code_compat`):
  wsss --config=configs/voc/fbr.py:runlocal --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_fbr
  wsss --config=configs/voc/fbr.py:runlocal,code_compat \
       --config.data.root=../shared/data/msrc21 --workdir=runs/msrc_fbr_code

Args: `code_compat`, `tap` (TAP instead of GAP pooling), `backbone`, `runlocal`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from wsss_jax.methods import fbr  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="", code_compat=False, tap=False)
  cam_arg = ",".join(filter(None, [f"backbone={arg.backbone}" if arg.backbone else "",
                                   "runlocal" if arg.runlocal else ""]))
  c = common.load_config(__file__, "cam.py", cam_arg)
  c.method = "fbr"
  if arg.tap:
    c.model.pool = "tap"
  c.fbr = fbr.fbr_config()
  c.fbr.code_compat = arg.code_compat
  # Bank: 50k NROIs (VOC, the fbr_config default); use --config.fbr.bank_size=200000 on COCO.
  if arg.runlocal:
    # The paper's bank holds ~3.9 % of its training's NROIs (50k of 20,000 steps x 64); the
    # 50k default would never fill in the protocol's few method steps, so every draw would
    # stay uniform over all NROIs since step 0. Sized from train.num_steps x batch x K at
    # method build (follows --config.train.num_steps overrides): 500 NROIs for 200 x 8 x 8.
    c.fbr.bank_frac = fbr.PAPER_BANK_FRAC
  return c
