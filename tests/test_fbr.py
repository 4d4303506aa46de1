"""FBR (METHODS.md §3): prototypes, NROIs, bank, active sampling, losses, gradients, step."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_model import make_batches, max_abs_diff, run_steps, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods import base, fbr
from wsss_jax.models.fbr_net import FBRNet
from wsss_jax.ops import contrastive, memory
from wsss_jax.ops import fbr_losses as F
from wsss_jax.ops import kmeans as kmeans_ops
from wsss_jax.ops import prototypes as P

pytestmark = pytest.mark.usefixtures("fast_compile")
JIT_CTX = base.StepContext(model=None, axis_name=None)


@jax.jit(static_argnums=0)
def _terms(s, out, labels, extra, key):
  """`fbr.fbr_terms` under jit (eager op-by-op dispatch is slower on CPU)."""
  return fbr.fbr_terms(s, out, labels, extra, key, JIT_CTX)


class TinyBackbone(nn.Module):
  """Conv(stride 2) + BN + ReLU returning the registry backbones' `{'out': ...}`."""
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), strides=(2, 2), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return {"out": nn.relu(x)}


def _settings(**kw):
  cfg = tiny_config(method="fbr")
  cfg.fbr = fbr.fbr_config()
  cfg.fbr.update(dict(bg_dropout=0.0, bank_size=64, num_bank_negatives=16,
                      num_fg_negatives=16, proj_dim=8, num_clusters=4, kmeans_iters=3))
  cfg.fbr.update(kw)
  return cfg, fbr.settings_from_config(cfg)


# ---------------------------------------------------------------- prototypes and seeds


def test_topk_weighted_prototypes_hand_case():
  feats = jnp.array([[1., 0.], [0., 1.], [2., 2.], [4., 0.]])
  scores = jnp.array([[0.9, 0.], [0.1, 0.], [0.3, 0.], [0.6, 0.]])  # class 1 never active
  protos, valid = P.topk_weighted_prototypes(feats, scores, k=2)
  # Top-2 of class 0: pixels 0 (0.9) and 3 (0.6).
  np.testing.assert_allclose(protos[0], (0.9 * np.array([1, 0]) + 0.6 * np.array([4, 0]))
                             / 1.5, rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, False])
  np.testing.assert_array_equal(protos[1], [0., 0.])


def test_prototype_ema_hand_case():
  prev = jnp.array([[1., 0.], [0., 1.], [5., 5.]])
  cur = jnp.array([[0., 1.], [3., 3.], [7., 7.]])
  out, valid = P.prototype_ema(prev, jnp.array([True, False, True]), cur,
                               jnp.array([True, True, False]), 0.75)
  np.testing.assert_allclose(out, [[0.75, 0.25], [3., 3.], [5., 5.]])
  np.testing.assert_array_equal(valid, [True, True, True])
  same, _ = P.prototype_ema(prev, jnp.ones(3, bool), cur, jnp.ones(3, bool), 0.0)
  np.testing.assert_array_equal(same, cur)  # momentum 0 = the paper (batch prototypes)
  with pytest.raises(ValueError, match="momentum"):
    P.prototype_ema(prev, jnp.ones(3, bool), cur, jnp.ones(3, bool), 1.0)


def test_seeds_queries_and_bg_targets():
  cams = jnp.array([[[[2.0, 0.0], [0.6, 0.0], [0.0, 4.0], [0.0, 0.2], [0.1, 0.0]]]])
  m = F.seed_cams(cams, jnp.array([[1.0, 1.0]]))[0, 0]          # [5, 2]
  np.testing.assert_allclose(m[:, 0], [1, 0.3, 0, 0, 0.05], atol=1e-4)
  seeds = F.seed_labels(m, 0.1)
  np.testing.assert_array_equal(seeds, [1, 1, 2, 0, 0])           # 0.05 and 0.05 <= 0.1
  np.testing.assert_array_equal(F.query_mask(m, seeds, 0.4), [False, True, False, False,
                                                                False])
  np.testing.assert_array_equal(F.bg_seg_targets(m, 0.04), [0, 0, 0, 0, 0])
  np.testing.assert_array_equal(F.bg_seg_targets(m, 0.06), [0, 0, 0, 1, 1])
  # An absent class is masked out before normalisation.
  m_absent = F.seed_cams(cams, jnp.array([[1.0, 0.0]]))[0, 0]
  np.testing.assert_array_equal(m_absent[:, 1], 0.0)


def test_unsure_queries_match_numpy_reference():
  """The released code's rule: not in the top 40 % of the class's CAM values (> 0.05) in
  the image, and above the image's 10 % entropy quantile."""
  rng = np.random.default_rng(0)
  b, p, k = 3, 30, 3
  m = rng.random((b, p, k)).astype(np.float32) * (rng.random((b, 1, k)) < 0.8)
  seeds = np.asarray(F.seed_labels(jnp.asarray(m), 0.1))
  got = np.asarray(F.unsure_query_mask(jnp.asarray(m), jnp.asarray(seeds)))
  want, tie = np.zeros((b, p), bool), np.zeros((b, p), bool)
  for i in range(b):
    e = np.exp(np.concatenate([m[i], np.full((p, 1), 0.1)], -1))
    sm = e / e.sum(-1, keepdims=True)
    ent = np.where(seeds[i] > 0, -(sm * np.log(sm)).sum(-1), 0.0)
    t = np.quantile(ent, 0.1)
    for j in range(p):
      c = seeds[i, j] - 1
      if c < 0:
        continue
      vals = m[i, seeds[i] == c + 1, c]
      vals = vals[vals > 0.05]
      sure = vals.size > 0 and m[i, j, c] > np.percentile(vals, 60)
      want[i, j] = (not sure) and ent[j] > t
      # The pixel whose value *is* the interpolated percentile: float32 rounding decides.
      tie[i, j] = vals.size > 0 and abs(m[i, j, c] - np.percentile(vals, 60)) < 1e-6
  np.testing.assert_array_equal(got[~tie], want[~tie])
  assert tie.sum() <= b * k
  assert 0 < want.sum() < (seeds > 0).sum()  # neither rule is vacuous here
  # Confident pixels can be queries under this rule but never under M_c < 0.4.
  hi = jnp.array([[[1.0, 0.0], [0.95, 0.0], [0.9, 0.0], [0.85, 0.0], [0.8, 0.0]]])
  hs = F.seed_labels(hi, 0.1)
  np.testing.assert_array_equal(F.unsure_query_mask(hi, hs)[0], [0, 0, 1, 1, 1])
  assert not bool(F.query_mask(hi[0], hs[0], 0.4).any())


def test_info_nce_from_logits_hand_and_reference():
  pos = jnp.array([1.0, 0.0])
  neg = jnp.array([[0.0, math.log(2.0)], [3.0, -1.0]])
  got = F.info_nce_from_logits(pos, neg)
  e = math.e
  np.testing.assert_allclose(got[0], -math.log(e / (e + 1 + 2)), rtol=1e-6)
  masked = F.info_nce_from_logits(pos, neg, jnp.array([[True, False], [False, False]]))
  np.testing.assert_allclose(masked, [-math.log(e / (e + 1)), 0.0], atol=1e-6)
  # Same as the lead's feature-space InfoNCE on explicit vectors.
  rng = np.random.default_rng(0)
  a, p, n = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 5, 4))
  ref = contrastive.info_nce(a, p, n, 0.5)
  mine = F.info_nce_from_logits(np.sum(a * p, -1) / 0.5, np.einsum("ad,amd->am", a, n) / 0.5)
  np.testing.assert_allclose(mine, ref, rtol=1e-5)


def test_class_means_and_bg_seg_loss():
  sums, counts = F.class_sums(jnp.array([1., 3., 10., 7.]), jnp.array([0, 0, 2, 1]),
                              jnp.array([True, True, True, False]), 3)
  np.testing.assert_allclose(sums, [4., 0., 10.])
  np.testing.assert_allclose(counts, [2., 0., 1.])
  np.testing.assert_allclose(F.mean_of_class_means(sums, counts), (2.0 + 10.0) / 2)
  assert float(F.mean_of_class_means(jnp.zeros(3), jnp.zeros(3))) == 0.0
  z, t = jnp.array([0.0, 2.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
  want = np.mean([math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(1))])
  np.testing.assert_allclose(F.bg_seg_loss(z, t), want, rtol=1e-6)


# ---------------------------------------------------------------- NROIs and the bank


def _lloyd_numpy(x, mask, centers, iters):
  x, c = np.asarray(x, np.float64), np.asarray(centers, np.float64).copy()
  pts = x[mask]
  for _ in range(iters + 1):
    assign = np.argmin(((pts[:, None] - c[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(assign, minlength=len(c))
    if _ == iters:
      break
    for j in range(len(c)):
      if counts[j]:
        c[j] = pts[assign == j].mean(0)
  return c, counts


def test_extract_nrois_matches_numpy_on_bg_pixels():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(3, 40, 5)).astype(np.float32)
  mask = rng.random((3, 40)) < 0.6
  keys = jax.random.split(jax.random.key(3), 3)
  centers, valid = jax.jit(F.extract_nrois, static_argnames=("num_clusters", "num_iters"))(
      feats, mask, keys, num_clusters=4, num_iters=6)
  for i in range(3):
    init = kmeans_ops.kmeans_plusplus_init(keys[i], feats[i], mask[i], 4)
    want, counts = _lloyd_numpy(feats[i], mask[i], init, 6)
    np.testing.assert_allclose(centers[i], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(valid[i], counts > 0)
  assert bool(valid.all())


def test_extract_nrois_fewer_bg_pixels_than_k():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(3, 12, 4)).astype(np.float32)
  mask = np.zeros((3, 12), bool)
  mask[0, [2, 7, 9]] = True           # 3 background pixels < K = 8
  mask[1, 5] = True                   # 1 background pixel
  # image 2: no background at all
  centers, valid = jax.jit(F.extract_nrois, static_argnames=("num_clusters", "num_iters"))(
      feats, mask, jax.random.split(jax.random.key(0), 3), num_clusters=8, num_iters=5)
  np.testing.assert_array_equal(valid.sum(1), [3, 1, 0])
  for i, pix in [(0, [2, 7, 9]), (1, [5])]:
    got = np.asarray(centers[i])[np.asarray(valid[i])]
    # The NROIs are the background pixels themselves (the released code's fallback).
    order = np.lexsort(got.T)
    np.testing.assert_allclose(got[order], feats[i, pix][np.lexsort(feats[i, pix].T)],
                               rtol=1e-6)


def _hand_outputs(proj_bg_value, cams=None):
  """One image, 1x6 pixels, 2 FG classes (see test_fbr_losses_hand_case)."""
  if cams is None:
    cams = [[1.0, 0.0], [0.3, 0.0], [0.0, 1.0], [0.0, 0.2], [0.0, 0.0], [0.01, 0.0]]
  z_fg = [[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]
  z_bg = [[9, 9, 9]] * 4 + [proj_bg_value, proj_bg_value]
  f = lambda v: jnp.asarray(v, jnp.float32).reshape(1, 1, 6, -1)
  # BN -> ReLU of the BG branch (L_sim's side), deliberately unlike Z_bg.
  z_bg_bn = [[0, 1, 0]] * 6
  return {"cams": f(cams), "proj_fg": f(z_fg), "proj_bg": f(z_bg), "proj_bg_bn": f(z_bg_bn),
          "bg_logit": jnp.array([[[0.0, 0.0, 0.0, 0.0, 2.0, -1.0]]])}


def _extra(s, k=2):
  return {"bank": fbr.init_bank(s),
          "protos": jnp.zeros((k, s.proj_dim)), "proto_valid": jnp.zeros((k,), bool)}


def test_bank_keeps_nrois_in_fifo_order():
  # Each image has 2 distinct background pixels (< K), so its NROIs are those pixels and
  # the bank content is known exactly; 3 steps of 2 NROIs into a bank of 5.
  _, s = _settings(proj_dim=3, bank_size=5, num_clusters=4, proto_topk_div=6)
  cams = [[1.0, 0.0], [0.3, 0.0], [0.0, 1.0], [0.0, 0.2], [0.0, 0.0], [0.0, 0.0]]
  extra = _extra(s)
  pushed = []
  for t in range(3):
    out = _hand_outputs([t + 1.0, 0.0, 0.0], cams)
    out["proj_bg"] = out["proj_bg"].at[0, 0, 5].set(jnp.array([0.0, t + 1.0, 0.0]))
    _, metrics, extra = _terms(s, out, jnp.ones((1, 2)), extra, jax.random.key(t))
    pushed.append({(t + 1.0, 0.0, 0.0), (0.0, t + 1.0, 0.0)})
    assert float(metrics["fbr/nrois_per_image"]) == 2.0
  items, valid = memory.fifo_ordered(extra["bank"])
  got = [tuple(np.asarray(v).tolist()) for v in np.asarray(items["feat"])[np.asarray(valid)]]
  assert int(extra["bank"].count) == 5
  # Oldest first: step 0 lost its first NROI, then both of step 1, both of step 2.
  assert got[0] in pushed[0] and set(got[1:3]) == pushed[1] and set(got[3:5]) == pushed[2]


def test_bank_fill_and_age_of_draws():
  # 2 NROIs per step (as above) into a bank of 5 at steps 0, 10, 20. Contents after each
  # push (push steps): {0, 0}, {0, 0, 10, 10}, {0, 10, 10, 20, 20} (one step-0 NROI
  # overwritten). Uniform draws -> expected mean age = mean over the filled slots.
  _, s = _settings(proj_dim=3, bank_size=5, num_clusters=4, proto_topk_div=6,
                   num_bank_negatives=4000)
  cams = [[1.0, 0.0], [0.3, 0.0], [0.0, 1.0], [0.0, 0.2], [0.0, 0.0], [0.0, 0.0]]
  extra = _extra(s)
  want = [(2 / 5, 0.0), (4 / 5, (10 + 10 + 0 + 0) / 4), (1.0, (20 + 10 + 10 + 0 + 0) / 5)]
  for t, (fill, age) in enumerate(want):
    out = _hand_outputs([t + 1.0, 0.0, 0.0], cams)
    out["proj_bg"] = out["proj_bg"].at[0, 0, 5].set(jnp.array([0.0, t + 1.0, 0.0]))
    _, metrics, extra = jax.jit(fbr.fbr_terms, static_argnums=(0, 5))(
        s, out, jnp.ones((1, 2)), extra, jax.random.key(t), JIT_CTX, 10 * t)
    assert float(metrics["fbr/bank_fill"]) == pytest.approx(fill)
    # Ages of 4000 uniform draws: 4-sigma tolerance of the mean (ages span <= 20).
    assert abs(float(metrics["fbr/bank_age"]) - age) <= 4 * 10 / math.sqrt(4000) + 1e-6
  np.testing.assert_array_equal(np.sort(np.asarray(extra["bank"].items["step"])),
                                [0, 10, 10, 20, 20])
  # Hand-made bank: exact age of given draws; an empty bank reports age 0.
  bank = memory.FifoBank({"feat": jnp.zeros((8, 2)), "step": jnp.array([3, 5, 5, 7] + [0] * 4)},
                         jnp.array(4, jnp.int32), jnp.array(4, jnp.int32))
  stats = fbr.bank_draw_stats(bank, jnp.array([3, 7, 7]), jnp.array(True), jnp.array(9))
  assert float(stats["fbr/bank_fill"]) == 0.5
  assert float(stats["fbr/bank_age"]) == pytest.approx((6 + 2 + 2) / 3)
  empty = fbr.bank_draw_stats(bank._replace(count=jnp.array(0)), jnp.array([0, 0]),
                              jnp.array(False), jnp.array(9))
  assert float(empty["fbr/bank_age"]) == 0.0


def test_bank_size_from_schedule():
  # The paper: 8 NROIs x batch 8 x 20,000 steps with a 50k bank.
  assert fbr.bank_size_for_schedule(20000, 8, 8) == 50000
  assert fbr.bank_size_for_schedule(200, 8, 8) == round(200 * 64 * 50000 / 1280000) == 500
  assert fbr.bank_size_for_schedule(1, 8, 8) == 64          # at least one step's NROIs
  cfg, s = _settings(bank_frac=0.1)
  assert s.bank_size == round(0.1 * cfg.train.num_steps * cfg.data.batch_size * 4)
  with pytest.raises(ValueError, match="bank_frac"):
    _settings(bank_frac=-1.0)


def test_padding_is_never_background():
  """The hand case with pixel 5 (background, its own NROI) marked as crop padding: it is
  no seed, pushes no NROI, and leaves L_seg; the GT diagnostics count the rest."""
  _, s = _settings(proj_dim=3, proto_topk_div=6, num_clusters=4)
  out = _hand_outputs([0.0, 2.0, 0.0])
  out["proj_bg"] = out["proj_bg"].at[0, 0, 5].set(jnp.array([5.0, 0.0, 0.0]))
  valid = jnp.array([[[True] * 5 + [False]]])
  gt = jnp.array([[[1, 1, 2, 0, 0, 255]]])
  _, m_all, e_all = _terms(s, out, jnp.ones((1, 2)), _extra(s), jax.random.key(0))
  losses, metrics, extra = jax.jit(fbr.fbr_terms, static_argnums=(0, 5))(
      s, out, jnp.ones((1, 2)), _extra(s), jax.random.key(0), JIT_CTX, 0, valid, gt)
  ratio = lambda v: float(v[0]) / float(v[1])  # (numerator, denominator) metrics
  # Without `valid`: both background pixels are seeds and push their own NROI.
  assert int(e_all["bank"].count) == 2 and ratio(m_all["fbr/bg_frac"]) == pytest.approx(2 / 6)
  assert int(extra["bank"].count) == 1
  np.testing.assert_allclose(extra["bank"].items["feat"][0], [0.0, 2.0, 0.0])
  assert ratio(metrics["fbr/bg_frac"]) == pytest.approx(1 / 5)
  assert float(metrics["fbr/nrois_per_image"]) == 1.0
  # L_seg over the 5 image pixels: logits 0 (4x, targets 0 / 1 alike: log 2) and 2 (target 1).
  want_seg = np.mean([math.log(2)] * 4 + [math.log(1 + math.exp(-2))])
  np.testing.assert_allclose(losses["seg"], want_seg, rtol=1e-6)
  # Queries are pixels 1 (GT 1) and 3 (GT 0); the one background seed is GT background.
  assert ratio(metrics["fbr/query_gt_bg"]) == pytest.approx(0.5)
  assert ratio(metrics["fbr/bg_seed_gt_bg"]) == 1.0
  np.testing.assert_allclose(metrics["fbr/query_frac"], (2.0, 5.0))


# ---------------------------------------------------------------- active sampling


def test_active_sampling_follows_softmax_of_prototype_similarity():
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(5, 6)).astype(np.float32)
  valid = np.array([True, True, False, True, True])
  probs = F.active_class_probs(protos, valid, 0.5)
  pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
  sim = pn @ pn.T / 0.5
  for c in range(5):
    allowed = valid & (np.arange(5) != c)
    want = np.where(allowed, np.exp(sim[c] - sim[c][allowed].max()), 0.0)
    np.testing.assert_allclose(probs[c], want / want.sum(), rtol=1e-5, atol=1e-7)
  # Draws: pool of 30 pixels; class 4 has 3 pixels, -1 = background.
  pool = np.array([0] * 10 + [1] * 7 + [3] * 5 + [4] * 3 + [-1] * 5, np.int32)
  rng.shuffle(pool)
  a, m = 1, 200000
  key1, key2 = jax.random.split(jax.random.key(0))
  idx, cls, ok = jax.jit(F.sample_active_negatives)(probs[jnp.array([1])], jnp.asarray(pool),
                                                    jax.random.uniform(key1, (a, m)),
                                                    jax.random.uniform(key2, (a, m)))
  idx, cls = np.asarray(idx[0]), np.asarray(cls[0])
  assert bool(ok.all())
  np.testing.assert_array_equal(pool[idx], cls)            # the pixel is of that class
  freq = np.bincount(cls, minlength=5) / m
  # 3-sigma binomial tolerance around the softmax of the similarities of class 1.
  tol = 3 * np.sqrt(np.asarray(probs[1]) * (1 - np.asarray(probs[1])) / m) + 1e-9
  assert np.all(np.abs(freq - np.asarray(probs[1])) <= tol), (freq, probs[1])
  assert freq[1] == 0 and freq[2] == 0                      # itself, absent class
  # Within class 4 the pixel is uniform over its 3 pixels.
  within = np.bincount(idx[cls == 4], minlength=30)[pool == 4] / np.sum(cls == 4)
  np.testing.assert_allclose(within, 1 / 3, atol=0.02)
  # A class with no other valid class has no negatives.
  lone = F.active_class_probs(protos, np.array([True, False, False, False, False]), 0.5)
  _, _, ok = F.sample_active_negatives(lone[jnp.array([0])], jnp.asarray(pool),
                                       jnp.full((1, 4), 0.5), jnp.full((1, 4), 0.5))
  assert not bool(ok.any())


# ---------------------------------------------------------------- losses


def test_fbr_losses_hand_case():
  """1x6 image, 2 classes, top-1 prototypes: every draw is determined, so L_FB and L_IF
  are hand-computable.

  pixels: 0 sure c1, 1 query c1, 2 sure c2, 3 query c2, 4 and 5 background.
  Z_fg: p_1 = e0, p_2 = e2; query 1 = (e0+e1)/sqrt2, query 3 = e2; the c2 pixels share
  one direction (e2) and the c1 pixels are orthogonal to e2, so every IF negative of
  both queries has cosine 0. Both BG pixels have Z_bg = e1: one NROI, all 16 bank draws.
  """
  for code_compat in (False, True):
    _, s = _settings(proj_dim=3, proto_topk_div=6, code_compat=code_compat)
    losses, metrics, extra = _terms(s, _hand_outputs([0.0, 2.0, 0.0]), jnp.ones((1, 2)),
                                     _extra(s), jax.random.key(0))
    r2 = 1 / math.sqrt(2)
    lfb = lambda pos, neg, t: -math.log(math.exp(pos / t) / (math.exp(pos / t)
                                                             + 16 * math.exp(neg / t)))
    want_fb = (lfb(r2, r2, s.tau_fb) + lfb(1.0, 0.0, s.tau_fb)) / 2
    want_if = (lfb(r2, 0.0, s.tau_if) + lfb(1.0, 0.0, s.tau_if)) / 2
    np.testing.assert_allclose(losses["fb"], want_fb, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(losses["if"], want_if, rtol=1e-5, atol=2e-6)
    # BG targets: sum M < 0.05 at pixels 4, 5; logits 0 elsewhere.
    want_seg = np.mean([math.log(2)] * 4 + [math.log(1 + math.exp(-2)),
                                            math.log(1 + math.exp(1))])
    np.testing.assert_allclose(losses["seg"], want_seg, rtol=1e-6)
    assert int(extra["bank"].count) == 1 and float(metrics["fbr/classes"]) == 2
    np.testing.assert_allclose(metrics["fbr/query_frac"][0], 2.0)
    if code_compat:  # L_sim: mean cos(Z_fg, BN->ReLU Z_bg = e1), not of Z_bg itself.
      third = 1 / math.sqrt(3)
      want_sim = np.mean([0.0, 1 / math.sqrt(2), 0.0, 0.0, third, third])
      np.testing.assert_allclose(losses["sim"], want_sim, rtol=1e-5)
    else:
      assert float(losses["sim"]) == 0.0
  assert (s.lambda_fb, s.lambda_if, s.lambda_seg, s.lambda_sim, s.tau_if) == (
      0.01, 0.1, 0.1, 0.1, 0.5)


def test_settings_modes_and_validation():
  _, paper = _settings()
  assert (paper.lambda_fb, paper.lambda_if, paper.lambda_seg, paper.lambda_sim) == (
      0.1, 0.01, 0.01, 0.0)
  assert (paper.tau_fb, paper.tau_if) == (0.5, 0.1)
  _, mixed = _settings(code_compat=True, lambda_fb=0.2)
  assert mixed.lambda_fb == 0.2 and mixed.lambda_if == 0.1
  cfg, _ = _settings()
  cfg.fbr.tau_fb = 0.0
  with pytest.raises(ValueError, match="fbr.tau_fb"):
    fbr.settings_from_config(cfg)
  cfg, _ = _settings()
  cfg.fbr.nope = 1
  with pytest.raises(ValueError, match="fbr.nope"):
    fbr.settings_from_config(cfg)
  cfg, _ = _settings()
  cfg.fbr.query_rule = "fancy"
  with pytest.raises(ValueError, match="fbr.query_rule"):
    fbr.settings_from_config(cfg)
  assert paper.query_rule == "threshold" and mixed.query_rule == "unsure"


# ---------------------------------------------------------------- gradients and the step


@pytest.mark.parametrize("code_compat", [False, True])
def test_fb_gradient_reaches_fg_projection_only_in_paper_mode(code_compat):
  cfg, s = _settings(code_compat=code_compat)
  model = FBRNet(TinyBackbone(), 5, proj_dim=s.proj_dim, bg_dropout=0.0)
  batch = make_batches(1, batch=4)[0]
  labels = jnp.ones((4, 4))
  variables = model.init(jax.random.key(0), batch["image"], train=False)

  def term(params, name):
    out = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                      batch["image"], train=False)
    losses, metrics, _ = fbr.fbr_terms(s, out, labels, _extra(s, 4), jax.random.key(1),
                                       JIT_CTX)
    return losses[name], metrics

  (l_fb, metrics), g_fb = jax.jit(jax.value_and_grad(lambda p: term(p, "fb"), has_aux=True))(
      variables["params"])
  assert float(metrics["fbr/query_frac"][0]) > 0 and float(l_fb) > 0  # not vacuous
  g_if = jax.jit(jax.grad(lambda p: term(p, "if")[0]))(variables["params"])
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))
  assert norm(g_if["proj_fg"]) > 1e-6  # L_IF trains Z_fg in both modes
  assert norm(g_fb["proj_bg"]) == 0.0  # NROIs are detached centroids
  if code_compat:
    assert norm(g_fb) == 0.0
  else:
    assert norm(g_fb["proj_fg"]) > 1e-6 and norm(g_fb["backbone"]) > 1e-6


def test_fbr_net_bg_bn_activation():
  """`proj_bg_bn` = ReLU(BN(conv_bg f)): in eval mode with fresh statistics (mean 0, var 1)
  and a hand-set BN affine (scale 2, bias -0.5) it is ReLU(2 pre / sqrt(1 + eps) - 0.5),
  where ReLU(pre) = `proj_bg` (pre <= 0 gives 0 either way)."""
  model = FBRNet(TinyBackbone(), 5, proj_dim=8, bg_dropout=0.0)
  image = make_batches(1, batch=2)[0]["image"]
  variables = model.init(jax.random.key(0), image, train=False)
  # The BN's affine leaves ('scale', 'bias', wherever Norm nests them): 2 and -0.5.
  affine = lambda path, v: (jnp.full_like(v, 2.0) if "scale" in jax.tree_util.keystr(path)
                            else jnp.full_like(v, -0.5))
  params = {**variables["params"],
            "bg_norm": jax.tree_util.tree_map_with_path(affine, variables["params"]["bg_norm"])}
  out = model.apply({**variables, "params": params}, image, train=False)
  eps = 1e-5
  want = np.maximum(2 * np.asarray(out["proj_bg"]) / np.sqrt(1 + eps) - 0.5, 0.0)
  np.testing.assert_allclose(out["proj_bg_bn"], want, rtol=1e-4, atol=1e-5)
  assert float(jnp.mean(out["proj_bg_bn"] > 0)) > 0.05                 # not vacuous
  assert not np.allclose(out["proj_bg_bn"], out["proj_bg"], atol=1e-3)


@pytest.mark.parametrize("mode", [{}, {"code_compat": True, "proto_ema": 0.5}])
def test_fbr_step_sharded_equals_unsharded(mode):
  cfg, s = _settings(**mode)
  method = fbr.make_fbr_method(cfg, 5, model=FBRNet(TinyBackbone(), 5, proj_dim=s.proj_dim,
                                                    bg_dropout=0.0))
  batches = make_batches(3)
  rng = np.random.default_rng(0)
  for bt in batches:  # Crop padding of unequal size per device, and ground-truth masks.
    valid = np.ones(bt["image"].shape[:3], bool)
    for i, cols in enumerate(rng.integers(0, 12, len(valid))):
      valid[i, :, 16 - cols:] = False
    bt["image"][~valid] = 0.0
    bt["valid"] = valid
    bt["mask"] = np.where(valid, rng.integers(0, 5, valid.shape), 255).astype(np.int32)
  ref, ref_hist = run_steps(method, cfg, 1, "jit", batches)
  got, hist = run_steps(method, _settings(**mode)[0], 8, "shard_map", batches)
  assert 0 < float(ref_hist[-1]["fbr/query_gt_bg"]) < 1
  assert max_abs_diff(got.params, ref.params) < 2e-6
  assert max_abs_diff(got.extra, ref.extra) < 1e-5
  assert int(ref.extra["bank"].count) > 0 and float(ref_hist[-1]["loss_if"]) > 0
  for k in ref_hist[-1]:
    np.testing.assert_allclose(hist[-1][k], ref_hist[-1][k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
