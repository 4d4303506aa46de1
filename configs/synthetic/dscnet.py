r"""DSCNet-R (our reconstruction of DSCNet, METHODS.md §4) on the embedded synthetic set.

Same backbone, data, steps and stages as configs/synthetic/cam.py; only the method changes.

  wsss --config=configs/synthetic/dscnet.py --workdir=runs/synthetic_dscnet
  wsss --config=configs/synthetic/dscnet.py:variant=pgcl_only --workdir=runs/synthetic_dscnet_m1
  wsss --config=configs/synthetic/dscnet.py:runlocal --workdir=/tmp/w   # smoke run

Args: as configs/voc/dscnet.py (`variant`, `pgcl_mode`, `pixel_samples`, `backbone`,
`runlocal`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ml_collections as mlc  # noqa: E402

from wsss_jax.methods import dscnet  # noqa: E402


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, backbone="efficientnet_lite0", variant="full",
                         pgcl_mode="group", pixel_samples=0)
  c = common.load_config(__file__, "cam.py",
                         f"backbone={arg.backbone}" + (",runlocal" if arg.runlocal else ""))
  c.method = "dscnet_r"
  c.dscnet_r = mlc.ConfigDict(dscnet.dscnet_config(arg.variant, arg.pgcl_mode,
                                                    arg.pixel_samples))
  dscnet.validate_config(c.dscnet_r)
  return c
