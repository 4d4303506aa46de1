r"""DSCNet-R (our reconstruction of DSCNet, METHODS.md §4) on a VOC-layout folder.

Same backbone, data, steps and stages as configs/voc/cam.py (`:runlocal` = MSRC-21 with
EfficientNet-Lite0, as there); only the method changes.

  wsss --config=configs/voc/dscnet.py --config.data.root=/data/VOC2012 --workdir=runs/voc_dscnet
  wsss --config=configs/voc/dscnet.py:runlocal --config.data.root=../shared/data/msrc21 \
       --workdir=runs/msrc_dscnet
  wsss --config=configs/voc/dscnet.py:runlocal,variant=pgcl_only,pgcl_mode=pixel \
       --config.data.root=../shared/data/msrc21 --workdir=runs/msrc_dscnet_m1_pixel

Args: `variant` = full (M4, default) | independent (M3) | pgcl_only (M1) | sgcl_only (M2)
(the paper's ablation rows); `pgcl_mode` = group (default) | pixel (pixel-by-pixel
contrast, for the efficiency comparison); `pixel_samples` (pixel mode: anchors per image,
0 = all cells); `backbone`; `runlocal`. Every reconstructed choice is under
`config.dscnet_r.reconstructed` (override with `--config.dscnet_r.reconstructed.KEY=V`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ml_collections as mlc  # noqa: E402

from wsss_jax.methods import dscnet  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="", variant="full",
                         pgcl_mode="group", pixel_samples=0)
  c = common.load_config(__file__, "cam.py", ",".join(
      filter(None, [f"backbone={arg.backbone}" if arg.backbone else "",
                    "runlocal" if arg.runlocal else ""])))
  c.method = "dscnet_r"
  c.dscnet_r = mlc.ConfigDict(dscnet.dscnet_config(arg.variant, arg.pgcl_mode,
                                                    arg.pixel_samples))
  dscnet.validate_config(c.dscnet_r)
  return c
