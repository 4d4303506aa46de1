"""DSCNet-R (methods/dscnet.py, ops/group_contrast.py): groups, PGCL, SGCL, fusion, sharding."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from conftest import load_config_file
from tiny_model import TinyBackbone, make_batches, max_abs_diff, run_steps, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.analysis import groups
from wsss_jax.methods import base
from wsss_jax.methods import dscnet
from wsss_jax.ops import group_contrast as gc

pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(**overrides):
  cfg = tiny_config()
  cfg.method = "dscnet_r"
  cfg.dscnet_r = mlc.ConfigDict(dscnet.dscnet_config())
  for key, value in overrides.items():
    node = cfg.dscnet_r
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


class IdentityBackbone(nn.Module):
  """Features = the input itself (times a unit scale, so `backbone` has a parameter)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return x * self.param("scale", nn.initializers.ones, ())


def _three_cluster_image():
  """4x4 cells, 4 channels: rows 0-1 ~ a, row 2 ~ b, row 3 ~ c; scaled and shifted copies
  (Pearson-invariant) in some cells; the last cell is zero padding."""
  a, b, c = np.eye(4, dtype=np.float32)[:3] * 3 + 0.1
  feats = np.zeros((4, 4, 4), np.float32)
  feats[:2], feats[2], feats[3] = a, b, c
  feats[0, 0] = 5 * a + 7          # same Pearson direction as a
  feats[2, 1] = 0.5 * b - 2
  feats[3, 3] = 0                  # padding cell
  truth = np.array([0] * 8 + [1] * 4 + [2] * 3 + [-1])
  return feats, truth


def test_valid_cells_marks_zero_padding():
  img = np.ones((1, 8, 8, 3), np.float32)
  img[0, :, 5:] = 0        # columns 5..7 padding: cell (., 1) covers columns 4..7, 1/4 real
  img[0, 6:, :] = 0        # rows 6..7 padding: cell (1, .) covers rows 4..7, 1/2 real
  got = np.asarray(gc.valid_cells(jnp.asarray(img), (2, 2)))
  np.testing.assert_array_equal(got[0], [[True, False], [False, False]])


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_groups_and_labels_hand_made(init):
  feats, truth = _three_cluster_image()
  points, spherical = gc.kmeans_points(jnp.asarray(feats.reshape(16, 4)), "pearson")
  mask = jnp.asarray(truth >= 0)
  hits = 0
  for seed in range(5):
    res = gc.group_pixels(jax.random.key(seed), points, mask, jnp.asarray(3), k_max=5,
                          num_iters=10, spherical=spherical, init=init)
    assign = np.asarray(res.assign)
    assert assign[-1] == -1 and set(assign[:-1]) <= {0, 1, 2}
    # A partition equal to the truth up to a relabelling.
    if all(len(set(assign[truth == t])) == 1 for t in range(3)) and len(set(assign[:-1])) == 3:
      hits += 1
  # k-means++ always separates three orthogonal directions; Forgy seeds may repeat a
  # cluster (then k-means is stuck in a local optimum), but not for most seeds.
  assert hits == 5 if init == "kmeans++" else hits >= 2
  res = gc.group_pixels(jax.random.key(0), points, mask, jnp.asarray(3), k_max=5,
                        num_iters=10, spherical=True)
  assign = res.assign
  # Majority label per group: cluster 0 has one cell labelled 0, the rest 1.
  pix = np.array([1] * 8 + [2] * 4 + [0] * 3 + [255])
  pix[3] = 0
  labels = np.asarray(gc.group_labels(jnp.asarray(pix), assign, 5, 3))
  expect = {int(np.asarray(assign)[truth == t][0]): lab for t, lab in [(0, 1), (1, 2), (2, 0)]}
  for g, lab in expect.items():
    assert labels[g] == lab
  # K_i = 2 uses only the first two slots.
  res2 = gc.group_pixels(jax.random.key(0), points, mask, jnp.asarray(2), k_max=5,
                         num_iters=10, spherical=True)
  assert set(np.asarray(res2.assign[:-1])) == {0, 1}


def test_model_group_count_is_classes_plus_one():
  feats, _ = _three_cluster_image()
  images = jnp.asarray(np.stack([feats, feats]))
  cfg = _config(variant="full")
  method = dscnet.make_dscnet_method(cfg, 4, backbone=IdentityBackbone())
  v = method.init(jax.random.key(0), images)
  labels = jnp.asarray([[1, 1, 0], [0, 0, 0]], jnp.float32)  # K = 3 and K = 1
  out = method.model.apply({"params": v["params"]}, images, train=True, labels=labels)
  np.testing.assert_array_equal(np.asarray(out["group_valid"]).sum(-1), [3, 1])
  assert out["assign"].shape == (2, 16) and int(out["assign"][0, -1]) == -1
  assert out["group_emb"].shape == (2, 4, 4) and out["group_class_logits"].shape == (2, 4, 4)


def test_multi_positive_nce_hand_computed():
  s = math.sqrt(0.5)
  emb = jnp.asarray([[1, 0], [0, 1], [1, 0], [s, s], [-1, 0], [0, -1]], jnp.float32)
  lab = jnp.asarray([0, 1, 0, 1, 2, 1])
  valid = jnp.asarray([True, True, True, True, True, False])  # last key is invalid
  ids = jnp.arange(6)
  t = 0.5
  loss, has_pos = gc.multi_positive_nce(emb, lab, ids, emb, lab, valid, ids, t)
  e = lambda x: math.exp(x / t)
  # anchor 0 (label 0): positive 2 (cos 1); others 1 (0), 3 (s), 4 (-1).
  l0 = -math.log(e(1) / (e(1) + e(0) + e(s) + e(-1)))
  # anchor 1 (label 1): positive 3 (cos s) (5 is invalid); others 0 (0), 2 (0), 4 (0).
  l1 = -math.log(e(s) / (e(s) + 3 * e(0)))
  # anchor 3 (label 1): positive 1 (s); others 0 (s), 2 (s), 4 (-s).
  l3 = -math.log(e(s) / (3 * e(s) + e(-s)))
  np.testing.assert_allclose(np.asarray(loss)[[0, 1, 2, 3]], [l0, l1, l0, l3], rtol=1e-5)
  # anchor 4: the only label-2 item -> no positive; anchor 5 ([0, -1], an invalid key but
  # a valid anchor): positives 1 (cos -1) and 3 (-s); others 0, 2, 4 (cos 0).
  np.testing.assert_array_equal(np.asarray(has_pos), [1, 1, 1, 1, 0, 1])
  assert float(loss[4]) == 0.0
  l5 = -math.log((e(-1) + e(-s)) / (3 * e(0) + e(-1) + e(-s)))
  np.testing.assert_allclose(float(loss[5]), l5, rtol=1e-5)
  # Gradients stay finite with an anchor that has no positive.
  g = jax.grad(lambda x: jnp.sum(gc.multi_positive_nce(x, lab, ids, x, lab, valid, ids,
                                                       t)[0]))(emb)
  assert np.all(np.isfinite(np.asarray(g)))


def _two_region_case(variant="independent", sgcl_negatives="absent"):
  """Two identical 4x4 images: left half va, right half vb; class 1 present; hand params."""
  va, vb = np.array([4, 1, 0, 0], np.float32), np.array([0, 0, 1, 4], np.float32)
  img = np.zeros((4, 4, 4), np.float32)
  img[:, :2], img[:, 2:] = va, vb
  images = jnp.asarray(np.stack([img, img]))
  labels = jnp.asarray([[1, 0], [1, 0]], jnp.float32)
  cfg = _config(variant=variant, **{"reconstructed.pgcl_temperature": 0.5,
                                    "reconstructed.sgcl_temperature": 0.3,
                                    "reconstructed.sgcl_negatives": sgcl_negatives})
  method = dscnet.make_dscnet_method(cfg, 3, backbone=IdentityBackbone())
  params = method.init(jax.random.key(0), images)["params"]
  params = jax.tree.map(np.asarray, params)
  params["cam_head"]["classifier"]["kernel"] = np.eye(4, 2, dtype=np.float32)[None, None]
  return method, params, {"image": images, "labels": labels}, va, vb


def test_pgcl_and_sgcl_losses_hand_computed():
  method, params, batch, va, vb = _two_region_case()
  ctx = base.StepContext(model=method.model)
  value, aux = jax.jit(lambda p: method.loss(p, {}, {}, batch, jax.random.key(0),
                                             jnp.asarray(0), ctx))(params)
  m = aux.metrics
  ga, gb = va / np.linalg.norm(va), vb / np.linalg.norm(vb)
  # CAM of class 1 = feature channel 0: 4 on the left, 0 on the right -> Y = 1 | 0, so the
  # two groups are labelled 1 (left) and 0 (right) in both images.
  t = 0.5
  c = float(ga @ gb)
  pgcl = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(c / t)))
  np.testing.assert_allclose(float(m["loss_pgcl"]), pgcl, rtol=1e-5)
  # SGCL: split groups = the two clusters (one label each). A: left cells score
  # [t, 1] -> (0.4, 1) / 1.4, right cells [t, 0] -> (1, 0); class 2 is in no image.
  # S_1 = ga; S_0 ∝ (0.4/1.4) ga + gb; nodes of the batch: {0, 1}, both present in every
  # image, so 'absent' negatives are empty (loss 0); 'all_other' keeps them.
  np.testing.assert_allclose(float(m["loss_sgcl"]), 0.0, atol=1e-7)
  w = 0.4 / 1.4
  s0 = (w * ga + gb) / (w + 1)
  s0 /= np.linalg.norm(s0)
  nodes = np.stack([s0, ga])
  ts = 0.3

  def ce(g, y):
    z = nodes @ g / ts
    return float(np.log(np.exp(z).sum()) - z[y])

  method2, _, _, _, _ = _two_region_case(sgcl_negatives="all_other")
  ctx2 = base.StepContext(model=method2.model)
  _, aux2 = jax.jit(lambda p: method2.loss(p, {}, {}, batch, jax.random.key(0),
                                           jnp.asarray(0), ctx2))(params)
  np.testing.assert_allclose(float(aux2.metrics["loss_sgcl"]), (ce(ga, 1) + ce(gb, 0)) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["groups_per_image"]), 2.0)
  expect = float(m["loss_cls"]) + 0.6 * pgcl + 0.4 * float(m["loss_sgcl"])
  np.testing.assert_allclose(float(value), expect, rtol=1e-5)


def test_fusion_hand_computed():
  feats = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
  mask = jnp.asarray([True, True, False])
  q = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  a_sem = np.asarray(gc.semantic_affinity(q, mask))
  np.testing.assert_allclose(a_sem, [[1, 0, 0], [0, 1, 0], [0, 0, 0]], atol=1e-6)
  pts = gc.pearson_normalize(jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0]]))
  a_pix = np.asarray(gc.pixel_affinity(pts, mask, 0.5))
  p = np.asarray(pts) @ np.asarray(pts).T / 0.5
  row0 = np.exp(p[0, :2]) / np.exp(p[0, :2]).sum()
  np.testing.assert_allclose(a_pix[0], [row0[0], row0[1], 0.0], rtol=1e-5)
  np.testing.assert_allclose(a_pix[2], 0.0)
  fused = np.asarray(gc.fuse_features(feats, jnp.asarray(a_pix), jnp.asarray(a_sem), mask))
  a = (a_pix + a_sem)[:2]
  a = a / a.sum(-1, keepdims=True)
  np.testing.assert_allclose(fused[:2], a @ np.asarray(feats), rtol=1e-5)
  np.testing.assert_allclose(fused[2], 0.0)
  prod = np.asarray(gc.fuse_features(feats, jnp.asarray(a_pix), jnp.asarray(a_sem), mask,
                                     "product"))
  np.testing.assert_allclose(prod[:2], np.asarray(feats)[:2], rtol=1e-5)  # diagonal A


@pytest.mark.parametrize("variant,cams_output", [("full", "auto"), ("full", "plain"),
                                                 ("pgcl_only", "auto")])
def test_refined_cam_shapes_and_outputs(variant, cams_output):
  cfg = _config(variant=variant, **{"reconstructed.cams_output": cams_output})
  method = dscnet.make_dscnet_method(cfg, 5, backbone=TinyBackbone(8))
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  images[1, :, 8:] = 0  # right half padding
  v = method.init(jax.random.key(0), jnp.asarray(images))
  out = method.model.apply(v, jnp.asarray(images), train=False)
  assert out["logits"].shape == (2, 4) and out["cams"].shape == (2, 8, 8, 4)
  assert out["plain_cams"].shape == (2, 8, 8, 4)
  np.testing.assert_array_equal(np.asarray(out["valid"][1, :, 4:]), False)
  if variant == "full":
    assert v["params"]["refined_head"]["classifier"]["kernel"].shape == (1, 1, 16, 4)
    assert out["refined_cams"].shape == (2, 8, 8, 4)
    assert np.all(np.asarray(out["assign"][1].reshape(8, 8)[:, 4:]) == -1)
    chosen = out["refined_cams"] if cams_output == "auto" else out["plain_cams"]
    np.testing.assert_array_equal(np.asarray(out["cams"]), np.asarray(chosen))
    assert not np.allclose(np.asarray(out["refined_cams"]), np.asarray(out["plain_cams"]))
  else:
    assert "refined_head" not in v["params"] and "bg_node" not in v["params"]
    assert "assign" not in out  # no clustering at inference without fusion
    np.testing.assert_array_equal(np.asarray(out["cams"]), np.asarray(out["plain_cams"]))


@pytest.mark.parametrize("overrides,impls", [
    ({}, ["shard_map", "jit"]),
    ({"reconstructed.kmeans_init": "random"}, ["shard_map"]),
    ({"pgcl_mode": "pixel", "reconstructed.kmeans_init": "random"}, ["shard_map"]),
    ({"reconstructed.sgcl_nodes_ema": 0.9, "reconstructed.sgcl_negatives": "all_other"},
     ["shard_map"]),
])
def test_sharded_step_matches_single_device(overrides, impls):
  # A low background score gives foreground groups, so PGCL has negatives (non-zero).
  overrides = {"reconstructed.pseudo_bg_threshold": 0.05, **overrides}
  batches = make_batches(2)
  method = dscnet.make_dscnet_method(_config(**overrides), 5, backbone=TinyBackbone(8))
  ref, ref_hist = run_steps(method, _config(**overrides), 1, "jit", batches)
  assert all(h["loss_pgcl"] > 1e-3 and h["loss_sgcl"] > 1e-3 for h in ref_hist)
  for impl in impls:
    got, hist = run_steps(method, _config(**overrides), 8, impl, batches)
    assert max_abs_diff(got.params, ref.params) < 2e-5, impl
    for key in ("loss", "loss_pgcl", "loss_sgcl", "loss_refined_cls", "groups_per_image",
                "sgcl_grad_ratio", "sgcl_grad_scale", "sgcl_groups_per_image"):
      np.testing.assert_allclose(hist[-1][key], ref_hist[-1][key], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{impl} {key}")


def test_group_contrast_is_cheaper_than_pixel_contrast():
  """The efficiency claim as XLA-counted FLOPs of the loss (not a timing)."""
  batch = make_batches(1, batch=8, size=32)[0]
  flops = {}
  for mode in ("group", "pixel"):
    cfg = _config(variant="pgcl_only", pgcl_mode=mode)
    method = dscnet.make_dscnet_method(cfg, 5, backbone=TinyBackbone(8))
    v = method.init(jax.random.key(0), jnp.asarray(batch["image"][:1]))
    ctx = base.StepContext(model=method.model)
    fn = jax.jit(jax.grad(lambda p: method.loss(p, v["batch_stats"], {}, batch,
                                                jax.random.key(0), jnp.asarray(0), ctx)[0]))
    flops[mode] = fn.lower(v["params"]).compile().cost_analysis()["flops"]
  # 8 images x 256 cells: the pixel variant's 2048 x 2048 similarity matrix dominates.
  assert flops["pixel"] > 3 * flops["group"]


@pytest.mark.parametrize("path,base_path", [("configs/synthetic/dscnet.py",
                                             "configs/synthetic/cam.py"),
                                            ("configs/voc/dscnet.py", "configs/voc/cam.py")])
def test_configs_mirror_cam_and_validate(path, base_path):
  for arg in ("runlocal", ""):
    c, b = load_config_file(path, arg), load_config_file(base_path, arg)
    assert c.method == "dscnet_r" and c.dscnet_r.variant == "full"
    for key in ("model", "data", "train", "optim", "cams", "sweep", "pseudo", "seg"):
      assert c[key].to_dict() == b[key].to_dict(), key
    if arg == "runlocal" and "voc" in path:  # Y from the warm-started baseline's CAMs
      # (issue 31 §4); synthetic :runlocal is a plain smoke run
      assert c.train.init_from == "baseline" and "baseline" in c.stages.split(",")
  c = load_config_file(path, "runlocal,variant=sgcl_only,pgcl_mode=pixel,pixel_samples=64")
  assert (c.dscnet_r.variant, c.dscnet_r.pgcl_mode, c.dscnet_r.pixel_num_samples) == (
      "sgcl_only", "pixel", 64)
  with pytest.raises(ValueError, match="variant"):
    load_config_file(path, "variant=m5")
  bad = _config(variant="pgcl_only", **{"reconstructed.cams_output": "refined"})
  with pytest.raises(ValueError, match="cams_output"):
    dscnet.make_dscnet_method(bad, 5, backbone=TinyBackbone(8))
  with pytest.raises(ValueError, match="pgcl_temperature"):
    dscnet.make_dscnet_method(_config(**{"reconstructed.pgcl_temperature": 0.0}), 5,
                              backbone=TinyBackbone(8))


def _loss_and_grads(cfg):
  """((loss, aux), grads) of one DSCNet-R loss call on a tiny batch at step 3."""
  method = dscnet.make_dscnet_method(cfg, 5, backbone=TinyBackbone(8))
  batch = make_batches(1, batch=4)[0]
  v = method.init(jax.random.key(0), jnp.asarray(batch["image"][:1]))
  ctx = base.StepContext(model=method.model)
  return jax.jit(jax.value_and_grad(
      lambda p: method.loss(p, v["batch_stats"], {}, batch, jax.random.key(0),
                            jnp.asarray(3), ctx), has_aux=True))(v["params"])


def test_alternative_reconstruction_choices_train():
  """The non-default choices (refined labels, raw k-means, product fusion) give a finite
  loss and gradient for every parameter group."""
  cfg = _config(**{"reconstructed.label_source": "refined", "reconstructed.kmeans_space": "raw",
                   "reconstructed.fusion_combine": "product",
                   "reconstructed.pseudo_bg_threshold": 0.05})
  (value, aux), grads = _loss_and_grads(cfg)
  assert np.isfinite(float(value)) and float(aux.metrics["loss_pgcl"]) > 0
  for name in ("backbone", "cam_head", "refined_head", "bg_node"):
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[name])])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


def test_sgcl_reaches_only_the_features():
  """SGCL's class nodes are built from the groups (stop-gradient), not the classifier: with
  only SGCL in the loss the CAM head gets no gradient, the backbone does, and there is no
  learned background node outside fusion."""
  cfg = _config(**{"variant": "sgcl_only", "reconstructed.baseline_cls_weight": 0.0,
                   "reconstructed.sgcl_grad_cap": 0.0,
                   "reconstructed.sgcl_negatives": "all_other"})
  (value, aux), grads = _loss_and_grads(cfg)
  assert float(aux.metrics["loss_sgcl"]) > 0 and np.isfinite(float(value))
  norm = lambda t: max(float(np.abs(x).max()) for x in jax.tree.leaves(t))
  assert norm(grads["cam_head"]) == 0 and norm(grads["backbone"]) > 0
  assert "bg_node" not in grads


# --- SGCL rebuilt (issue 31) -------------------------------------------------------------

def _sgcl_case():
  """Two images, 6 cells, D = 3, C = 3 (background, a, b); image 0 has class a, image 1
  classes a and b. Cluster 0 of image 0 mixes background and class-a cells (the split
  separates them)."""
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(2, 6, 3)).astype(np.float32)
  assign = np.array([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 2, 2]], np.int32)
  y = np.array([[0, 1, 1, 0, 0, 255], [0, 1, 1, 2, 2, 0]], np.int32)
  ncam = np.zeros((2, 6, 2), np.float32)                # max-normalised CAMs of a, b
  ncam[0, :, 0] = [0.1, 0.9, 1.0, 0.2, 0.0, 0.0]
  ncam[1, :, 0] = [0.0, 1.0, 0.6, 0.3, 0.1, 0.2]
  ncam[1, :, 1] = [0.2, 0.1, 0.0, 1.0, 0.8, 0.1]
  labels = np.array([[1, 0], [1, 1]], np.float32)
  return feats, assign, y, ncam, labels


def _sgcl_numpy(feats, assign, y, ncam, labels, t, tau, negatives):
  """Independent NumPy reference of the rebuilt L_SGCL (module docstring of
  methods/dscnet.py): python loops over the split groups."""
  b, n, _ = feats.shape
  c = ncam.shape[-1] + 1
  groups = []  # (image, label, embedding, A row)
  for i in range(b):
    for key in sorted({(int(assign[i, j]), int(y[i, j])) for j in range(n)
                       if assign[i, j] >= 0 and y[i, j] < c}):
      cells = [j for j in range(n) if (assign[i, j], y[i, j]) == key]
      g = feats[i, cells].mean(0)
      scores = np.concatenate([np.full((len(cells), 1), t), ncam[i, cells]], -1).mean(0)
      groups.append((i, key[1], g / np.linalg.norm(g), scores / scores.sum()))
  a = np.stack([x[3] for x in groups])
  emb = np.stack([x[2] for x in groups])
  nodes = []
  for k in range(c):
    s = (a[:, k:k + 1] * emb).sum(0) / a[:, k].sum() if a[:, k].sum() > 0 else np.zeros(3)
    nodes.append(s / max(np.linalg.norm(s), 1e-12))
  nodes = np.stack(nodes)
  node_valid = a.sum(0) > 0
  per_image = [[] for _ in range(b)]
  for i, lab, g, _ in groups:
    present = np.concatenate([[True], labels[i] > 0])
    negs = [k for k in range(c) if k != lab and node_valid[k]
            and (negatives == "all_other" or not present[k])]
    if not negs:
      continue
    z = nodes @ g / tau
    per_image[i].append(np.log(np.exp(z[[lab] + negs]).sum()) - z[lab])
  vals = [np.mean(v) for v in per_image if v]
  return float(np.mean(vals)) if vals else 0.0, nodes, a


def _sgcl_jax(feats, assign, y, ncam, labels, t, tau, negatives):
  b, n, _ = feats.shape
  c = ncam.shape[-1] + 1
  ids = jax.vmap(lambda a, p: gc.split_groups(a, p, c))(jnp.asarray(assign), jnp.asarray(y))
  slots = c * c
  slot_labels = jnp.broadcast_to(jnp.arange(slots) % c, (b, slots))
  scores = jnp.concatenate([jnp.full((b, n, 1), t), jnp.asarray(ncam)], -1)
  present = jnp.concatenate([jnp.ones((b, 1), bool), jnp.asarray(labels) > 0], -1)
  ctx = base.StepContext(model=None)
  return lambda x: dscnet.sgcl_from_features(x, ids, slot_labels, scores, present,
                                             num_slots=slots, temperature=tau,
                                             negatives=negatives, ctx=ctx)[0]


def test_split_groups_keep_object_cells_out_of_background_groups():
  assign = jnp.asarray([0, 0, 0, 1, 1, -1, 2])
  y = jnp.asarray([0, 2, 2, 0, 1, 0, 255])
  ids = np.asarray(gc.split_groups(assign, y, 3))
  np.testing.assert_array_equal(ids, [0, 2, 2, 3, 4, -1, -1])
  np.testing.assert_array_equal(ids[ids >= 0] % 3, np.asarray(y)[ids >= 0])


def test_group_label_counts_hand_computed():
  # Cluster 0: labels 0,0,2 -> majority background; its ground-truth object cells (ids 1,2)
  # are in a background group under 'majority', and under 'split' only the one labelled 0.
  # Cluster 1: labels 1,1,0,1 -> majority 1. Cell 6 has no group, cell 7 label 255 (none),
  # cell 8 ground truth 255 (ignored).
  gt = np.asarray([0, 1, 2, 1, 1, 2, 1, 2, 255])
  labels = np.asarray([0, 0, 2, 1, 1, 0, 1, 255, 1])
  assign = np.asarray([0, 0, 0, 1, 1, 1, -1, 1, 1])
  # Background cells: cell 0 (cluster 0, majority 0, label 0) only.
  counts = groups.group_label_counts(gt, labels, assign, 3)
  assert counts == {"objects": 5, "background": 1, "majority": 2, "split": 2,
                    "bg_majority": 0, "bg_split": 0}
  # Cell 0 relabelled 2: cluster 0 turns majority 2 (votes 0:1, 2:2), so neither of its
  # object cells is in a background group any more and its background cell is in an object
  # group under both groupings.
  relabelled = labels.copy()
  relabelled[0] = 2
  assert groups.group_label_counts(gt, relabelled, assign, 3) == {
      "objects": 5, "background": 1, "majority": 0, "split": 2, "bg_majority": 1,
      "bg_split": 1}
  # Ground truth as labels: the split grouping never mislabels a cell.
  truth = groups.group_label_counts(gt, gt, assign, 3)
  assert truth["split"] == 0 and truth["bg_split"] == 0
  # The majority label matches the loss's `gc.group_labels` (ties: lowest id).
  votes = np.asarray(gc.group_labels(jnp.asarray(labels), jnp.asarray(assign), 2, 3))
  np.testing.assert_array_equal(votes, [0, 1])


@pytest.mark.parametrize("negatives", ["absent", "all_other"])
def test_sgcl_matches_numpy_reference(negatives):
  case = _sgcl_case()
  want, _, _ = _sgcl_numpy(*case, t=0.4, tau=0.5, negatives=negatives)
  got = float(jax.jit(_sgcl_jax(*case, t=0.4, tau=0.5, negatives=negatives))(
      jnp.asarray(case[0])))
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_class_nodes_are_the_weighted_mean_of_groups():
  feats, assign, y, ncam, labels = _sgcl_case()
  _, want_nodes, want_a = _sgcl_numpy(feats, assign, y, ncam, labels, 0.4, 0.5, "absent")
  c, slots = 3, 9
  ids = jax.vmap(lambda a, p: gc.split_groups(a, p, c))(jnp.asarray(assign), jnp.asarray(y))
  scores = jnp.concatenate([jnp.full((2, 6, 1), 0.4), jnp.asarray(ncam)], -1)
  a = jax.vmap(lambda s, i: gc.group_class_weights(s, i, slots))(scores, ids)
  means, counts = jax.vmap(lambda x, i: gc.segment_means(x, i, slots))(jnp.asarray(feats), ids)
  nz = np.asarray(counts).reshape(-1) > 0
  np.testing.assert_allclose(np.asarray(a).reshape(-1, c)[nz], want_a, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(a).reshape(-1, c)[~nz], 0.0)
  nodes, valid = gc.class_nodes_from_sums(*gc.class_node_sums(
      gc.l2_normalize(means), a))
  np.testing.assert_array_equal(np.asarray(valid), [True, True, True])
  np.testing.assert_allclose(np.asarray(nodes), want_nodes, rtol=1e-5, atol=1e-6)
  # Hand-made: two groups g = e0 (A = .25, 0, .75) and e1 (A = .5, .5, 0):
  # S_0 ∝ (.25 e0 + .5 e1) / .75, S_1 = e1, S_2 = e0.
  g = jnp.asarray([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
  w = jnp.asarray([[[0.25, 0.0, 0.75]], [[0.5, 0.5, 0.0]]])
  n2, v2 = gc.class_nodes_from_sums(*gc.class_node_sums(g, w))
  s0 = np.array([0.25, 0.5, 0]) / 0.75
  np.testing.assert_allclose(np.asarray(n2[0]), s0 / np.linalg.norm(s0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(n2[1]), [0, 1, 0], atol=1e-7)
  np.testing.assert_allclose(np.asarray(n2[2]), [1, 0, 0], atol=1e-7)
  assert bool(jnp.all(v2))


def test_negatives_exclude_the_images_present_classes():
  labels = jnp.asarray([[0, 1, 2, 3], [3, 0, 1, 1]])              # groups' labels [B, K]
  present = jnp.asarray([[True, True, False, True, False],         # C = 5
                         [True, False, True, True, False]])
  node_valid = jnp.asarray([True, True, True, True, False])        # class 4 not in the batch
  neg = np.asarray(gc.sgcl_negative_mask(labels, present, node_valid, "absent"))
  # image 0: present {0, 1, 3}; negatives = {2} for every group except the label-2 one.
  np.testing.assert_array_equal(neg[0], [[0, 0, 1, 0, 0]] * 2 + [[0] * 5] + [[0, 0, 1, 0, 0]])
  # image 1: present {0, 2, 3}: negatives = {1} except for the label-1 groups.
  np.testing.assert_array_equal(neg[1], [[0, 1, 0, 0, 0]] * 2 + [[0] * 5] * 2)
  old = np.asarray(gc.sgcl_negative_mask(labels, present, node_valid, "all_other"))
  np.testing.assert_array_equal(old[0, 0], [0, 1, 1, 1, 0])


def test_sgcl_class_nodes_are_stop_gradient():
  """dL/dF equals the gradient with the class nodes frozen at their value: no gradient
  flows through the nodes (they are built from the same features)."""
  case = _sgcl_case()
  feats, assign, y, ncam, labels = case
  fn = _sgcl_jax(*case, t=0.4, tau=0.5, negatives="all_other")
  got = np.asarray(jax.grad(fn)(jnp.asarray(feats)))
  _, nodes, _ = _sgcl_numpy(*case, t=0.4, tau=0.5, negatives="all_other")
  c, slots = 3, 9
  ids = jax.vmap(lambda a, p: gc.split_groups(a, p, c))(jnp.asarray(assign), jnp.asarray(y))
  present = jnp.concatenate([jnp.ones((2, 1), bool), jnp.asarray(labels) > 0], -1)

  def frozen(x):  # nodes are constants here
    means, counts = jax.vmap(lambda v, i: gc.segment_means(v, i, slots))(x, ids)
    lab = jnp.broadcast_to(jnp.arange(slots) % c, (2, slots))
    neg = gc.sgcl_negative_mask(lab, present, jnp.ones(c, bool), "all_other")
    neg = neg & (counts > 0)[..., None]
    l, has = gc.sgcl_loss(gc.l2_normalize(means).reshape(2 * slots, -1), lab.reshape(-1),
                          jnp.asarray(nodes), neg.reshape(2 * slots, -1), 0.5)
    w = (has.reshape(2, slots) & (counts > 0)).astype(jnp.float32)
    return jnp.mean(jnp.sum(l.reshape(2, slots) * w, -1) / jnp.sum(w, -1))

  want = np.asarray(jax.grad(frozen)(jnp.asarray(feats)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  # And the nodes path is not trivially zero: without stop-gradient it would differ.
  assert np.abs(want).max() > 1e-3
  # Gradient w.r.t. the class nodes themselves through `sgcl_from_features`: the nodes are
  # computed inside, so feed a perturbation of the scores (which only move A, hence only
  # the nodes): zero gradient.
  ids_b = ids
  slot_labels = jnp.broadcast_to(jnp.arange(slots) % c, (2, slots))
  ctx = base.StepContext(model=None)
  scores = jnp.concatenate([jnp.full((2, 6, 1), 0.4), jnp.asarray(ncam)], -1)
  g_scores = jax.grad(lambda sc: dscnet.sgcl_from_features(
      jnp.asarray(feats), ids_b, slot_labels, sc, present, num_slots=slots, temperature=0.5,
      negatives="all_other", ctx=ctx)[0])(scores)
  np.testing.assert_array_equal(np.asarray(g_scores), 0.0)


def _identity_case(**overrides):
  """sgcl_only on raw 3-channel 'features' (IdentityBackbone): F = the image."""
  cfg = _config(variant="sgcl_only", **overrides)
  method = dscnet.make_dscnet_method(cfg, 4, backbone=IdentityBackbone())
  batch = make_batches(1, batch=4, size=8, num_fg=3, seed=5)[0]
  batch["labels"][0] = [1, 0, 0]  # image 0 lacks classes 2 and 3: it has negatives
  params = method.init(jax.random.key(0), jnp.asarray(batch["image"][:1]))["params"]
  ctx = base.StepContext(model=method.model)
  fn = lambda p, images: method.loss(p, {}, {}, dict(batch, image=images), jax.random.key(0),
                                     jnp.asarray(0), ctx)
  return fn, params, jnp.asarray(batch["image"])


def test_sgcl_grad_ratio_metric_is_the_feature_gradient_ratio():
  """`sgcl_grad_ratio` = ||λ2 dL_SGCL/dF|| / ||w_b dL_cls/dF||, checked against gradients
  of the whole loss w.r.t. F (the images, for an identity backbone) with one term off."""
  fn, params, images = _identity_case(**{"reconstructed.sgcl_negatives": "all_other"})
  _, aux = jax.jit(fn)(params, images)
  base_kw = {"reconstructed.sgcl_negatives": "all_other", "reconstructed.sgcl_grad_cap": 0.0}
  f_cls, _, _ = _identity_case(**base_kw, lambda_sgcl=0.0)
  f_sgcl, _, _ = _identity_case(**base_kw, **{"reconstructed.baseline_cls_weight": 0.0})
  g_cls = jax.grad(lambda x: f_cls(params, x)[0])(images)
  g_sgcl = jax.grad(lambda x: f_sgcl(params, x)[0])(images)
  want = float(jnp.linalg.norm(g_sgcl) / jnp.linalg.norm(g_cls))
  assert float(jnp.linalg.norm(g_sgcl)) > 0
  np.testing.assert_allclose(float(aux.metrics["sgcl_grad_ratio"]), want, rtol=1e-4)


def test_sgcl_grad_cap_scales_only_sgcls_gradient():
  """With the cap, the parameter gradient is L_cls's plus `scale` x SGCL's, scale =
  min(1, cap / ratio); the loss value is unchanged."""
  kw = {"variant": "sgcl_only", "reconstructed.sgcl_negatives": "all_other",
        "reconstructed.pseudo_bg_threshold": 0.05}
  grads = {}
  for name, extra in (("cls", {"lambda_sgcl": 0.0}), ("free", {"reconstructed.sgcl_grad_cap": 0.0}),
                      ("capped", {"reconstructed.sgcl_grad_cap": 0.05})):
    (value, aux), g = _loss_and_grads(_config(**kw, **extra))
    grads[name] = (float(value), aux.metrics, g)
  scale = float(grads["capped"][1]["sgcl_grad_scale"])
  ratio = float(grads["capped"][1]["sgcl_grad_ratio"])
  np.testing.assert_allclose(scale, min(1.0, 0.05 / ratio), rtol=1e-5)
  assert scale < 1.0 and float(grads["free"][1]["sgcl_grad_scale"]) == 1.0
  np.testing.assert_allclose(grads["capped"][0], grads["free"][0], rtol=1e-6)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  cls, free, capped = (flat(grads[k][2]) for k in ("cls", "free", "capped"))
  assert np.abs(free - cls).max() > 1e-3  # SGCL moves the backbone
  np.testing.assert_allclose(capped - cls, scale * (free - cls), rtol=1e-3,
                             atol=1e-5 * np.abs(free - cls).max())


@pytest.mark.parametrize("variant", dscnet.VARIANTS)
def test_variants_train_with_the_rebuilt_sgcl(variant):
  cfg = _config(variant=variant, **{"reconstructed.pseudo_bg_threshold": 0.05})
  (value, aux), grads = _loss_and_grads(cfg)
  m = aux.metrics
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads))
  has_sgcl = variant != "pgcl_only"
  assert ("loss_sgcl" in m) == has_sgcl and ("sgcl_grad_ratio" in m) == has_sgcl
  assert ("loss_pgcl" in m) == (variant != "sgcl_only")
  if has_sgcl:
    assert float(m["sgcl_groups_per_image"]) >= float(m["groups_per_image"])


def test_sgcl_nodes_ema_mixes_the_sums():
  """EMA nodes: sums = m x previous + (1 - m) x this batch's; previous sums of a class that
  is absent from the batch make its node exist (a negative for image 0's groups)."""
  feats, assign, y, ncam, labels = _sgcl_case()
  labels = labels.copy()
  ncam = ncam.copy()
  labels[1, 1] = 0          # class b absent from the batch
  ncam[:, :, 1] = 0
  y = np.where(y == 2, 0, y)
  c, slots, m = 3, 9, 0.9
  ids = jax.vmap(lambda a, p: gc.split_groups(a, p, c))(jnp.asarray(assign), jnp.asarray(y))
  slot_labels = jnp.broadcast_to(jnp.arange(slots) % c, (2, slots))
  scores = jnp.concatenate([jnp.full((2, 6, 1), 0.4), jnp.asarray(ncam)], -1)
  present = jnp.concatenate([jnp.ones((2, 1), bool), jnp.asarray(labels) > 0], -1)
  ctx = base.StepContext(model=None)
  run = lambda sums, mom: dscnet.sgcl_from_features(
      jnp.asarray(feats), ids, slot_labels, scores, present, num_slots=slots, temperature=0.5,
      negatives="absent", ctx=ctx, node_sums=sums, momentum=mom)
  value0, (_, (num0, den0)) = run(None, 0.0)
  assert float(den0[2]) == 0 and float(value0) == 0.0    # no absent class node: no loss
  prev = (jnp.zeros((c, 3)).at[2].set(jnp.asarray([0.0, 0.0, 2.0])),
          jnp.asarray([1.0, 1.0, 2.0]))
  value, (_, (num, den)) = run(prev, m)
  np.testing.assert_allclose(np.asarray(num), m * np.asarray(prev[0]) + (1 - m) * np.asarray(num0),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(den), m * np.asarray(prev[1]) + (1 - m) * np.asarray(den0),
                             rtol=1e-6)
  assert float(value) > 0    # node 2 (from the previous batches) is a negative now


def test_sgcl_majority_groups_are_the_clusters():
  """`sgcl_groups='majority'` (the pre-issue-31 grouping) contrasts the k-means clusters
  themselves; 'split' has at least as many groups."""
  got = {}
  for groups in ("majority", "split"):
    cfg = _config(variant="sgcl_only", **{"reconstructed.sgcl_groups": groups,
                                          "reconstructed.pseudo_bg_threshold": 0.05,
                                          "reconstructed.sgcl_negatives": "all_other"})
    (value, aux), _ = _loss_and_grads(cfg)
    got[groups] = aux.metrics
    assert np.isfinite(float(value)) and float(aux.metrics["loss_sgcl"]) > 0
  np.testing.assert_allclose(float(got["majority"]["sgcl_groups_per_image"]),
                             float(got["majority"]["groups_per_image"]))
  assert float(got["split"]["sgcl_groups_per_image"]) > float(got["split"]["groups_per_image"])


def test_pgcl_split_groups_numpy_reference():
  """`pgcl_groups='split'`: PGCL's nodes are the cluster ∩ label groups, each the
  L2-normalised mean of its cells, labelled slot % C (NumPy reference)."""
  rng = np.random.default_rng(0)
  c, n, d = 3, 6, 4
  feats = rng.normal(size=(1, 2, 3, d)).astype(np.float32)
  assign = np.asarray([[0, 0, 1, 1, 2, -1]], np.int32)
  y = np.asarray([[0, 2, 2, 2, 1, 0]], np.int32)
  emb, lab, ok = dscnet._split_group_embeddings(jnp.asarray(feats), jnp.asarray(assign),
                                                jnp.asarray(y), c)
  flat = feats.reshape(n, d)
  members = {0 * c + 0: [0], 0 * c + 2: [1], 1 * c + 2: [2, 3], 2 * c + 1: [4]}
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(ok)[0]), sorted(members))
  for slot, cells in members.items():
    mean = flat[cells].mean(0)
    np.testing.assert_allclose(np.asarray(emb)[0, slot], mean / np.linalg.norm(mean),
                               rtol=1e-5, atol=1e-6)
    assert int(lab[0, slot]) == slot % c


def test_pgcl_split_groups_train():
  """PGCL on split groups gives a finite loss and a backbone gradient; with a background
  cluster mixed with object cells it has at least as many groups as the majority grouping
  (each cluster splits into one group or more)."""
  got = {}
  for groups_kind in ("majority", "split"):
    cfg = _config(variant="pgcl_only", **{"reconstructed.pgcl_groups": groups_kind,
                                          "reconstructed.pseudo_bg_threshold": 0.05})
    (value, aux), grads = _loss_and_grads(cfg)
    got[groups_kind] = aux.metrics
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads["backbone"])])
    assert np.isfinite(float(value)) and np.abs(g).max() > 0
  n_split = float(got["split"]["pgcl_anchor_fraction"][1])
  n_major = float(got["majority"]["pgcl_anchor_fraction"][1])
  assert n_split >= n_major
  with pytest.raises(ValueError, match="pgcl_groups"):
    dscnet.make_dscnet_method(_config(**{"reconstructed.pgcl_groups": "none"}), 5,
                              backbone=TinyBackbone(8))
