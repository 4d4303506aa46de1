"""Figures a researcher can read (issue #32): class colour legends with "ignore", CAM
overlays naming their class with a colour bar, per-class bars that tell "absent from the
split" from an IoU of 0 and name the split."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from wsss_jax import viz  # noqa: E402  (after the skip)
from wsss_jax.data import palette  # noqa: E402

NAMES = ["background", "cat", "dog", "cow"]


def _texts(legend):
  return [t.get_text() for t in legend.get_texts()]


def test_gallery_legend_names_the_classes_shown_and_ignore():
  img = np.zeros((6, 8, 3), np.uint8)
  gt = np.zeros((6, 8), np.uint8)
  gt[1:3, 1:3] = 1
  gt[0] = 255
  pred = np.full((6, 8), 3, np.uint8)
  fig = viz.label_gallery([img], {"ground truth": [gt], "prediction": [pred]}, ["x"],
                          NAMES)
  (legend,) = fig.legends
  assert _texts(legend) == ["background", "cat", "cow", "ignore"]
  colours = [tuple(np.round(np.asarray(h.get_facecolor()[:3]) * 255).astype(int))
             for h in legend.legend_handles]
  assert colours == [tuple(palette.voc_palette()[v]) for v in (0, 1, 3, 255)]
  # Without names the ids are still told apart.
  fig = viz.label_gallery([img], {"gt": [gt]}, ["x"])
  assert _texts(fig.legends[0]) == ["class 0", "class 1", "ignore"]


def test_per_class_bars_tell_absent_from_zero_and_name_the_split():
  fig = viz.per_class_bars(NAMES, {"cam": [0.5, None, 0.0, 0.25], "seg": [0.6, 0.1, 0.0,
                                                                           None]},
                           splits={"cam": "train", "seg": "val"})
  ax = fig.axes[0]
  assert _texts(ax.get_legend()) == ["cam (train)", "seg (val)",
                                     "absent from the split (not in the mIoU)"]
  assert "'train'" in ax.get_title() and "'val'" in ax.get_title()
  width = 0.4
  crosses = [c for c in ax.collections if c.get_paths() and
             c.get_offsets().shape[0] and np.allclose(c.get_offsets()[:, 1], 0.03)]
  dashes = [c for c in ax.collections if c.get_offsets().shape[0] and
            np.allclose(c.get_offsets()[:, 1], 0.0)]
  cross_x = sorted(x for c in crosses for x in c.get_offsets()[:, 0])
  dash_x = sorted(x for c in dashes for x in c.get_offsets()[:, 0])
  np.testing.assert_allclose(cross_x, [1.0, 3.0 + width])   # cam's 'cat', seg's 'cow'
  np.testing.assert_allclose(dash_x, [2.0, 2.0 + width])    # both measured 0 on 'dog'
  heights = [p.get_height() for p in ax.patches]
  assert heights == [0.5, 0.0, 0.0, 0.25, 0.6, 0.1, 0.0, 0.0]


def test_cam_overlays_name_the_class_and_carry_a_colour_bar(tmp_path):
  img = np.zeros((8, 8, 3), np.uint8)
  cams = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
  mask = np.zeros((8, 8), np.uint8)
  mask[:4] = 2
  fig = viz.cam_per_class([img, img], [cams, cams[:0]], [[1, 2], []], NAMES,
                          titles=["a", "b"], masks=[mask, mask])
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  assert "CAM cat" in titles and "CAM dog" in titles and "no foreground class" in titles
  colorbars = [ax for ax in fig.axes if ax.get_ylabel() == viz.CAM_SCALE_LABEL]
  assert len(colorbars) == 1 and colorbars[0].get_ylim() == (0.0, 1.0)
  assert _texts(fig.legends[0]) == ["background", "dog"]
  from wsss_jax.stages import figures  # pylint: disable=import-outside-toplevel
  path = tmp_path / "cam_overlays.png"
  figures.cam_overlays(str(path), [img], [cams], [[1, 2]], NAMES, ["a"])
  assert path.stat().st_size > 0
