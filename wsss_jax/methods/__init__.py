"""Methods: each is a model + extra state + loss on the one shared train step.

`make_method(config, num_classes)` picks the method named by `config.method`; the
segmentation stage uses `make_method(config, num_classes, name='seg')`.
"""
from __future__ import annotations

from typing import Any

from wsss_jax.methods import base
from wsss_jax.methods import cam
from wsss_jax.methods import csrm
from wsss_jax.methods import dscnet
from wsss_jax.methods import fbr
from wsss_jax.methods import seg
from wsss_jax.methods import spml

# config.method -> factory(config, num_classes) -> base.Method
FACTORIES = {
    "cam": cam.make_cam_method,
    "csrm": csrm.make_csrm_method,
    "seg": seg.make_seg_method,
    "spml": spml.make_spml_method,
    "dscnet_r": dscnet.make_dscnet_method,
    "fbr": fbr.make_fbr_method,
}


def make_method(config: Any, num_classes: int, name: str | None = None) -> base.Method:
  """Builds the Method `name` (default `config.method`) for `num_classes` (incl. bg)."""
  name = name or config.method
  if name not in FACTORIES:
    raise ValueError(f"config.method={name!r} is not available; choose from "
                     f"{sorted(k for k in FACTORIES if k != 'seg')}")
  return FACTORIES[name](config, num_classes)
