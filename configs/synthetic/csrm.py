r"""CSRM on the embedded synthetic digits-on-textures set.

  wsss --config=configs/synthetic/csrm.py --workdir=runs/synthetic_csrm
  wsss --config=configs/synthetic/csrm.py:runlocal --workdir=/tmp/w   # smoke-sized

CAM baseline stage (`baseline.num_steps`) + CSRM warm-started from it (`train.num_steps`);
together they equal configs/synthetic/cam.py's `train.num_steps` (113 + 37 = 150). The
heads are 64 channels wide (`csrm.head_width`; reference 256) to keep the CPU cost of a
CSRM step near 3.6x a CAM step, and use BatchNorm (`csrm.head_norm`; reference GroupNorm(4),
which barely trains at batch 8; see configs/voc/csrm.py).
Args: `runlocal`, `backbone`, `crf` (label CRF in the step, default on), `seg_cams`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ml_collections as mlc  # noqa: E402

from wsss_jax.methods import csrm  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="efficientnet_lite0", crf=True,
                         seg_cams=False)
  c = common.load_config(__file__, "cam.py", ",".join(
      [f"backbone={arg.backbone}"] + (["runlocal"] if arg.runlocal else [])))
  total = int(c.train.num_steps)
  c.method = "csrm"
  c.stages = "data,baseline,train,cams,sweep,pseudo,seg,evaluate"
  c.csrm = csrm.default_csrm_config()
  c.csrm.cams_from = "seg" if arg.seg_cams else "class"
  c.csrm.use_crf = arg.crf
  c.train.init_from = "baseline"
  # The restored CAM classifier trains at x1, biases at their group's LR (configs/voc/csrm.py).
  voc_csrm = common.load_module(__file__, "../voc/csrm.py")
  c.optim.pretrained_regex = voc_csrm.WARM_STARTED_REGEX
  c.optim.lr_mult = mlc.ConfigDict(voc_csrm.LR_MULT)
  c.baseline.lr = float(c.optim.lr)
  c.baseline.num_steps = total - total // 4
  c.train.num_steps = max(total // 4, 1)
  c.optim.lr = 0.007
  c.csrm.steps_per_epoch = max(c.train.num_steps // 10, 1)   # ~10 "epochs"
  # Half of the CSRM steps train only L_c + L_c2s before the consistency terms start (18 of
  # 37 steps; the reference's 1 of 15 epochs is 46 steps x 32 images); see configs/voc/csrm.py.
  c.csrm.warmup_epochs = 6
  c.csrm.head_width = 64
  c.csrm.head_norm = "batch"   # as configs/voc/csrm.py:runlocal (reference: GroupNorm(4))
  if arg.runlocal:  # smoke-sized: 3 + 3 steps, CSRM losses on from its second step
    c.baseline.num_steps, c.train.num_steps, c.csrm.steps_per_epoch = 3, 3, 1
    c.csrm.warmup_epochs = 1
  c.csrm.num_queries = 64
  c.csrm.bank_size_fg, c.csrm.bank_size_bg = 2000, 4000
  return c
