r"""FBR (paper semantics) on the embedded synthetic set; same data/steps as synthetic/cam.py.

  wsss --config=configs/synthetic/fbr.py --workdir=runs/synthetic_fbr
  wsss --config=configs/synthetic/fbr.py:code_compat --workdir=runs/synthetic_fbr_code
  wsss --config=configs/synthetic/fbr.py:runlocal --workdir=/tmp/w   # smoke run

Args: `code_compat` (the released code's weights, temperatures, detached L_FB anchors and
L_sim; METHODS.md §3.7), `tap` (TAP pooling instead of GAP), `backbone`, `runlocal`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from wsss_jax.methods import fbr  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="efficientnet_lite0",
                         code_compat=False, tap=False)
  c = common.load_config(__file__, "cam.py",
                         f"backbone={arg.backbone}" + (",runlocal" if arg.runlocal else ""))
  c.method = "fbr"
  if arg.tap:
    c.model.pool = "tap"
  c.fbr = fbr.fbr_config()
  c.fbr.code_compat = arg.code_compat
  # 128-px crops at OS16 give 8x8 maps: top-K = 64 // 16 = 4 prototype pixels per class.
  if arg.runlocal:
    c.fbr.bank_size = 512
  return c
