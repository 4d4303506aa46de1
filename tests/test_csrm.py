"""CSRM (METHODS.md §2): losses on hand-computed cases, queues, schedules, ClassMix, the
full step sharded vs unsharded, and a short run."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from conftest import load_config_file
from tiny_model import make_batches, max_abs_diff, run_steps, tiny_config
from tiny_model import fast_compile  # noqa: F401  (module fixture)
from wsss_jax.methods import csrm
from wsss_jax.models.csrm_net import CSRMNet
from wsss_jax.ops import classmix as cm
from wsss_jax.ops import csrm_losses as L
from wsss_jax.ops import memory

pytestmark = pytest.mark.usefixtures("fast_compile")
C = 5  # background + 4


# ----------------------------------------------------------------------------- schedules


def test_schedule_values():
  # spe 10, E 15, warm-up 1 (reference VOC shape with short epochs).
  s = L.schedule(jnp.int32(0), 10, 15, 1)
  assert int(s.epoch) == 0 and float(s.active) == 0 and float(s.w_s2c) == 0
  assert float(s.keep_percent) == pytest.approx(80.0)
  assert float(s.alpha_percent) == pytest.approx(20.0)
  s = L.schedule(jnp.int32(19), 10, 15, 1)     # epoch 1: losses on, ramp starts at 0.1
  assert int(s.epoch) == 1 and float(s.active) == 1
  assert float(s.w_s2c) == pytest.approx(0.1)
  assert float(s.keep_percent) == pytest.approx(100 - 20 * (1 - 1 / 15))
  assert float(s.alpha_percent) == pytest.approx(20 * (1 - 1 / 15))
  s = L.schedule(jnp.int32(149), 10, 15, 1)    # last epoch 14: 0.1 + 0.9 * 13/14
  assert float(s.w_s2c) == pytest.approx(0.1 + 0.9 * 13 / 14, rel=1e-6)


def test_ema_decay_values():
  spe, w = 10, 1
  # Inclusive (reference): copy through epoch 1 (steps 0..19), EMA from step 20. The
  # reference's counter already counts the update the EMA follows: at step 20 it reads 21,
  # d = 1 - 1 / (1 + 21 - 10).
  for step in (0, 9, 10, 19):
    assert float(L.ema_decay(jnp.int32(step), spe, w)) == 0.0
  assert float(L.ema_decay(jnp.int32(20), spe, w)) == pytest.approx(1 - 1 / 12)
  assert float(L.ema_decay(jnp.int32(25), spe, w)) == pytest.approx(1 - 1 / 17)
  assert float(L.ema_decay(jnp.int32(200), spe, w)) == pytest.approx(0.99)  # capped
  # count_current=False: the count before the increment (1 - 1 / (1 + 20 - 10)).
  assert float(L.ema_decay(jnp.int32(20), spe, w, count_current=False)) == pytest.approx(
      1 - 1 / 11)
  # Exclusive: EMA starts with the losses, at step 10 (d = 1 - 1/2, then 1 - 1/3 ...).
  assert float(L.ema_decay(jnp.int32(10), spe, w, copy_inclusive=False)) == pytest.approx(0.5)
  assert float(L.ema_decay(jnp.int32(11), spe, w, copy_inclusive=False,
                           count_current=False)) == pytest.approx(0.5)


@pytest.mark.parametrize("ema_batch_stats", [False, True])
def test_update_extra_ema_and_copy(ema_batch_stats):
  cfg = _cfg(steps_per_epoch=2, warmup_epochs=1, ema_batch_stats=ema_batch_stats)
  method = csrm.make_csrm_method(cfg, C, model=_tiny_model())
  extra = {"teacher": {"params": {"w": jnp.zeros(3)}, "batch_stats": {"m": jnp.zeros(2)}},
           "bank_bg": 1, "bank_fg": 2}
  aux = {"bank_bg": 3, "bank_fg": 4}
  student, student_bs = {"w": jnp.ones(3)}, {"m": jnp.full(2, 4.0)}
  out = method.update_extra(extra, student, student_bs, aux, jnp.int32(3), None)  # copy
  np.testing.assert_allclose(out["teacher"]["params"]["w"], 1.0)
  assert out["bank_bg"] == 3 and out["bank_fg"] == 4
  # Reference (ema_batch_stats=False): parameters only; the statistics stay the teacher's.
  np.testing.assert_allclose(out["teacher"]["batch_stats"]["m"],
                             4.0 if ema_batch_stats else 0.0)
  # Step 4 = the 5th update, 2 warm-up steps: d = 1 - 1 / (1 + 5 - 2) = 3/4.
  out = method.update_extra(extra, student, student_bs, aux, jnp.int32(4), None)
  np.testing.assert_allclose(out["teacher"]["params"]["w"], 1 / 4, rtol=1e-6)
  np.testing.assert_allclose(out["teacher"]["batch_stats"]["m"],
                             1.0 if ema_batch_stats else 0.0, rtol=1e-6)


def test_batch_norm_heads_need_ema_batch_stats():
  with pytest.raises(ValueError, match="ema_batch_stats"):
    csrm.make_csrm_method(_cfg(head_norm="batch"), C, model=_tiny_model())


# ----------------------------------------------------------------------------- queues


def test_bank_enqueue_truncation_order():
  q = 4
  bank = memory.fifo_init(q, jnp.zeros((1,), jnp.float32))
  feats = jnp.arange(10, dtype=jnp.float32)[:, None]
  mask = jnp.array([1, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)          # items 0, 2, 3
  idx, ok = L.newest_masked(mask, q)
  np.testing.assert_array_equal(np.asarray(idx)[:3], [0, 2, 3])
  np.testing.assert_array_equal(ok, [1, 1, 1, 0])
  bank = memory.fifo_enqueue(bank, feats[idx], ok)
  mask = jnp.array([0, 1, 0, 0, 1, 1, 0, 1, 1, 0], bool)          # 1, 4, 5, 7, 8
  idx, ok = L.newest_masked(mask, q)
  np.testing.assert_array_equal(idx, [4, 5, 7, 8])                  # newest Q, in order
  bank = memory.fifo_enqueue(bank, feats[idx], ok)
  items, valid = memory.fifo_ordered(bank)
  assert bool(valid.all())
  # FIFO over both calls: 0 2 3 | 1 4 5 7 8 -> keep the newest 4.
  np.testing.assert_array_equal(np.asarray(items)[:, 0], [4, 5, 7, 8])


# ----------------------------------------------------------------------------- losses


def test_classification_loss_smoothing():
  logits = jnp.array([[2.0, -1.0]])
  labels = jnp.array([[1.0, 0.0]])
  got = float(L.classification_loss(logits, labels, 0.1)[0])
  sig = lambda z: 1 / (1 + math.exp(-z))
  y = [0.95, 0.05]
  want = -np.mean([y[k] * math.log(sig(z)) + (1 - y[k]) * math.log(1 - sig(z))
                   for k, z in enumerate([2.0, -1.0])])
  assert got == pytest.approx(want, rel=1e-6)


def test_cam_pseudo_masks_double_threshold():
  # One image 1x4, K = 2, class 1 present only. Normalised CAM of class 1: [1, .5, .2, .01].
  cams = jnp.array([[[[1.0, 9.0], [0.5, 9.0], [0.2, 9.0], [0.01, 9.0]]]])   # [1,1,4,2]
  labels = jnp.array([[1.0, 0.0]])
  rgb = jnp.zeros((1, 1, 4, 3))
  got = L.cam_pseudo_masks(cams, labels, rgb, 0.30, 0.05, use_crf=False)
  # > 0.30: class 1; between 0.05 and 0.30: 255; below 0.05: background.
  np.testing.assert_array_equal(got, [[[1, 1, 255, 0]]])


def test_c2s_targets_and_ce():
  y_cam = jnp.array([[[1, 255]], [[0, 0]], [[2, 0]]])                 # [3,1,2]
  is_l = jnp.array([True, True, False])
  t = L.c2s_targets(y_cam, is_l)
  # Image 1 has no foreground pixel, image 2 is U: both ignored.
  np.testing.assert_array_equal(t, [[[1, 255]], [[255, 255]], [[255, 255]]])
  logits = jnp.zeros((3, 1, 2, C)).at[0, 0, 0, 1].set(2.0)
  s, n = L.ce_sum_count(logits, t, 0.1)
  p = np.exp([0, 2, 0, 0, 0]) / np.exp([0, 2, 0, 0, 0]).sum()
  target = np.full(C, 0.1 / C)
  target[1] += 0.9
  assert float(n) == 1 and float(s) == pytest.approx(-(target * np.log(p)).sum(), rel=1e-5)


def test_s2c_targets_threshold_and_stopgrad():
  probs = jnp.array([[[[0.6, 0.4], [0.45, 0.55], [0.5, 0.5]]]])        # [1,1,3,2]
  seg = jnp.zeros((1, 1, 3, 2))
  cams = jnp.zeros((1, 1, 3, 1))
  z, t = L.s2c_logits_targets(seg, cams, probs, 0.5)
  np.testing.assert_array_equal(t, [[[0, 1, 255]]])                   # 0.5 is not > 0.5
  grad_seg, grad_cam = jax.grad(
      lambda s, a: L.ce_sum_count(*L.s2c_logits_targets(s, a, probs, 0.5))[0],
      argnums=(0, 1))(seg, cams)
  assert float(jnp.abs(grad_seg).max()) == 0.0   # student bg logit is detached
  assert float(jnp.abs(grad_cam).max()) > 0.0


def test_label_masked_probs():
  logits = jnp.log(jnp.array([[[[0.2, 0.3, 0.5]]]]))
  p = L.label_masked_probs(logits, jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(p[0, 0, 0], [0.4, 0.6, 0.0], rtol=1e-6)


def test_unsup_targets_keep_and_weight():
  # 2 images of 1x5; image 1 is U. Entropies 0..4; keep 60 %: θ = percentile 60 = 2.4.
  ent = jnp.array([[[9.0] * 5], [[0.0, 1.0, 2.0, 3.0, 4.0]]])
  arg = jnp.array([[[1] * 5], [[0, 1, 2, 3, 4]]])
  t, w = L.unsup_targets(arg, ent, jnp.array([False, True]), jnp.float32(60.0))
  np.testing.assert_array_equal(t, [[[255] * 5], [[0, 1, 2, 255, 255]]])
  assert float(w) == pytest.approx(5 / 3)


def test_unsup_targets_keep_the_lowest_entropy_pixels():
  # keep_percent = 80 (the first epoch's value): of the 10 U pixels, the 8 with the lowest
  # entropy keep their teacher label, the 2 most uncertain (entropies 8 and 9, at pixels 1
  # and 6) become 255. θ = np.percentile(0..9, 80) = 7.2. The L image (row 0, entropies all
  # low) is never a target. Weight = 10 / 8.
  ent = np.array([3, 9, 0, 5, 1, 7, 8, 2, 6, 4], np.float32)
  u_ent = jnp.asarray(np.stack([np.zeros(10, np.float32), ent])[:, None, :])
  arg = jnp.asarray(np.stack([np.ones(10), np.arange(10) % 3])[:, None, :].astype(np.int32))
  sched = L.schedule(jnp.int32(0), 10, 15, 1)
  assert float(sched.keep_percent) == pytest.approx(80.0)
  t, w = L.unsup_targets(arg, u_ent, jnp.array([False, True]), sched.keep_percent)
  want = np.where(np.isin(np.arange(10), [1, 6]), 255, np.arange(10) % 3)
  np.testing.assert_array_equal(t[1, 0], want)
  np.testing.assert_array_equal(t[0], 255)
  assert int(np.sum(np.asarray(t[1]) != 255)) == 8
  assert float(w) == pytest.approx(10 / 8)


def test_contrast_masks_rank_rules():
  # Two 1x2 images, C = 3; image 0 is L (CAM labels [1, 255]), image 1 is U (labels [0, 2],
  # image label: class 1 only). alpha 50 %: U low = entropy below the median.
  labels4 = jnp.array([[[1, 255]], [[0, 2]]])
  probs = jnp.array([[[[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]]],
                     [[[0.8, 0.1, 0.1], [0.2, 0.35, 0.45]]]])
  ent = L.entropy(probs)
  m = L.contrast_masks(labels4, probs, ent, jnp.array([False, True]),
                       jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.float32(50.0),
                       low_rank=1, high_rank=2, positive_threshold=0.3)
  # Pixels in order: (L,0) (L,1) (U,0) (U,1). U entropies: (U,0) low, (U,1) high.
  # Prototype sets: label c & low. L pixel 0 (label 1) is low; 255 is not.
  np.testing.assert_array_equal(m.proto, [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  # Anchors additionally need prob[c] > 0.3: (L,0) class 1 has 0.5; (U,0) bg 0.8.
  np.testing.assert_array_equal(m.anchor, m.proto)
  # Negatives (high mask): L pixel 0 (labelled 1): top-1 class is 1 = its label -> none.
  # U pixel 1 (high): top-1 class 2 not in image label -> queue 2; rank-1 (mid) class 1
  # -> queue 1.
  np.testing.assert_array_equal(m.negative, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
  m2 = L.contrast_masks(labels4, probs, ent, jnp.array([False, True]),
                        jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.float32(50.0),
                        low_rank=1, high_rank=2, unlabeled_use_labels=False)
  np.testing.assert_array_equal(m2.negative, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_contrast_loss_hand_computed():
  tau = 0.5
  # Class 0: anchors e1 (x2), prototype e1, negatives e2 and -e1 -> per-anchor loss
  # -log(e^2 / (e^2 + e^0 + e^-2)). Class 1: valid but its queue is empty (skipped, still
  # counted). Class 2: not valid.
  e1, e2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
  anchors = jnp.stack([jnp.stack([e1, 3 * e1])] * 3)
  protos = jnp.stack([2 * e1, e2, e2])
  negs = jnp.stack([jnp.stack([jnp.stack([e2, -e1])] * 2)] * 3)
  got = L.contrast_loss(anchors, jnp.array([True, True, True]), protos,
                        jnp.array([True, True, False]), negs,
                        jnp.array([True, False, True]), tau)
  per = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
  assert float(got) == pytest.approx(per / 2, rel=1e-6)
  only_one = L.contrast_loss(anchors, jnp.ones(3, bool), protos,
                             jnp.array([True, False, False]), negs, jnp.ones(3, bool), tau)
  assert float(only_one) == 0.0    # fewer than 2 valid classes


# ----------------------------------------------------------------------------- ClassMix


def test_classmix_consistency():
  key = jax.random.key(3)
  b, h, w = 4, 6, 6
  rng = np.random.default_rng(0)
  masks = jnp.asarray(rng.integers(0, 4, (b, h, w)).astype(np.int32)).at[:, 0, 0].set(255)
  images = jnp.asarray(rng.normal(size=(b, h, w, 3)).astype(np.float32))
  logits = jnp.asarray(rng.normal(size=(b, h, w, 4)).astype(np.float32))
  logits4 = logits[:, ::2, ::2]
  labels = jnp.zeros((b, 3))
  partner, chosen = cm.classmix_plan(jax.random.split(key)[1], masks, 4)
  mi, mm, ml, ext, paste = cm.classmix(key, images, masks, labels,
                                       {"l": logits, "l4": logits4}, num_classes=4,
                                       apply=jnp.bool_(True))
  partner, chosen = np.asarray(partner), np.asarray(chosen)
  assert np.all(partner != np.arange(b)) and not chosen[:, 0].any()
  for a in range(b):
    pm = np.asarray(masks[partner[a]])
    n = len(set(pm.ravel()) - {0, 255})
    assert chosen[a].sum() == max(n // 2, 1)
    want = np.isin(pm, np.nonzero(chosen[a])[0]) & (pm != 255)
    np.testing.assert_array_equal(paste[a], want)
    for got, src in ((mi, images), (ext["l"], logits)):
      np.testing.assert_array_equal(np.asarray(got[a])[want], np.asarray(src[partner[a]])[want])
      np.testing.assert_array_equal(np.asarray(got[a])[~want], np.asarray(src[a])[~want])
    np.testing.assert_array_equal(np.asarray(mm[a])[want], pm[want])
    np.testing.assert_array_equal(ml[a], chosen[a, 1:].astype(np.float32))
    # Low-resolution extras follow the (nearest, legacy) downsampled paste mask.
    np.testing.assert_array_equal(np.asarray(ext["l4"][a])[want[::2, ::2]],
                                  np.asarray(logits4[partner[a]])[want[::2, ::2]])
  _, _, ml0, _, paste0 = cm.classmix(key, images, masks, labels, None, num_classes=4,
                                     apply=jnp.bool_(False))
  assert not bool(paste0.any()) and float(ml0.sum()) == 0


# ----------------------------------------------------------------------------- full step


class _TinyBackbone(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    s4 = nn.relu(nn.Conv(8, (3, 3), strides=(4, 4), name="c4")(x))
    s4 = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(s4)
    s8 = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="c8")(s4))
    return {"stride4": s4, "stride8": s8, "out": s8}


class _TinyCSRM(nn.Module):
  """CSRMNet's output contract without dropout (shard_map draws other dropout masks)."""
  @nn.compact
  def __call__(self, images, train: bool = False):
    f = _TinyBackbone(name="backbone")(images, train)
    cams = nn.Conv(C - 1, (1, 1), use_bias=False, name="cam_head")(f["out"])
    up = jax.image.resize(f["out"], f["stride4"].shape[:3] + (16,), "bilinear")
    feats = jnp.concatenate([up, f["stride4"]], axis=-1)
    return {"logits": cams.mean(axis=(1, 2)), "class_cams": cams, "cams": cams,
            "seg_logits": nn.Conv(C, (1, 1), name="decoder")(feats),
            "rep": nn.Conv(8, (1, 1), name="rep_head")(nn.relu(feats))}


def _tiny_model():
  return _TinyCSRM()


def _cfg(**csrm_overrides):
  cfg = tiny_config()
  cfg.method = "csrm"
  cfg.data.crop_size = 32
  cfg.optim.lr = 0.02
  cfg.csrm = mlc.ConfigDict(csrm.default_csrm_config())
  cfg.csrm.update(steps_per_epoch=1, warmup_epochs=1, num_queries=8, num_negatives=4,
                  bank_size_fg=48, bank_size_bg=64, rep_dim=8, use_crf=False,
                  teacher_pass2="eval")
  cfg.csrm.update(**csrm_overrides)
  return cfg


def test_step_sharded_equals_single_device():
  batches = make_batches(2, batch=16, size=32)   # 2 rows (one L, one U) per device
  cfg = _cfg()
  method = csrm.make_csrm_method(cfg, C, model=_tiny_model())
  ref, ref_hist = run_steps(method, cfg, 1, "jit", batches)
  # Step 1 runs the contrast (epoch >= warm-up) on queues filled in that step.
  assert ref_hist[-1]["contrast_used_classes"] >= 1 and ref_hist[-1]["active"] == 1
  assert float(ref_hist[-1]["l_contra"]) > 0
  for n_dev, impl in ((8, "jit"), (8, "shard_map")):
    got, hist = run_steps(method, _cfg(), n_dev, impl, batches)
    assert max_abs_diff(got.params, ref.params) < 1e-4, impl
    assert max_abs_diff(got.extra, ref.extra) < 1e-4, impl    # teacher and queues
    for m, r in zip(hist, ref_hist):
      for k in ("loss", "l_c2s", "l_s2c", "l_u", "l_contra", "u_kept_fraction"):
        np.testing.assert_allclose(m[k], r[k], rtol=2e-4, atol=1e-5, err_msg=f"{impl} {k}")


def test_short_run_loss_decreases():
  # Constant schedule (warm-up over, one long epoch) and a fixed batch: the loss must fall.
  batches = make_batches(1, batch=8, size=32) * 8
  cfg = _cfg(steps_per_epoch=1000, warmup_epochs=0, classmix_prob=0.0)
  cfg.train.num_steps = 8
  method = csrm.make_csrm_method(cfg, C, model=_tiny_model())
  _, hist = run_steps(method, cfg, 1, "jit", batches)
  losses = [float(h["loss"]) for h in hist]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------- model


def test_csrm_net_warm_start_tree_matches_cam_net():
  from wsss_jax.models import registry
  from wsss_jax.models.csrm_net import build_csrm_net
  model_cfg = mlc.ConfigDict(dict(backbone="efficientnet_lite0", pretrained=False,
                                  output_stride=16, norm="group", frozen_bn=False,
                                  pool="gap", dtype="float32"))
  x = jnp.zeros((1, 64, 64, 3))
  shapes = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
  cam_v = shapes(registry.build_model(model_cfg, C, "cam"))
  net = build_csrm_net(model_cfg, C)
  csrm_v = shapes(net)
  flat = lambda t: {jax.tree_util.keystr(p): v.shape
                    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  cam_flat, csrm_flat = flat(cam_v), flat(csrm_v)
  assert cam_flat.items() <= csrm_flat.items()     # every CAMNet leaf, same path and shape
  assert set(csrm_v["params"]) == {"backbone", "cam_head", "decoder", "rep_head"}
  out = jax.eval_shape(lambda v: net.apply(v, x, train=False), csrm_v)
  assert out["seg_logits"].shape == (1, 16, 16, C) and out["rep"].shape == (1, 16, 16, 256)
  assert out["cams"].shape == (1, 4, 4, C - 1)
  seg = build_csrm_net(model_cfg, C, cams_from="seg")
  out = jax.eval_shape(lambda v: seg.apply(v, x, train=False), csrm_v)
  assert out["cams"].shape == (1, 16, 16, C - 1)
  # Narrow heads (CPU configs): same module names, the warm-start leaves are unchanged.
  narrow = build_csrm_net(model_cfg, C, head_width=64)
  narrow_v = shapes(narrow)
  assert cam_flat.items() <= flat(narrow_v).items()
  assert narrow_v["params"]["decoder"]["decoder1"]["conv"]["kernel"].shape == (3, 3, 64, 64)
  out = jax.eval_shape(lambda v: narrow.apply(v, x, train=False), narrow_v)
  assert out["seg_logits"].shape == (1, 16, 16, C) and out["rep"].shape == (1, 16, 16, 256)


def test_bad_config_value_names_key():
  with pytest.raises(ValueError, match="config.csrm.teacher_pass2"):
    csrm.make_csrm_method(_cfg(teacher_pass2="bogus"), C, model=_tiny_model())


def test_export_teacher_or_student():
  # After warm-up the EMA teacher lags the student; the later stages get the teacher
  # (the reference infers with it), or the student with export='student'.
  batches = make_batches(3, batch=8, size=32)
  cfg = _cfg(steps_per_epoch=1, warmup_epochs=0, classmix_prob=0.0)
  method = csrm.make_csrm_method(cfg, C, model=_tiny_model())
  state, _ = run_steps(method, cfg, 1, "jit", batches)
  teacher = method.export_variables(state.params, state.batch_stats, state.extra)
  assert max_abs_diff(teacher["params"], state.extra["teacher"]["params"]) == 0
  assert max_abs_diff(teacher["params"], state.params) > 1e-6
  student = csrm.make_csrm_method(_cfg(export="student"), C, model=_tiny_model())
  got = student.export_variables(state.params, state.batch_stats, state.extra)
  assert max_abs_diff(got["params"], state.params) == 0
  with pytest.raises(ValueError, match="config.csrm.export"):
    csrm.make_csrm_method(_cfg(export="ema"), C, model=_tiny_model())


@pytest.mark.parametrize("path,base_path", [("configs/synthetic/csrm.py",
                                             "configs/synthetic/cam.py"),
                                            ("configs/voc/csrm.py", "configs/voc/cam.py")])
def test_configs_follow_protocol_and_pick_head_norm(path, base_path):
  # CPU-sized configs, the protocol: the CAM config's shared baseline (same steps, same
  # optimizer block, so the same cached stage), then CSRM for the control's method steps;
  # BatchNorm heads and a long warm-up (README, "Why CSRM ...").
  arg = "" if path.startswith("configs/synthetic") else "runlocal"
  c, b = load_config_file(path, arg), load_config_file(base_path, arg)
  assert c.method == "csrm" and c.train.init_from == "baseline"
  assert c.baseline.num_steps == b.baseline.num_steps
  assert c.baseline.optim.to_dict() == b.baseline.optim.to_dict()
  assert c.train.num_steps == b.train.num_steps
  assert c.csrm.head_norm == "batch" and c.csrm.warmup_epochs >= 5
  assert c.csrm.warmup_epochs * c.csrm.steps_per_epoch < c.train.num_steps
  if path.startswith("configs/voc"):
    # The full VOC config is the reference recipe: the whole CAM schedule as the baseline
    # (cam.py's optimizer with Nesterov, clip 1.0 and LR 0.1), then 15 x 46 CSRM steps with
    # GroupNorm(4), 256-wide heads and 1 warm-up epoch.
    full, cam = load_config_file(path, ""), load_config_file(base_path, "")
    assert full.baseline.num_steps == cam.train.num_steps and full.train.num_steps == 690
    assert (full.csrm.head_norm, full.csrm.head_width, full.csrm.warmup_epochs) == (
        "group", 256, 1)
    want = dict(cam.optim.to_dict(), name="nesterov", clip_global_norm=1.0, lr=0.1)
    assert full.baseline.optim.to_dict() == want


@pytest.mark.parametrize("path,arg", [("configs/voc/csrm.py", "runlocal"),
                                      ("configs/voc/csrm.py", ""),
                                      ("configs/synthetic/csrm.py", ""),
                                      ("configs/synthetic/csrm.py", "runlocal"),
                                      ("configs/coco/csrm.py", "runlocal"),
                                      ("configs/coco/csrm.py", "")])
def test_configs_use_reference_optimizer(path, arg):
  # Reference runner (METHODS §2.4): SGD, Nesterov momentum 0.9, LR 0.007, poly 0.9,
  # global gradient-norm clip 1.0, in every variant (the CPU-sized ones included).
  o = load_config_file(path, arg).optim
  assert (o.name, o.momentum, o.lr, o.schedule, o.poly_power, o.clip_global_norm) == (
      "nesterov", 0.9, 0.007, "poly", 0.9, 1.0)


# ----------------------------------------------------------------------------- optimizer


def _csrm_groups(path, arg):
  """Optimizer group label per CSRM parameter path and the LR per group at step 0, with the
  optimizer that `config.optim` of the config file builds (abstract params, no compute)."""
  from wsss_jax.methods import csrm as csrm_method
  from wsss_jax.train import optim
  from wsss_jax.train import state as state_lib
  c = load_config_file(path, arg)
  c.model.pretrained = False
  method = csrm_method.make_csrm_method(c, 6)
  opt = state_lib.make_optimizer_for(method, c, {"image": (2, 64, 64, 3)})
  labels = {optim.path_str(p): l for p, l in
            jax.tree_util.tree_flatten_with_path(opt.labels)[0]}
  return c, labels, {g: float(v) for g, v in opt.learning_rates(0).items()}


@pytest.mark.parametrize("path,arg", [("configs/voc/csrm.py", "runlocal"),
                                      ("configs/voc/csrm.py", "backbone=efficientnet_lite0"),
                                      ("configs/synthetic/csrm.py", ""),
                                      ("configs/coco/csrm.py", "runlocal"),
                                      ("configs/coco/csrm.py", "backbone=efficientnet_lite0")])
def test_warm_started_classifier_trains_at_pretrained_lr(path, arg):
  # The reference trains the restored CAM classifier at the base LR (x1); the new decoder
  # and rep head train at x10 (LR_ALPHA_SCRATCH).
  c, labels, lrs = _csrm_groups(path, arg)
  group = lambda prefix: {l.split("/")[0] for p, l in labels.items()
                          if p.startswith(prefix)} - {"frozen"}
  assert group("cam_head/") == {"pretrained"}, labels
  assert group("backbone/") <= {"pretrained", "pretrained_bias"}
  assert group("decoder/") == group("rep_head/") == {"head", "head_bias"}
  base = float(c.optim.lr)
  assert lrs["pretrained"] == pytest.approx(base)
  assert lrs["head"] == pytest.approx(10 * base)
  # Reference LR_ALPHA_BIAS=1: biases train at their group's LR (1x / 10x), not 2x / 20x.
  assert lrs["pretrained_bias"] == pytest.approx(base)
  assert lrs["head_bias"] == pytest.approx(10 * base)
  # The baseline stage trains the CAM classifier from scratch: x10 there.
  assert c.train.init_from == "baseline"
  assert not re.search(c.baseline.optim.pretrained_regex, "cam_head/classifier/kernel")


@pytest.mark.parametrize("premix", [True, False])
def test_contrast_negatives_use_premix_labels(premix, monkeypatch):
  # The reference takes L_contra's "not in the image label" negatives from the labels before
  # ClassMix; with ClassMix on every image (p = 1) the mixed labels gain pasted classes.
  from wsss_jax.methods import base
  seen = []
  real = csrm.L.contrast_masks

  def spy(labels4, prob4, ent4, is_u, image_labels, *args, **kwargs):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), image_labels)
    return real(labels4, prob4, ent4, is_u, image_labels, *args, **kwargs)

  monkeypatch.setattr(csrm.L, "contrast_masks", spy)
  cfg = _cfg(classmix_prob=1.0, warmup_epochs=0, contrast_premix_labels=premix)
  method = csrm.make_csrm_method(cfg, C, model=_tiny_model())
  batch = {k: jnp.asarray(v) for k, v in make_batches(1, batch=4, size=32, seed=3)[0].items()}
  batch["labels"] = jnp.eye(4, dtype=jnp.float32)   # one distinct class per image
  v = method.init(jax.random.key(0), batch["image"][:1])
  extra = method.init_extra(jax.random.key(1), v)
  ctx = base.StepContext(model=method.model)
  _, aux = jax.jit(lambda p, s, e, b: method.loss(p, s, e, b, jax.random.key(2),
                                                  jnp.int32(0), ctx))(
      v["params"], v["batch_stats"], extra, batch)
  jax.effects_barrier()
  premix_labels = np.asarray(batch["labels"])
  assert len(seen) == 1
  if premix:
    np.testing.assert_array_equal(seen[0], premix_labels)
  else:
    assert (seen[0] >= premix_labels).all() and (seen[0] > premix_labels).any()
