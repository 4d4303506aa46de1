"""SPML's label propagation (`ops/propagation.py`, `stages/spml_labels.py`): the random walk
followed by the DeepLab CRF (reference pseudo_camrw_crf.py), the walk-length diagnostic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.ops import crf
from wsss_jax.ops import image as image_ops
from wsss_jax.ops import propagation
from wsss_jax.ops import resize

P, STRIDE, C = 16, 4, 3          # 16x16 image, 4x4 walk grid, background + 2 classes
SCALE, BETA = 5.0, 2.0


def _walk_case(seed: int = 0):
  """A two-colour image, weak noisy scores and a random embedding (one image)."""
  rng = np.random.default_rng(seed)
  rgb = np.zeros((P, P, 3), np.float32)
  rgb[:, : P // 2] = (200, 40, 40)
  rgb[:, P // 2:] = (40, 40, 200)
  images = jnp.asarray((rgb[None] - image_ops.MEAN255) / image_ops.STD255)
  scores = (0.4 + 0.2 * rng.random((1, P, P, C))).astype(np.float32)
  emb = rng.normal(size=(1, P // 4, P // 4, 4)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  return rgb, images, scores, emb


def _numpy_walk(scores, emb, steps):
  """Scores at the walk grid times T^steps (NumPy; one view, every pixel valid)."""
  hr = P // STRIDE
  sel = np.asarray(jax.image.resize(jnp.asarray(scores), (1, hr, hr, C), "bilinear"))
  e = np.asarray(jax.image.resize(jnp.asarray(emb), (1, hr, hr, emb.shape[-1]), "bilinear"))
  e = e.reshape(-1, emb.shape[-1])
  e = e / np.linalg.norm(e, axis=-1, keepdims=True)
  a = np.exp(SCALE * (e @ e.T - 1.0)) ** BETA
  t = a / a.sum(axis=0, keepdims=True)
  walked = sel.reshape(-1, C).T @ np.linalg.matrix_power(t, steps)
  return walked.T.reshape(1, hr, hr, C)


def test_walk_labels_are_the_argmax_of_the_crf_of_the_walk():
  """rw_crf (the default): labels = argmax(DeepLab CRF(walked scores)), CRF by pydensecrf."""
  pytest.importorskip("pydensecrf")
  rgb, images, scores, emb = _walk_case()
  valid = jnp.ones((1, P, P), bool)
  present = jnp.ones((1, C), bool)
  kw = dict(max_classes=C, stride=STRIDE, scale=SCALE, beta=BETA, logt=2)
  got = np.asarray(propagation.walk_labels(jnp.asarray(scores), [jnp.asarray(emb)], valid,
                                           present, images, crf=True, **kw))[0]
  up = np.asarray(resize.resize_bilinear(jnp.asarray(_numpy_walk(scores, emb, 4)),
                                         (P, P)))[0]
  prob = up / up.sum(-1, keepdims=True)
  q = crf.dense_crf_reference(-np.log(np.clip(prob, 1e-5, 1.0)), rgb, crf.DEEPLAB_CRF, 10)
  np.testing.assert_array_equal(got, np.argmax(q, -1))
  # The CRF changes the walk's argmax here (the test could not pass without it) ...
  plain = np.asarray(propagation.walk_labels(jnp.asarray(scores), [jnp.asarray(emb)], valid,
                                             present, images, crf=False, **kw))[0]
  np.testing.assert_array_equal(plain, np.argmax(up, -1))
  assert (plain != got).sum() > 10
  # ... and it is the stage's default (reference pseudo_camrw_crf.py).
  from wsss_jax.stages import spml_labels
  assert spml_labels.default_config().rw_crf is True


def test_walk_lengths_diagnostic_matches_numpy_walks():
  """spml_labels' walk-length diagnostic: per image and length t, the confusion matrix of
  argmax(walk of t steps) (one walk for all t) against the mask, t = 1, 4, 16 in NumPy."""
  import ml_collections as mlc
  from wsss_jax.ops import metrics
  from wsss_jax.stages import spml_labels
  rgb, images, scores, emb = _walk_case(1)
  steps = (16, 1, 4)                                  # any order
  # Random-walk scores from the shared ops, step by step, agree with NumPy's T^t.
  for t in steps:
    want = np.argmax(np.asarray(resize.resize_bilinear(
        jnp.asarray(_numpy_walk(scores, emb, t)), (P, P)))[0], -1)
    got = propagation.walk_labels_steps(
        jnp.asarray(scores), [jnp.asarray(emb)], jnp.ones((1, P, P), bool),
        jnp.ones((1, C), bool), images, max_classes=C, stride=STRIDE, scale=SCALE,
        beta=BETA, steps=steps, crf=False)
    np.testing.assert_array_equal(np.asarray(got[steps.index(t), 0]), want)
  # The stage's batch function: CAMs (background = bg) walked with the model's embedding.
  cams = scores[..., 1:]
  bg = 0.5
  mask = np.where(np.arange(P)[None, :, None] < P // 2, 1, 2) * np.ones((1, 1, P), np.int32)
  mask[:, :2] = 255

  class FixedEmbedding:
    def apply(self, variables, x, train=False):
      del variables, train
      return {"embedding": jnp.broadcast_to(jnp.asarray(emb), (x.shape[0],) + emb.shape[1:])}

  cfg = mlc.ConfigDict({"spml_labels": spml_labels.default_config().to_dict()})
  lc = cfg.spml_labels
  lc.flip, lc.rw_crf, lc.rw_stride, lc.rw_scale, lc.rw_beta = False, False, STRIDE, SCALE, BETA
  fn = spml_labels.walk_steps_fn(cfg, FixedEmbedding(), C, bg, steps)
  batch = {"image": images, "valid": jnp.ones((1, P, P), bool), "cams": jnp.asarray(cams),
           "labels": jnp.ones((1, C - 1)), "mask": jnp.asarray(mask)}
  conf = np.asarray(fn({"params": {}}, batch)["conf"])
  assert conf.shape == (1, len(steps), C, C)
  full = np.concatenate([np.full(cams.shape[:3] + (1,), bg, np.float32), cams], -1)
  for i, t in enumerate(steps):
    lab = np.argmax(np.asarray(resize.resize_bilinear(
        jnp.asarray(_numpy_walk(full, emb, t)), (P, P)))[0], -1)
    np.testing.assert_array_equal(conf[0, i], metrics.confusion_matrix_np(mask[0], lab, C))
  assert not np.array_equal(conf[0, 0], conf[0, 1])   # the lengths give other labels
  assert spml_labels.default_config().rw_diag_steps == (1, 4, 16, 64)
