"""SPML: segment tables, vMF relations, memory rollover, step sharding, weak labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_model import fast_compile  # noqa: F401  (module fixture)
from tiny_model import TinyTwoScaleBackbone, max_abs_diff, run_steps, tiny_config
from wsss_jax.methods import spml
from wsss_jax.ops import segments as seg_ops
from wsss_jax.ops import vmf_loss

pytestmark = pytest.mark.usefixtures("fast_compile")
NUM_CLASSES = 4  # background + 3


# ---------------------------------------------------------------------------------------
# Segment ids on a hand-made map.
# ---------------------------------------------------------------------------------------
def test_segment_table_hand_made():
  # 2x4 image: clusters, labels (3 = unlabeled), superpixels; last pixel masked out.
  cluster = np.array([0, 0, 1, 1, 0, 0, 1, 1])
  label = np.array([1, 1, 1, 3, 2, 1, 3, 0])
  sp = np.array([0, 1, 1, 1, 0, 1, 1, 1])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
  t = seg_ops.segment_table(jnp.asarray(cluster), jnp.asarray(label), jnp.asarray(sp),
                            jnp.asarray(mask), max_segments=8, num_labels=4,
                            num_superpixels=2)
  # Distinct (cluster, label, sp) among masked pixels, sorted: (0,1,0) (0,1,1) (0,2,0)
  # (1,1,1) (1,3,1) -> ids 0..4.
  np.testing.assert_array_equal(t.ids, [0, 1, 3, 4, 2, 1, 4, -1])
  np.testing.assert_array_equal(t.valid, [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(t.cluster[:5], [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(t.label[:5], [1, 1, 2, 1, 3])
  np.testing.assert_array_equal(t.superpixel[:5], [0, 1, 0, 1, 1])
  np.testing.assert_array_equal(t.count[:5], [1, 2, 1, 1, 2])
  assert int(t.overflow) == 0
  # Too small a table: the pixels of the segments past S get -1 and are counted.
  t3 = seg_ops.segment_table(jnp.asarray(cluster), jnp.asarray(label), jnp.asarray(sp),
                             jnp.asarray(mask), max_segments=3, num_labels=4,
                             num_superpixels=2)
  np.testing.assert_array_equal(t3.ids, [0, 1, -1, -1, 2, 1, -1, -1])
  assert int(t3.overflow) == 3 and bool(t3.valid.all())


def test_segment_means_and_mode():
  f = jnp.asarray([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
  ids = jnp.asarray([0, 1, 1, -1])
  np.testing.assert_allclose(seg_ops.segment_means(f, ids, 3),
                             [[0.6, 0.8], [1 / np.sqrt(5), 2 / np.sqrt(5)], [0, 0]], atol=1e-6)
  np.testing.assert_allclose(seg_ops.segment_means(f, ids, 3, normalize=False),
                             [[3, 4], [0.5, 1.0], [0, 0]], atol=1e-6)
  mode, votes = seg_ops.segment_mode(jnp.asarray([2, 1, 1, 0]), ids, 2, 3)
  np.testing.assert_array_equal(mode, [2, 1])
  np.testing.assert_array_equal(votes, [1, 2])


# ---------------------------------------------------------------------------------------
# vMF loss: hand-computed cases for every relation.
# ---------------------------------------------------------------------------------------
def _nca(logits, pos, neg):
  """-log(sum_pos e / sum_{pos u neg} e) computed directly."""
  e = np.exp(np.asarray(logits, np.float64))
  return -np.log(e[pos].sum() / (e[pos].sum() + e[neg].sum()))


def _unit(deg):
  r = np.deg2rad(deg)
  return np.stack([np.cos(r), np.sin(r)], -1).astype(np.float32)


def _setup():
  # Two images. Prototypes 0-2 from image 0, 3-4 from image 1, 5 from memory (image -1),
  # 6 invalid. Labels: C = 3 classes, 3 = unlabeled.
  protos = _unit([0, 30, 80, 150, 200, 250, 10])
  p = vmf_loss.Prototypes(image=jnp.asarray([0, 0, 0, 1, 1, -1, 0]),
                          label=jnp.asarray([1, 1, 3, 2, 1, 2, 1]),
                          superpixel=jnp.asarray([0, 1, 1, 0, 1, 0, 0]),
                          tags=jnp.asarray([[1, 0]] * 3 + [[0, 1]] * 2 + [[1, 1]] + [[1, 0]],
                                           jnp.float32),
                          valid=jnp.asarray([1, 1, 1, 1, 1, 1, 0], bool))
  # Anchor 0: image 0, label 1, superpixel 1, own segment 1.
  # Anchor 1: image 1, label 2, superpixel 0, own segment 3 (the only prototype of label 2
  #           in the batch besides memory 5).
  # Anchor 2: image 0, unlabeled, superpixel 1, own segment 2.
  a = vmf_loss.Anchors(image=jnp.asarray([0, 1, 0]), label=jnp.asarray([1, 2, 3]),
                       superpixel=jnp.asarray([1, 0, 1]), segment=jnp.asarray([1, 3, 2]),
                       tags=jnp.asarray([[1, 0], [0, 1], [1, 0]], jnp.float32),
                       valid=jnp.asarray([1, 1, 1], bool))
  feats = _unit([20, 160, 80])
  return feats, protos, a, p


def test_vmf_annotation_relation():
  feats, protos, a, p = _setup()
  kappa = 6.0
  s, n = vmf_loss.relation_loss("annotation", feats, protos, a, p, kappa=kappa, num_labeled=3)
  lg = kappa * feats @ protos.T
  # Anchor 0 (label 1): positives {0, 4} (own 1 removed; 6 invalid), negatives {3, 5};
  # unlabeled 2 takes no part.
  l0 = _nca(lg[0], [0, 4], [3, 5])
  # Anchor 1 (label 2): positives {5} (own 3 removed), negatives {0, 1, 4}.
  l1 = _nca(lg[1], [5], [0, 1, 4])
  # Anchor 2 is unlabeled: not eligible.
  assert int(n) == 2
  np.testing.assert_allclose(float(s), l0 + l1, rtol=1e-5)


def test_vmf_own_segment_only_positive():
  feats, protos, a, p = _setup()
  p = p._replace(valid=jnp.asarray([1, 1, 1, 1, 1, 0, 0], bool))  # drop memory proto 5
  s, n = vmf_loss.relation_loss("annotation", feats[1:2], protos,
                                jax.tree.map(lambda x: x[1:2], a), p, kappa=6.0,
                                num_labeled=3)
  lg = 6.0 * feats[1] @ protos.T
  # Only its own segment 3 has label 2: it stays the positive; negatives {0, 1, 4}.
  np.testing.assert_allclose(float(s), _nca(lg, [3], [0, 1, 4]), rtol=1e-5)
  assert int(n) == 1


def test_vmf_cooccurrence_relation():
  feats, protos, a, p = _setup()
  kappa = 8.0
  s, n = vmf_loss.relation_loss("cooccurrence", feats, protos, a, p, kappa=kappa,
                                num_labeled=3)
  lg = kappa * feats @ protos.T
  # Anchor 0 (tags {0}, image 0): positives = images sharing a tag or its own image:
  # {0, 2, 5} (own 1 removed), negatives {3, 4}.
  l0 = _nca(lg[0], [0, 2, 5], [3, 4])
  # Anchor 1 (tags {1}, image 1): positives {4, 5} (own 3 removed), negatives {0, 1, 2}.
  l1 = _nca(lg[1], [4, 5], [0, 1, 2])
  # Anchor 2 (unlabeled pixels take part): positives {0, 1, 5}, negatives {3, 4}.
  l2 = _nca(lg[2], [0, 1, 5], [3, 4])
  assert int(n) == 3
  np.testing.assert_allclose(float(s), l0 + l1 + l2, rtol=1e-5)


@pytest.mark.parametrize("same_image", [False, True])
def test_vmf_cooccurrence_same_image_flag(same_image):
  """Relation C with and without the same-image positives (released code: without), against
  a NumPy reference of the positive/negative sets and of the kappa-scaled loss."""
  rng = np.random.default_rng(3)
  n_p, n_a, kappa = 12, 6, 8.0
  p_img = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1, 0])
  img_tags = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.float32)  # image 2: no object
  p_tags = np.where((p_img >= 0)[:, None], img_tags[np.maximum(p_img, 0)], 0)
  p_tags[9:11] = [[0, 1, 0], [1, 0, 0]]                                # memory prototypes
  p_valid = np.ones(n_p, bool)
  p_valid[11] = False
  a_img = np.array([0, 1, 2, 2, 0, 1])
  a_seg = np.array([0, 3, 6, 7, 1, -1])
  protos = _unit(rng.uniform(0, 360, n_p))
  feats = _unit(rng.uniform(0, 360, n_a))
  a = vmf_loss.Anchors(image=jnp.asarray(a_img), label=jnp.zeros(n_a, jnp.int32),
                       superpixel=jnp.zeros(n_a, jnp.int32), segment=jnp.asarray(a_seg),
                       tags=jnp.asarray(img_tags[a_img]), valid=jnp.ones(n_a, bool))
  p = vmf_loss.Prototypes(image=jnp.asarray(p_img), label=jnp.zeros(n_p, jnp.int32),
                          superpixel=jnp.zeros(n_p, jnp.int32),
                          tags=jnp.asarray(p_tags, jnp.float32), valid=jnp.asarray(p_valid))
  # NumPy reference.
  overlap = (img_tags[a_img] @ p_tags.T) > 0
  if same_image:
    overlap |= a_img[:, None] == p_img[None, :]
  want_pos, want_neg = p_valid & overlap, p_valid & ~overlap
  _, pos, neg = vmf_loss.relation_masks("cooccurrence", a, p, 3,
                                        same_image_positive=same_image)
  np.testing.assert_array_equal(np.asarray(pos), want_pos)
  np.testing.assert_array_equal(np.asarray(neg), want_neg)
  lg = kappa * feats @ protos.T
  total, count = 0.0, 0
  for i in range(n_a):
    own = a_seg[i]
    others = [j for j in range(n_p) if want_pos[i, j] and j != own]
    pos_i = others or ([own] if own >= 0 and want_pos[i, own] else [])
    if not pos_i:
      continue               # no positive: the anchor takes no part
    neg_i = [j for j in range(n_p) if want_neg[i, j] and j != own]
    total += _nca(lg[i], pos_i, neg_i)
    count += 1
  s, n = vmf_loss.relation_loss("cooccurrence", feats, protos, a, p, kappa=kappa,
                                num_labeled=3, same_image_positive=same_image)
  # The object-free image's anchors (2, 3) count only with the same-image term.
  assert int(n) == count == (6 if same_image else 4)
  np.testing.assert_allclose(float(s), total, rtol=1e-5)
  assert spml.default_config().cooccur_same_image is False


def test_vmf_lowlevel_relation():
  feats, protos, a, p = _setup()
  kappa = 16.0
  s, n = vmf_loss.relation_loss("lowlevel", feats, protos, a, p, kappa=kappa, num_labeled=3)
  lg = kappa * feats @ protos.T
  # Anchor 0 (image 0, superpixel 1): same-image positives {2} (own 1 removed), negative
  # {0}; other images and memory take no part.
  l0 = _nca(lg[0], [2], [0])
  # Anchor 1 (image 1, superpixel 0): only its own segment 3, negative {4}.
  l1 = _nca(lg[1], [3], [4])
  # Anchor 2 (image 0, superpixel 1): positives {1}, negative {0}.
  l2 = _nca(lg[2], [1], [0])
  np.testing.assert_allclose(float(s), l0 + l1 + l2, rtol=1e-5)
  assert int(n) == 3


def test_vmf_affinity_relation():
  feats, protos, a, p = _setup()
  new = vmf_loss.propagate_labels(jnp.asarray(protos), p.label, p.valid, 3)
  # Unlabeled prototype 2 (80 deg) is nearest to labeled 1 (30 deg, label 1) among the
  # valid labeled ones {0: 0, 1: 30, 3: 150, 4: 200, 5: 250}.
  np.testing.assert_array_equal(new, [1, 1, 1, 2, 1, 2, 1])
  a2 = a._replace(label=new[a.segment])
  s, n = vmf_loss.relation_loss("affinity", feats, protos, a2, p._replace(label=new),
                                kappa=12.0, num_labeled=3)
  lg = 12.0 * feats @ protos.T
  l0 = _nca(lg[0], [0, 2, 4], [3, 5])
  l1 = _nca(lg[1], [5], [0, 1, 2, 4])
  l2 = _nca(lg[2], [0, 1, 4], [3, 5])  # anchor 2 now carries label 1, own 2 removed
  assert int(n) == 3
  np.testing.assert_allclose(float(s), l0 + l1 + l2, rtol=1e-5)


def test_vmf_gradient_finite_with_empty_rows():
  feats, protos, a, p = _setup()
  p = p._replace(valid=jnp.zeros(7, bool))
  g = jax.grad(lambda f: vmf_loss.relation_loss("annotation", f, protos, a, p, kappa=6.0,
                                                num_labeled=3)[0])(jnp.asarray(feats))
  assert np.all(np.isfinite(g)) and float(np.abs(g).max()) == 0.0


# ---------------------------------------------------------------------------------------
# Train step: memory rollover, sharded == unsharded.
# ---------------------------------------------------------------------------------------
def _spml_config(**overrides):
  cfg = tiny_config(**{"data.batch_size": 8, "data.crop_size": 16, **overrides})
  cfg.method = "spml"
  cfg.spml = spml.default_config()
  s = cfg.spml
  s.embedding_dim, s.aspp_rates, s.classifier_hidden = 8, (1, 2), 8
  s.classifier_dropout = 0.0  # dropout keys differ between jit and shard_map
  s.kmeans_grid, s.kmeans_iters, s.max_segments, s.max_superpixels = 2, 3, 16, 8
  s.lambda_o = 0.5  # exercise relation O too
  return cfg


def _method(cfg):
  model = spml.SPMLNet(TinyTwoScaleBackbone(name=None), NUM_CLASSES, embedding_dim=8,
                       aspp_rates=(1, 2), classifier_hidden=8, classifier_dropout=0.0)
  return spml.make_spml_method(cfg, NUM_CLASSES, model=model)


def _batches(n, batch=8, size=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    labels = (rng.random((batch, NUM_CLASSES - 1)) < 0.5).astype(np.float32)
    mask = rng.integers(0, NUM_CLASSES + 1, (batch, size, size)).astype(np.int32)
    mask[:, :2] = 255  # void rows
    sp = (np.arange(size)[None, :, None] // 8 * 2 + np.arange(size)[None, None, :] // 8)
    out.append({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                "mask": mask, "labels": labels,
                "superpixels": np.broadcast_to(sp, (batch, size, size)).astype(np.int32)})
  return out


@pytest.fixture(scope="module")
def reference_run():
  cfg = _spml_config()
  batches = _batches(3)
  return batches, run_steps(_method(cfg), cfg, 1, "jit", batches)


def test_memory_rollover(reference_run):
  batches, (state, hist) = reference_run
  mem = state.extra["memory"]
  assert mem["features"].shape == (2, 8 * 16, 8)
  # After 3 steps: slot 0 = prototypes of batch 3, slot 1 = batch 2 (batch 1 dropped).
  # Rebuild batch-3 labels of slot 0 independently: every valid segment's label occurs in
  # the (downsampled) mask of its image, and tags follow the image order.
  tags0 = np.asarray(mem["tags"][0]).reshape(8, 16, NUM_CLASSES - 1)
  np.testing.assert_array_equal(tags0[:, 0], batches[2]["labels"])
  tags1 = np.asarray(mem["tags"][1]).reshape(8, 16, NUM_CLASSES - 1)
  np.testing.assert_array_equal(tags1[:, 0], batches[1]["labels"])
  assert np.asarray(mem["valid"]).sum(axis=1).min() > 0
  feats = np.asarray(mem["features"])[np.asarray(mem["valid"])]
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-5)
  for k in ("loss_a", "loss_c", "loss_i", "loss_o", "loss_cls"):
    assert np.isfinite(hist[-1][k]) and hist[-1][k] > 0, k


@pytest.mark.parametrize("impl", ["jit", "shard_map"])
def test_sharded_matches_unsharded(reference_run, impl):
  batches, (ref_state, ref_hist) = reference_run
  cfg = _spml_config()
  state, hist = run_steps(_method(cfg), cfg, 8, impl, batches)
  assert max_abs_diff(state.params, ref_state.params) < 2e-5
  assert max_abs_diff(state.batch_stats, ref_state.batch_stats) < 2e-5
  assert max_abs_diff(state.extra, ref_state.extra) < 2e-5
  for k in ("loss", "loss_a", "loss_c", "loss_i", "loss_o", "loss_cls"):
    np.testing.assert_allclose(hist[-1][k], ref_hist[-1][k], rtol=2e-5, err_msg=k)


# ---------------------------------------------------------------------------------------
# Inference pieces, weak labels, superpixels, training source.
# ---------------------------------------------------------------------------------------
def test_random_walk_matches_numpy():
  from wsss_jax.ops import propagation
  rng = np.random.default_rng(0)
  e = rng.normal(size=(2, 1, 6, 3)).astype(np.float32)
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  scores = rng.random((1, 6, 2)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 0]], bool)
  got = propagation.random_walk(jnp.asarray(scores), jnp.asarray(e), jnp.asarray(valid),
                                scale=5.0, beta=2.0, logt=2)
  a = np.mean([np.exp(5.0 * (v[0] @ v[0].T - 1.0)) for v in e], axis=0) ** 2.0
  a *= np.outer(valid[0], valid[0])
  t = a / np.maximum(a.sum(axis=0, keepdims=True), 1e-12)
  want = scores[0].T @ np.linalg.matrix_power(t, 4)   # 2^logt = 4 steps
  np.testing.assert_allclose(np.asarray(got[0]), want.T, rtol=1e-4, atol=1e-6)
  # Column-normalised T keeps a constant score plane constant on the valid pixels.
  flat = propagation.random_walk(jnp.ones((1, 6, 1)), jnp.asarray(e), jnp.asarray(valid),
                                 scale=5.0, beta=2.0, logt=3)
  np.testing.assert_allclose(np.asarray(flat)[0, :5, 0], 1.0, rtol=1e-5)


def test_nn_class_scores_hand_case():
  from wsss_jax.ops import propagation
  mem = jnp.asarray(_unit([0, 10, 20, 90, 100, 180]))
  labels = jnp.asarray([1, 1, 2, 2, 0, 0])
  valid = jnp.asarray([1, 1, 1, 1, 1, 0], bool)
  q = jnp.asarray(_unit([5, 95]))
  got = propagation.nn_class_scores(q, jnp.asarray([True, False]), mem, labels, valid, 3, 3)
  # Query 0 (5 deg): nearest 0, 10, 20 deg -> labels 1, 1, 2. Query 1 is invalid.
  np.testing.assert_allclose(np.asarray(got), [[0, 2 / 3, 1 / 3], [0, 0, 0]], atol=1e-6)


@pytest.mark.parametrize("kind", ["points", "scribbles", "boxes"])
def test_weak_labels_agree_with_mask(kind):
  from wsss_jax.data import weak_labels
  mask = np.zeros((48, 48), np.uint8)
  mask[4:30, 6:30] = 1
  mask[34:46, 30:46] = 2
  mask[0, :] = 255
  out = weak_labels.weak_label(mask, kind, 4)
  labelled = out < 4
  assert set(np.unique(out)) <= {0, 1, 2, 4}
  for c in (1, 2):
    assert (out == c).any(), c
  if kind == "points":
    # Each component gets a disk of radius 6 around its most interior pixel.
    assert (out == 2).sum() == 113 and (out == 1).sum() == 113
  if kind == "scribbles":  # skeletons lie inside their components (dilation radius 3)
    assert np.all(mask[out == 1] != 2) and 0.1 < labelled.mean() < 0.75
  if kind == "boxes":
    assert np.all(out[(mask == 0)[:, :] & (np.arange(48)[None, :] < 4)] == 0)  # outside
    assert np.all(mask[out == 1] == 1) and np.all(mask[out == 2] == 2)        # cores
    assert (out == 4).any()                                                   # box rims
  with pytest.raises(ValueError, match="weak_label"):
    weak_labels.weak_label(mask, "lines", 4)


def test_superpixels_and_training_source(tmp_path):
  from PIL import Image
  from wsss_jax.data import palette
  from wsss_jax.data import superpixels
  from wsss_jax.data import label_sources
  rng = np.random.default_rng(0)
  image = np.zeros((40, 48, 3), np.uint8)
  image[:, 24:] = 200
  image += rng.integers(0, 10, image.shape, dtype=np.uint8)
  cfg = {"method": "slic", "n_segments": 8, "compactness": 10.0, "sigma": 1.0}
  sp = superpixels.compute(image, cfg)
  assert sp.dtype == np.uint16 and sp.shape == (40, 48)
  np.testing.assert_array_equal(np.unique(sp), np.arange(sp.max() + 1))  # consecutive
  assert len(np.unique(sp[:, :20])) and not set(np.unique(sp[:, :20])) & set(
      np.unique(sp[:, 28:]))  # the colour edge separates superpixels
  fz = superpixels.compute(image, {"method": "felzenszwalb", "fz_scale": 100.0, "sigma": 0.8,
                                   "fz_min_size": 20})
  assert fz.max() >= 1
  with pytest.raises(ValueError, match="superpixels.method"):
    superpixels.compute(image, {"method": "watershed"})
  # Training source: pseudo-label 255 ("unsure") becomes the unlabeled id C = 4.
  (tmp_path / "sp").mkdir()
  (tmp_path / "labels").mkdir()
  Image.fromarray(sp).save(tmp_path / "sp" / "a.png")
  label = np.zeros((40, 48), np.uint8)
  label[:10] = 255
  label[20:] = 2
  palette.save_palette_png(str(tmp_path / "labels" / "a.png"), label)
  base = [{"id": "a", "image": image, "mask": np.ones((40, 48), np.uint8),
           "labels": np.array([0, 1, 0], np.uint8)}]
  src = label_sources.SPMLTrainSource(base, 4, "tags", str(tmp_path / "labels"),
                                    str(tmp_path / "sp"))
  rec = src[0]
  assert np.all(rec["mask"][:10] == 4) and np.all(rec["mask"][20:] == 2)
  assert np.all(rec["mask"][10:20] == 0)
  np.testing.assert_array_equal(rec["superpixels"], sp)
  pts = label_sources.SPMLTrainSource(base, 4, "points", None, None)[0]
  assert "superpixels" not in pts and (pts["mask"] == 1).sum() == 113


def test_train_transform_moves_extra_maps_with_the_mask():
  from wsss_jax.data import transforms
  rng = np.random.default_rng(0)
  mask = rng.integers(0, 200, (37, 53)).astype(np.uint8)
  ex = {"id": "x", "image": rng.integers(0, 255, (37, 53, 3), dtype=np.uint8), "mask": mask,
        "labels": np.zeros(3, np.uint8), "superpixels": mask.astype(np.uint16) + 1000}
  t = transforms.TrainTransform(48, (0.6, 1.4), True, 0.0, extra_maps=("superpixels",))
  for seed in range(6):  # crops larger and smaller than the image, flipped or not
    out = t.random_map(ex, np.random.default_rng(seed))
    pad = out["mask"] == 255
    assert out["superpixels"].dtype == np.int32
    np.testing.assert_array_equal(out["superpixels"][~pad], out["mask"][~pad] + 1000)
    assert np.all(out["superpixels"][pad] == 0)
  with pytest.raises(ValueError, match="superpixels shape"):
    t.random_map({**ex, "superpixels": mask[:10]}, np.random.default_rng(0))


def test_cpu_configs_walk_one_step_for_tags_only():
  """The CPU-sized tag configs take one random-walk step (README: the 64 steps of the
  reference over-diffuse an 80-step embedding); points and the full config keep 64."""
  from conftest import load_config_file
  assert load_config_file("configs/voc/spml.py", "runlocal").spml_labels.rw_logt == 0
  assert load_config_file("configs/synthetic/spml.py", "").spml_labels.rw_logt == 0
  assert load_config_file("configs/voc/spml.py", "").spml_labels.rw_logt == 6
  assert load_config_file("configs/voc/spml.py",
                          "runlocal,weak_label=points").spml_labels.rw_logt == 6
  assert load_config_file("configs/synthetic/spml.py",
                          "weak_label=points").spml_labels.rw_logt == 6


def test_configs_embed_at_output_stride_8_upsampled_twice():
  """The reference's embedding: ASPP-L on the stride-8 map, upsampled x2 to stride 4; the
  baseline (model.output_stride) stays at 16."""
  from conftest import load_config_file
  cfg = load_config_file("configs/voc/spml.py", "runlocal")
  cfg.model.pretrained = False
  assert int(cfg.model.output_stride) == 16 and spml.output_stride(cfg) == 8
  assert tuple(cfg.spml.aspp_rates) == (6, 12, 18, 24)
  model = spml.build_model(cfg, 22)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  out, inter = jax.eval_shape(lambda v: model.apply(
      v, x, capture_intermediates=lambda mdl, _: mdl.name == "embed_aspp0",
      mutable=["intermediates"]), variables)
  assert inter["intermediates"]["embed_aspp0"]["__call__"][0].shape == (1, 8, 8, 64)
  assert out["embedding"].shape == (1, 16, 16, 64)
  cfg.spml.output_stride = 0     # the coarse map of before: model.output_stride (16)
  _, inter16 = jax.eval_shape(lambda v: spml.build_model(cfg, 22).apply(
      v, x, capture_intermediates=lambda mdl, _: mdl.name == "embed_aspp0",
      mutable=["intermediates"]), variables)
  assert inter16["intermediates"]["embed_aspp0"]["__call__"][0].shape == (1, 4, 4, 64)


def test_runlocal_spml_follows_the_protocol(msrc_root):
  """configs/voc/spml.py:runlocal: the shared 500-step baseline (the same fingerprint as
  the control's, so the cache serves both), SPML's CAMs/pseudo-labels from it, then SPML
  for the control's METHOD_STEPS warm-started from it."""
  import importlib.util
  import os
  from conftest import REPO_ROOT, load_config_file
  from wsss_jax.stages import registry
  spec = importlib.util.spec_from_file_location("cam_cfg", os.path.join(
      REPO_ROOT, "configs/voc/cam.py"))
  cam = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cam)
  ctrl = load_config_file("configs/voc/cam.py", "runlocal")
  sp = load_config_file("configs/voc/spml.py", "runlocal")
  for c in (ctrl, sp):
    c.data.root = msrc_root
  assert sp.baseline.num_steps == ctrl.baseline.num_steps == cam.BASELINE_STEPS == 500
  assert sp.train.num_steps == ctrl.train.num_steps == cam.METHOD_STEPS
  assert sp.train.init_from == "baseline" and sp.cams.variables == "baseline"
  stages = sp.stages.split(",")
  assert stages.index("baseline") < stages.index("cams") < stages.index("pseudo") < (
      stages.index("train"))
  assert registry.fingerprint(sp, "baseline") == registry.fingerprint(ctrl, "baseline")
