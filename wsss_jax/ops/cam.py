"""CAM inference math (METHODS §1.1 S2–S4): multi-scale CAMs, thresholds, sweeps.

Conventions (docs/CONVENTIONS.md): CAMs have K = C - 1 channels over the foreground classes;
channel k holds class id k + 1. Image-level labels are multi-hot [K]. When a background plane
is put in front of the CAMs (channel 0), the channel index of the stacked array equals the
class id, which is what `cams_to_labels` returns.

Everything here is pure and shape-static: scales are static Python floats, batches carry
padded images with a per-image `size` [B, 2] (original H, W, top-left aligned) or a `valid`
mask, and every max / count only looks at valid pixels.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from wsss_jax.ops import IGNORE_INDEX
from wsss_jax.ops import crf as crf_ops
from wsss_jax.ops import metrics
from wsss_jax.ops import resize
from wsss_jax.ops import sizes

NORM_EPS = 1e-5  # IRN: cam / (max + 1e-5)


def _valid_masks(batch: int, full: tuple[int, int], strided: tuple[int, int],
                 size: jax.Array | None, valid: jax.Array | None):
  """(valid full [B, H, W] bool, valid strided [B, h, w] bool) or (None, None)."""
  if size is not None:
    size = jnp.asarray(size).reshape(batch, 2).astype(jnp.int32)
    def grid(shape):
      rows = jnp.arange(shape[0])[None, :, None]
      cols = jnp.arange(shape[1])[None, None, :]
      # A pixel of a grid of `shape` covering the full canvas is valid if its top-left
      # corner lies inside the image: index < ceil(size * shape / full).
      lim_h = (size[:, 0] * shape[0] + full[0] - 1) // full[0]
      lim_w = (size[:, 1] * shape[1] + full[1] - 1) // full[1]
      return (rows < lim_h[:, None, None]) & (cols < lim_w[:, None, None])
    return grid(full), grid(strided)
  if valid is not None:
    valid = jnp.asarray(valid).astype(bool).reshape((batch,) + full)
    # Legacy (corner) sampling: cell i is valid iff pixel floor(i * H / h) is, so a
    # top-left-aligned H' x W' image keeps ceil(H' * h / H) rows, like `size`.
    return valid, resize.resize_nearest(valid, strided, half_pixel=False)
  return None, None


def max_normalize(cams: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Per-image, per-class max normalisation over valid pixels: cam / (max + 1e-5) (IRN).

  Args:
    cams: float [B, H, W, K] non-negative class maps.
    valid: optional bool [B, H, W]; the max only looks at valid pixels and invalid pixels
      are set to 0.

  Returns:
    float32 [B, H, W, K].
  """
  cams = jnp.asarray(cams, jnp.float32)
  if valid is not None:
    cams = jnp.where(jnp.asarray(valid).astype(bool)[..., None], cams, 0.0)
  peak = cams.max(axis=(1, 2), keepdims=True)
  return cams / (peak + NORM_EPS)


def normalize_cams(cams: jax.Array, labels: jax.Array,
                   valid: jax.Array | None = None) -> jax.Array:
  """Keeps the image's classes (labels [B, K] > 0; others become 0), then `max_normalize`."""
  present = (jnp.asarray(labels) > 0).astype(jnp.float32)[:, None, None, :]
  return max_normalize(jnp.asarray(cams, jnp.float32) * present, valid)


def multiscale_cams(apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                    valid: jax.Array | None, labels: jax.Array,
                    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True, *,
                    size: jax.Array | None = None,
                    strided_size: tuple[int, int] | None = None,
                    out_size: tuple[int, int] | None = None, stride: int = 4,
                    up_stride: int | None = None, image_method: str = "cubic",
                    align_corners: bool = False,
                    normalize: bool = True) -> tuple[jax.Array, jax.Array]:
  """Multi-scale, flip-augmented CAMs of a batch (IRN `make_cam`, METHODS §1.1 S2).

  For each scale s: resize the images to round(s H) x round(s W), run `apply_fn`, ReLU, add
  the ReLU'd class maps of the horizontally flipped images (flipped back), resize to the
  stride-`stride` size and to the full size, and sum over scales. Then keep the image's
  classes and max-normalise each class map over its valid pixels (÷ (max + 1e-5)).

  Padded canvases: the whole canvas is rescaled, flipped and flipped back, so the flipped
  pass sees the padding on the other side and the network's receptive field reaches into
  it; results equal per-image (unpadded, IRN-style) processing only when the canvas is the
  image. Invalid pixels are zeroed and ignored by the normalisation.

  Args:
    apply_fn: images float [b, h, w, 3] -> raw class maps [b, h', w', K] (before ReLU), e.g.
      `lambda x: model.apply(variables, x, train=False)['cams']`. Called once per scale on a
      batch of 2B images when `flip` (original + flipped), else B.
    images: float [B, H, W, 3] (already normalised) or [H, W, 3]; padded canvases allowed.
    valid: optional bool [B, H, W] valid-pixel mask of the canvases (None: all valid, or
      `size`). A stride-s cell is valid when its top-left pixel is.
    labels: [B, K] or [K] multi-hot image labels.
    scales: static scale factors (IRN/PNOC: 1.0, 0.5, 1.5, 2.0).
    flip: add the horizontally flipped pass.
    size: optional int [B, 2] original (H, W) of each image inside its top-left-aligned
      padded canvas; pixels outside are invalid (takes precedence over `valid`).
    strided_size: static (h, w) of the low-resolution CAMs; default ceil(H / stride),
      ceil(W / stride) (IRN `get_strided_size`).
    out_size: static (h, w) of the high-resolution CAMs; default (H, W).
    stride: see `strided_size`.
    up_stride: if given (IRN: 16), high-res maps are first resized to the canvas size
      rounded up to a multiple of `up_stride` and then cropped (IRN `get_strided_up_size`);
      otherwise resized straight to `out_size`.
    image_method: `jax.image.resize` method for the input rescale ('cubic' ~ PIL bicubic as
      in IRN/CSRM; 'linear').
    align_corners: bilinear mode of the CAM resizes (False: IRN/PSA; True: PNOC/CSRM).
    normalize: restrict to the labels and max-normalise (True); False returns the raw sums
      (ReLU'd, flip- and scale-summed, invalid pixels zeroed).

  Returns:
    (high_res float32 [B, H', W', K], strided float32 [B, h, w, K]) (without the batch axis
    if `images` had none).
  """
  images = jnp.asarray(images)
  unbatched = images.ndim == 3
  if unbatched:
    images = images[None]
    labels = jnp.asarray(labels)[None]
    size = None if size is None else jnp.asarray(size).reshape(1, 2)
    valid = None if valid is None else jnp.asarray(valid)[None]
  b, h, w = images.shape[:3]
  if strided_size is None:
    strided_size = (math.ceil(h / stride), math.ceil(w / stride))
  if out_size is None:
    out_size = (h, w)
  strided_size = tuple(int(x) for x in strided_size)
  out_size = tuple(int(x) for x in out_size)
  if not scales:
    raise ValueError("need at least one scale")

  strided_sum = None
  high_sum = None
  for scale in scales:
    hs, ws = sizes.scaled_size(h, scale), sizes.scaled_size(w, scale)
    x = images
    if (hs, ws) != (h, w):
      x = jax.image.resize(images.astype(jnp.float32), (b, hs, ws, images.shape[-1]),
                           method=image_method)
    if flip:
      out = apply_fn(jnp.concatenate([x, x[:, :, ::-1]], axis=0))
      out = jax.nn.relu(out.astype(jnp.float32))
      out = out[:b] + out[b:, :, ::-1]
    else:
      out = jax.nn.relu(apply_fn(x).astype(jnp.float32))
    strided = resize.resize_bilinear(out, strided_size, align_corners=align_corners)
    if up_stride:
      up = (math.ceil(out_size[0] / up_stride) * up_stride,
            math.ceil(out_size[1] / up_stride) * up_stride)
      high = resize.resize_bilinear(out, up, align_corners=align_corners)
      high = high[:, :out_size[0], :out_size[1]]
    else:
      high = resize.resize_bilinear(out, out_size, align_corners=align_corners)
    strided_sum = strided if strided_sum is None else strided_sum + strided
    high_sum = high if high_sum is None else high_sum + high

  valid_full, valid_strided = _valid_masks(b, (h, w), strided_size, size, valid)
  if out_size == (h, w) or valid_full is None:
    valid_high = valid_full
  elif size is not None:
    valid_high, _ = _valid_masks(b, out_size, out_size,
                                 _rescale_size(size, (h, w), out_size), None)
  else:
    valid_high = resize.resize_nearest(valid_full, out_size, half_pixel=False)
  labels = jnp.asarray(labels)
  if normalize:
    strided_sum = normalize_cams(strided_sum, labels, valid_strided)
    high_sum = normalize_cams(high_sum, labels, valid_high)
  else:
    if valid_strided is not None:
      strided_sum = jnp.where(valid_strided[..., None], strided_sum, 0.0)
    if valid_high is not None:
      high_sum = jnp.where(valid_high[..., None], high_sum, 0.0)
  if unbatched:
    return high_sum[0], strided_sum[0]
  return high_sum, strided_sum


def _rescale_size(size, full, out):
  if size is None:
    return None
  size = jnp.asarray(size).astype(jnp.int32)
  scale = jnp.asarray([out[0] / full[0], out[1] / full[1]])
  return jnp.ceil(size * scale).astype(jnp.int32)


def cams_to_labels(cams: jax.Array, labels: jax.Array, threshold,
                   valid: jax.Array | None = None) -> jax.Array:
  """Hard labels from CAMs with a constant background plane (METHODS §1.1 S3).

  Stacks [t, cams] (a constant background plane of value t in front), takes the argmax and
  returns the channel index, which is the class id (CAM channel k = class k + 1). Classes
  absent from `labels` never win; ties go to the background (np.argmax order), i.e. a class
  needs a CAM strictly above t.

  Args:
    cams: float [..., H, W, K].
    labels: [..., K] multi-hot image labels (broadcast against the leading axes of cams).
    threshold: background score t: a Python float or a (traced) array broadcastable to the
      leading axes [...].
    valid: optional bool [..., H, W]; invalid pixels get 255.

  Returns:
    int32 [..., H, W] class ids in 0..K (255 outside `valid`).
  """
  cams = jnp.asarray(cams, jnp.float32)
  present = jnp.asarray(labels)[..., None, None, :] > 0
  scores = jnp.where(present, cams, -jnp.inf)
  best = scores.max(axis=-1)
  cls = jnp.argmax(scores, axis=-1).astype(jnp.int32) + 1
  t = jnp.asarray(threshold, jnp.float32)
  t = t.reshape(t.shape + (1, 1))
  out = jnp.where(best > t, cls, 0)
  if valid is not None:
    out = jnp.where(jnp.asarray(valid).astype(bool), out, IGNORE_INDEX)
  return out.astype(jnp.int32)


def combine_double_threshold(fg_labels: jax.Array, bg_labels: jax.Array) -> jax.Array:
  """IRN's combination of a high- and a low-threshold label map (`cam_to_ir_label`).

  Result = the fg-threshold labels; where they are background: 255 (unsure); where the
  bg-threshold labels are background too: 0. Pixels that are 255 in `fg_labels` stay 255.
  """
  out = jnp.where(fg_labels == 0, IGNORE_INDEX, fg_labels)
  return jnp.where((bg_labels == 0) & (fg_labels == 0), 0, out).astype(jnp.int32)


def double_threshold_labels(cams: jax.Array, labels: jax.Array, fg_threshold,
                            bg_threshold, valid: jax.Array | None = None) -> jax.Array:
  """IRN-style confident labels without CRF: fg result, 255 between, 0 where both are bg.

  `fg_threshold` is the high background score (IRN conf_fg_thres 0.30), `bg_threshold` the
  low one (conf_bg_thres 0.05). Returns int32 [..., H, W] (255 outside `valid`).
  """
  fg = cams_to_labels(cams, labels, fg_threshold, valid)
  bg = cams_to_labels(cams, labels, bg_threshold, valid)
  return combine_double_threshold(fg, bg)


def crf_refine_labels(labels_map: jax.Array, image_labels: jax.Array, images: jax.Array,
                      params: crf_ops.CRFParams = crf_ops.LABEL_CRF, num_iters: int = 10,
                      gt_prob: float = 0.7, valid: jax.Array | None = None,
                      max_labels: int | None = None) -> jax.Array:
  """IRN `crf_inference_label` on class-id maps of a batch, over each image's classes.

  Args:
    labels_map: int [B, H, W] class ids 0..K (255 = unsure: uniform unary).
    image_labels: [B, K] multi-hot; the CRF runs over background + the present classes only
      (IRN builds the CRF with n_labels = 1 + number of present classes).
    images: [B, H, W, 3] RGB 0..255 (the de-normalised image).
    params, num_iters, gt_prob: label CRF (METHODS §1.3: LABEL_CRF, 10, 0.7).
    valid: optional bool [B, H, W].
    max_labels: static L; when given (and < K+1) the CRF runs on L channels holding each
      image's background + present classes in id order (the mean field's cost grows with
      the channel count; IRN's CRF has exactly these channels). Same result as the full
      K+1 channels as long as no image has more than L - 1 classes (the caller's duty:
      further classes would be dropped).

  Returns:
    int32 [B, H, W] refined class ids (255 outside `valid`).
  """
  k = image_labels.shape[-1]
  active = jnp.concatenate([jnp.ones(image_labels.shape[:-1] + (1,), bool),
                            jnp.asarray(image_labels) > 0], axis=-1)          # [B, K+1]
  labels_map = jnp.asarray(labels_map).astype(jnp.int32)
  if max_labels is not None and max_labels < k + 1:
    # slot -> class id: the active ids first, in id order (stable sort).
    slot_class = jnp.argsort(~active, axis=-1, stable=True)[:, :max_labels]  # [B, L]
    slot_active = jnp.take_along_axis(active, slot_class, axis=-1)
    # class id -> slot (max_labels = "unsure": not a channel of the compact CRF).
    class_slot = jnp.full(active.shape, max_labels, jnp.int32)
    class_slot = jax.vmap(lambda t, c, a: t.at[c].set(
        jnp.where(a, jnp.arange(max_labels), max_labels)))(class_slot, slot_class,
                                                           slot_active)
    in_range = (labels_map >= 0) & (labels_map <= k)
    compact = jax.vmap(lambda t, lab: t[lab])(class_slot, jnp.where(in_range, labels_map, 0))
    compact = jnp.where(in_range, compact, max_labels)
    unary = jax.vmap(lambda lab, m: crf_ops.unary_from_labels(
        lab, max_labels, gt_prob, zero_unsure=False, label_mask=m))(compact, slot_active)
    q = crf_ops.dense_crf_batch(unary, images, params, num_iters, valid=valid)
    slot = jnp.argmax(q, axis=-1)
    out = jnp.take_along_axis(slot_class, slot.reshape(slot.shape[0], -1), axis=-1)
    out = out.reshape(slot.shape).astype(jnp.int32)
  else:
    unary = jax.vmap(lambda lab, m: crf_ops.unary_from_labels(
        lab, k + 1, gt_prob, zero_unsure=False, label_mask=m))(labels_map, active)
    q = crf_ops.dense_crf_batch(unary, images, params, num_iters, valid=valid)
    out = jnp.argmax(q, axis=-1).astype(jnp.int32)
  if valid is not None:
    out = jnp.where(valid, out, IGNORE_INDEX)
  return out


def double_threshold_labels_crf(cams: jax.Array, labels: jax.Array, images: jax.Array,
                                fg_threshold, bg_threshold,
                                params: crf_ops.CRFParams = crf_ops.LABEL_CRF,
                                num_iters: int = 10, gt_prob: float = 0.7,
                                valid: jax.Array | None = None,
                                max_labels: int | None = None) -> jax.Array:
  """IRN `cam_to_ir_label` / CSRM's on-the-fly pseudo labels (METHODS §2.3.1), on device.

  argmax at the fg threshold -> label CRF; argmax at the bg threshold -> label CRF; combine
  (fg result, 255 where it is bg, 0 where both are bg).

  Args:
    cams: float [B, H, W, K] normalised CAMs at image resolution.
    labels: [B, K] multi-hot.
    images: [B, H, W, 3] RGB 0..255.
    fg_threshold, bg_threshold: background scores (IRN 0.30 / 0.05; AMN 0.45 / 0.15).
    params, num_iters, gt_prob: the label CRF.
    valid: optional bool [B, H, W].
    max_labels: the CRF's channel count (`crf_refine_labels`); None = K+1.

  Returns:
    int32 [B, H, W] pseudo labels with 255 = unsure / invalid.
  """
  fg = cams_to_labels(cams, labels, fg_threshold, valid)
  bg = cams_to_labels(cams, labels, bg_threshold, valid)
  both = jnp.concatenate([fg, bg], axis=0)
  refined = crf_refine_labels(both, jnp.concatenate([labels, labels], axis=0),
                              jnp.concatenate([images, images], axis=0), params, num_iters,
                              gt_prob, None if valid is None else
                              jnp.concatenate([valid, valid], axis=0), max_labels)
  b = cams.shape[0]
  return combine_double_threshold(refined[:b], refined[b:])


def threshold_labels(cams: jax.Array, labels: jax.Array,
                     thresholds: Sequence[float] | jax.Array,
                     valid: jax.Array | None = None) -> jax.Array:
  """`cams_to_labels` at every threshold: int32 [T, ..., H, W] (the label maps whose
  confusion matrices `threshold_sweep` counts in one pass)."""
  thresholds = jnp.asarray(thresholds, jnp.float32).reshape(-1)
  return jax.vmap(lambda t: cams_to_labels(cams, labels, t, valid))(thresholds)


def threshold_sweep(cams: jax.Array, labels: jax.Array, gt: jax.Array,
                    thresholds: Sequence[float] | jax.Array, num_classes: int,
                    valid: jax.Array | None = None) -> jax.Array:
  """Confusion matrices of `cams_to_labels` at every threshold at once (METHODS §1.1 S3).

  Equal to stacking `metrics.confusion_matrix(gt, cams_to_labels(cams, labels, t), C)` over
  t, but computed with one histogram: per pixel, the best present class a and its score m;
  the pixel is predicted a for every t < m and background otherwise, so one bincount over
  (gt, a, number of thresholds below m) and a cumulative sum give all T matrices.

  Args:
    cams: float [..., H, W, K] (K = C - 1).
    labels: [..., K] multi-hot.
    gt: int [..., H, W] ground truth (255 ignored).
    thresholds: [T] background scores (any order).
    num_classes: C (static).
    valid: optional bool [..., H, W].

  Returns:
    int32 [T, C, C] (rows = GT, columns = prediction), in the order of `thresholds`.
  """
  c = num_classes
  cams = jnp.asarray(cams, jnp.float32)
  if cams.shape[-1] != c - 1:
    raise ValueError(f"cams have {cams.shape[-1]} channels, expected C-1 = {c - 1}")
  thresholds = jnp.asarray(thresholds, jnp.float32).reshape(-1)
  t = thresholds.shape[0]
  order = jnp.argsort(thresholds)
  ts = thresholds[order]
  present = jnp.asarray(labels)[..., None, None, :] > 0
  scores = jnp.where(present, cams, -jnp.inf)
  best = scores.max(axis=-1)
  cls = jnp.argmax(scores, axis=-1).astype(jnp.int32) + 1                  # 1..C-1
  below = jnp.searchsorted(ts, best.reshape(-1), side="left").reshape(best.shape)
  gt = jnp.asarray(gt).astype(jnp.int32)
  keep = (gt >= 0) & (gt < c)
  if valid is not None:
    keep = keep & jnp.asarray(valid).astype(bool)
  index = (gt * c + cls) * (t + 1) + below
  index = jnp.where(keep, index, c * c * (t + 1))
  hist = jnp.bincount(index.reshape(-1), length=c * c * (t + 1) + 1)[:-1]
  hist = hist.reshape(c, c, t + 1)                                          # [gt, a, below]
  # Pixel with `below` = k is foreground for the sorted thresholds 0..k-1.
  tail = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]                    # sum_{k' >= k}
  fg = tail[..., 1:]                                                        # [gt, a, T]
  total = hist.sum(axis=-1, keepdims=True)                                  # [gt, a, 1]
  bg = (total - fg).sum(axis=1)                                             # [gt, T]
  conf = jnp.moveaxis(fg, -1, 0)                                            # [T, gt, a]
  conf = conf.at[:, :, 0].add(bg.T)
  inverse = jnp.argsort(order)
  return conf[inverse].astype(jnp.int32)


def sweep_reference(cams, labels, gt, thresholds, num_classes, valid=None):
  """Per-threshold loop equivalent of `threshold_sweep` (for tests and small inputs)."""
  return jnp.stack([metrics.confusion_matrix(gt, cams_to_labels(cams, labels, t),
                                             num_classes, valid) for t in thresholds])


def masked_mean_logits(cams: jax.Array, valid: jax.Array) -> jax.Array:
  """Image logits as the mean of raw class maps over the image's own (unpadded) area.

  Args:
    cams: float [B, h, w, K] raw class maps.
    valid: bool [B, H, W] input-resolution validity.
  Returns:
    float32 [B, K]; equals GAP over the unpadded image up to the stride rounding.
  """
  h, w = cams.shape[1:3]
  v = jax.image.resize(valid.astype(jnp.float32), (valid.shape[0], h, w), "nearest")
  v = v[..., None]
  return jnp.sum(cams * v, axis=(1, 2)) / jnp.maximum(jnp.sum(v, axis=(1, 2)), 1.0)
