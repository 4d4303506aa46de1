"""Crop padding is never background (issue 29) in the methods that read background from
CAMs on train crops; FBR's own case is in test_fbr.py, the transform's `valid` in
test_transforms.py. SPML reads its labels from `batch['mask']` (255 on padding) and
DSCNet-R finds padding cells from the zero images (`ops.group_contrast.valid_cells`), so
only CSRM needs the batch's `valid`."""
import numpy as np
import pytest

from test_csrm import C, _cfg, _tiny_model
from tiny_model import make_batches, run_steps
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods import csrm

pytestmark = pytest.mark.usefixtures("fast_compile")


def _padded(batches, keep_cols: int):
  out = []
  for bt in batches:
    valid = np.zeros(bt["image"].shape[:3], bool)
    valid[:, :, :keep_cols] = True
    image = np.where(valid[..., None], bt["image"], 0.0).astype(np.float32)
    out.append({**bt, "image": image, "valid": valid})
  return out


def test_csrm_cam_labels_skip_padding():
  # 3/4 of every crop is padding; without `valid` the teacher's CAM pseudo masks call the
  # zero padding background (CAMs below delta_bg there), with it no padding is labelled.
  batches = _padded(make_batches(1, batch=4, size=32), keep_cols=8)
  cfg = _cfg(classmix_prob=0.0)
  method = csrm.make_csrm_method(cfg, C, model=_tiny_model())
  _, hist = run_steps(method, cfg, 1, "jit", batches)
  no_valid = [{k: v for k, v in b.items() if k != "valid"} for b in batches]
  _, hist_nv = run_steps(method, _cfg(classmix_prob=0.0), 1, "jit", no_valid)
  frac_valid = float(np.mean(batches[0]["valid"]))
  assert float(hist[0]["cam_labelled_fraction"]) <= frac_valid + 1e-6
  assert float(hist_nv[0]["cam_labelled_fraction"]) > frac_valid
