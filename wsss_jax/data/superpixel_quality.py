r"""How well superpixels respect the ground truth: to pick a method and its parameters.

  python -m wsss_jax.data.superpixel_quality --config=configs/voc/spml.py:runlocal \
      --config.data.root=../shared/data/msrc21 --methods=hed,slic,felzenszwalb [--limit=50]

For every method (with the other fields of `config.spml.superpixels`), over the images of
`data.train_split` (ground truth of the train split: like the threshold sweep, this is a
diagnostic, not a training signal), it prints the mean per image of:
- `segments`: superpixels per image;
- `asa`: achievable segmentation accuracy, the pixel accuracy when every superpixel takes
  its majority ground-truth label (void pixels ignored): the best any labelling of these
  superpixels can reach, the number SPML's relation I relies on;
- `boundary_recall`: the share of ground-truth boundary pixels within `--tolerance` pixels
  of a superpixel boundary (void counts as a label: MSRC's void bands outline objects).
"""
from __future__ import annotations

import time

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags
from scipy import ndimage

_CONFIG = config_flags.DEFINE_config_file("config", None, "An SPML config.",
                                          lock_config=False)
_METHODS = flags.DEFINE_list("methods", ["hed", "slic", "felzenszwalb"], "Methods to score.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Score the first N images only (0 = all).")
_TOLERANCE = flags.DEFINE_integer("tolerance", 2, "Boundary recall tolerance, pixels.")


def boundaries(labels: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose right or lower neighbour has another label, and those
  neighbours (both sides of every change)."""
  out = np.zeros(labels.shape, bool)
  horizontal = labels[:, 1:] != labels[:, :-1]
  vertical = labels[1:, :] != labels[:-1, :]
  out[:, 1:] |= horizontal
  out[:, :-1] |= horizontal
  out[1:, :] |= vertical
  out[:-1, :] |= vertical
  return out


def achievable_accuracy(superpixels: np.ndarray, gt: np.ndarray, ignore: int = 255) -> float:
  """Pixel accuracy of the majority ground-truth label per superpixel; nan without valid
  pixels. superpixels: int [H, W] ids >= 0; gt: int [H, W], `ignore` = void."""
  valid = gt != ignore
  if not valid.any():
    return float("nan")
  sp, label = superpixels[valid].astype(np.int64), gt[valid].astype(np.int64)
  counts = np.zeros((sp.max() + 1, label.max() + 1), np.int64)
  np.add.at(counts, (sp, label), 1)
  return float(counts.max(axis=1).sum() / valid.sum())


def boundary_recall(superpixels: np.ndarray, gt: np.ndarray, tolerance: int) -> float:
  """Share of ground-truth boundary pixels within `tolerance` 4-neighbour steps of a
  superpixel boundary; nan when the ground truth has no boundary."""
  truth = boundaries(gt)
  if not truth.any():
    return float("nan")
  near = ndimage.binary_dilation(boundaries(superpixels), iterations=tolerance) \
      if tolerance else boundaries(superpixels)
  return float((near & truth).sum() / truth.sum())


def main(argv) -> None:
  del argv
  from wsss_jax.data import sources
  from wsss_jax.data import superpixels
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("give --config (an SPML config, for data.* and spml.superpixels)")
  source = sources.get_source(config.data, config.data.train_split)
  count = len(source) if _LIMIT.value <= 0 else min(_LIMIT.value, len(source))
  print("| method | images | segments | asa | boundary_recall | s/image |")
  print("|---|---|---|---|---|---|")
  for method in _METHODS.value:
    sp_cfg = config.spml.superpixels.to_dict() | {"method": method}
    rows, start = [], time.perf_counter()
    for i in range(count):
      record = source[i]
      sp = superpixels.compute(record["image"], sp_cfg)
      rows.append((sp.max() + 1, achievable_accuracy(sp, record["mask"]),
                   boundary_recall(sp, record["mask"], _TOLERANCE.value)))
    seconds = (time.perf_counter() - start) / count
    segs, asa, recall = np.nanmean(np.asarray(rows, np.float64), axis=0)
    print(f"| {method} | {count} | {segs:.1f} | {asa:.3f} | {recall:.3f} | {seconds:.2f} |")


if __name__ == "__main__":
  app.run(main)
