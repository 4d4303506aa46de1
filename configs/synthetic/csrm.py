r"""CSRM on the embedded synthetic digits-on-textures set.

  wsss --config=configs/synthetic/csrm.py --workdir=runs/synthetic_csrm
  wsss --config=configs/synthetic/csrm.py:runlocal --workdir=/tmp/w   # smoke-sized

The protocol of configs/synthetic/cam.py: its shared CAM baseline stage, then CSRM for the
control's method steps, warm-started from it, with the reference's CSRM optimizer
(configs/voc/csrm.py `reference_optimizer`: Nesterov, LR 0.007, clip 1.0, classifier x1,
biases 1x/10x). The heads are 64 channels wide (`csrm.head_width`; reference 256) to keep
the CPU cost of a CSRM step near 3.6x a CAM step, and use BatchNorm (`csrm.head_norm`;
reference GroupNorm(4), which barely trained at batch 8 with the earlier optimizer; see
configs/voc/csrm.py).
Args: `runlocal`, `backbone`, `crf` (label CRF in the step, default on), `seg_cams`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from wsss_jax.methods import csrm  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="efficientnet_lite0", crf=True,
                         seg_cams=False)
  c = common.load_config(__file__, "cam.py", ",".join(
      [f"backbone={arg.backbone}"] + (["runlocal"] if arg.runlocal else [])))
  c.method = "csrm"
  c.stages = "data,baseline,train,cams,sweep,pseudo,seg,evaluate"
  c.csrm = csrm.default_csrm_config()
  c.csrm.cams_from = "seg" if arg.seg_cams else "class"
  c.csrm.use_crf = arg.crf
  c.train.init_from = "baseline"
  common.load_module(__file__, "../voc/csrm.py").reference_optimizer(c.optim)
  # ~10 "epochs" of the method steps; half of them train only L_c + L_c2s before the
  # consistency terms start (the reference's 1 of 15 epochs is 46 steps x 32 images; see
  # configs/voc/csrm.py).
  c.csrm.steps_per_epoch = max(int(c.train.num_steps) // 10, 1)
  c.csrm.warmup_epochs = 5
  c.csrm.head_width = 64
  c.csrm.head_norm = "batch"   # as configs/voc/csrm.py:runlocal (reference: GroupNorm(4))
  c.csrm.ema_batch_stats = True  # the teacher averages the BatchNorm heads' statistics too
  if arg.runlocal:  # smoke-sized: 3 + 3 steps, CSRM losses on from its second step
    c.baseline.num_steps, c.train.num_steps, c.csrm.steps_per_epoch = 3, 3, 1
    c.csrm.warmup_epochs = 1
  c.csrm.num_queries = 64
  c.csrm.bank_size_fg, c.csrm.bank_size_bg = 2000, 4000
  return c
