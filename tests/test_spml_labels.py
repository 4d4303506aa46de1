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

