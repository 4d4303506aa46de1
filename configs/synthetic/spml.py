r"""SPML on the embedded synthetic set; same data and total steps as synthetic/cam.py.

  wsss --config=configs/synthetic/spml.py --workdir=runs/synthetic_spml
  wsss --config=configs/synthetic/spml.py:weak_label=points --workdir=runs/synthetic_spml_pts
  wsss --config=configs/synthetic/spml.py:runlocal --workdir=/tmp/w   # smoke run

Baseline 90 + SPML 60 steps = the 150 train steps of synthetic/cam.py. Args as in
configs/voc/spml.py (`bootstrap` is off unless given: this config is CPU-sized).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="efficientnet_lite0",
                         weak_label="tags", code_weights=False, bootstrap="auto")
  c = common.load_config(__file__, "cam.py",
                         f"backbone={arg.backbone}" + (",runlocal" if arg.runlocal else ""))
  voc = common.load_module(__file__, "../voc/spml.py")
  total = int(c.train.num_steps)
  cam_steps = max(1, total * 3 // 5)
  c = voc.spml_setup(c, weak_label=arg.weak_label, code_weights=arg.code_weights,
                     cam_steps=cam_steps, spml_steps=total - cam_steps,
                     bootstrap=voc.bootstrap_arg(arg.bootstrap, True))
  # 128-px images: stride-4 maps of 32x32 at the 128 crop; fewer superpixels and segments.
  c.spml.superpixels.n_segments = 32
  c.spml.max_segments = 192          # ~100-125 segments per 128 crop (measured)
  c.spml.pixels_per_image = 256
  if arg.weak_label == "tags":
    c.spml_labels.rw_logt = 0        # as configs/voc/spml.py:runlocal (60 SPML steps here)
    c.spml_bootstrap.steps = 40      # per classifier round (reference: 4k iterations)
  if arg.runlocal:
    c.spml.pixels_per_image = 64
  return c
