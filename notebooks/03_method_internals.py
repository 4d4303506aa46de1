# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Method internals
#
# The contrastive methods build on a few pieces computed from the backbone's feature map:
# **k-means segments** of an image (SPML, DSCNet-R pixel groups), **NROIs** — k-means
# centroids of the background pixels (FBR), **class prototypes** — the mean feature of a
# class's pixels (FBR), and **FIFO memory banks** of such vectors (FBR, CSRM). This
# notebook computes them with the library's own `ops.kmeans` and `ops.memory` on the
# trained model of a work directory (any method, the CAM baseline included) and shows
# them on images. The bank section *replays* the split through a bank after training;
# the run's own bank, if its method has one, is in the checkpoint's `extra` state (last
# section).

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display
import jax
import numpy as np

from wsss_jax import viz
from wsss_jax.analysis import reader
from wsss_jax.analysis import features as feats

WORKDIR = os.environ.get("WSSS_WORKDIR", "../runs/synthetic_cam")
IMAGE_INDICES = [int(i) for i in os.environ.get("WSSS_IMAGES", "0,1").split(",")]
NUM_SEGMENTS = (4, 8)   # k of the k-means segment maps (SPML trains with a 6x6 grid)
NUM_NROIS = 4           # background centroids per image (FBR: METHODS.md §3)
BANK_CAPACITY = 24      # small, so the replay shows the bank filling and wrapping
# Images are resized by this factor before the model: at output stride 16 a 128² image
# has only 8x8 features; x2 gives 16x16 maps (multi-scale CAM inference does the same).
FEATURE_SCALE = float(os.environ.get("WSSS_FEATURE_SCALE", "2"))
# Which model output to cluster: `features` (the backbone's) for every method; FBR builds
# its NROIs and prototypes from its projections (`proj_bg`, `proj_fg`), SPML from `proj`.
FEATURE_KEY = os.environ.get("WSSS_FEATURE_KEY", "features")
# Prototypes from the run's pseudo-labels, or "gt": the ground truth, an oracle view of how
# separable the classes are in feature space.
PROTOTYPE_LABELS = os.environ.get("WSSS_PROTOTYPE_LABELS", "pseudo")

w = reader.open_workdir(WORKDIR)
split = w.train_split
extract = feats.model_outputs(w, scale=FEATURE_SCALE)  # the `train` stage model
recs = [w.record(split, i) for i in IMAGE_INDICES if i < len(w.source(split))]
outs = [extract(r["image"][None]) for r in recs]
f0 = outs[0][FEATURE_KEY][0]
print(f"model outputs: { {k: v.shape for k, v in outs[0].items()} }")
print(f"features {f0.shape[:2]} for a {recs[0]['image'].shape[:2]} image at scale "
      f"{FEATURE_SCALE}: {f0.shape[-1]} channels")

# %% [markdown]
# ## k-means segments
#
# Spherical k-means (cosine, `ops.kmeans.kmeans` with k-means++ seeding) of each image's
# L2-normalised features, for a few *k*, drawn over the photo (white lines = segment
# borders; the map is at the output stride, upsampled by nearest neighbour). Good
# features give segments that follow objects: one digit should not share a segment with
# its texture. Segments that follow only position mean the features carry little
# semantics (e.g. a briefly trained model).

# %%
def up(seg, image):
  return feats.resize_labels(seg, image.shape[:2])


panels = []
for r, o in zip(recs, outs):
  row = {"image": r["image"], "ground truth": viz.colorize(r["mask"])}
  for k in NUM_SEGMENTS:
    seg = feats.kmeans_segments(o[FEATURE_KEY][0], k)
    row[f"k={k}"] = viz.segment_overlay(r["image"], up(seg["assign"], r["image"]))
  panels.append(row)
display(viz.image_grid(panels, row_titles=[r["id"] for r in recs]))

# %% [markdown]
# ## NROIs: background centroids
#
# FBR does not treat the background as one class: it clusters each image's background
# pixels into a few *non-salient regions* (NROIs) and contrasts foreground against them.
# Background here is the pseudo-label's background (the CAM map at the best threshold if
# no pseudo-labels exist), at the feature resolution. Columns: the photo with the
# non-background pixels dimmed, its
# k-means segments, then each NROI's cosine similarity to every pixel. Post-ReLU features
# are all positive, so raw cosines sit close to 1 everywhere: each panel has its own
# colour scale (yellow = the most similar pixels of that panel).
# Distinct NROIs covering different textures are what make them useful negatives; an NROI
# similar to the object means background and foreground features are entangled.

# %%
panels, nrois = [], []
for r, o in zip(recs, outs):
  f = o[FEATURE_KEY][0]
  bg = feats.background_mask(w, split, r, f.shape[:2])
  seg = feats.kmeans_segments(f, NUM_NROIS, mask=bg)
  nrois.append(seg)
  # Foreground (non-background) pixels dimmed to a quarter of their brightness.
  dim = np.where(up(bg, r["image"])[..., None], r["image"], r["image"] // 4)
  row = {"background": dim,
         "NROI segments": viz.segment_overlay(r["image"], up(seg["assign"], r["image"]))}
  sims = feats.similarity_maps(f, seg["centers"])
  for j in np.flatnonzero(seg["counts"] > 0):
    row[f"NROI {j} ({seg['counts'][j]} px)"] = up(sims[j], r["image"])
  panels.append(row)
display(viz.image_grid(panels, row_titles=[r["id"] for r in recs]))

# %% [markdown]
# ## Class prototypes
#
# A prototype is the mean L2-normalised feature of the pixels a pseudo-label gives to a
# class (`ops.kmeans.centers_from_assign` with the label map as the assignment; set
# `PROTOTYPE_LABELS = "gt"` to use the ground truth instead). Ignore pixels (255) are
# left out. Each
# panel shows a prototype's cosine similarity to every pixel: a good prototype lights up
# its object and not the texture it co-occurs with (colour scale per panel, as above).
# The table compares the prototypes with the NROIs: the highest NROI similarity of each
# class prototype (low = separable). A class whose object is smaller than one feature
# cell under the labels gets no prototype.

# %%
panels, rows = [], []
for r, o, seg in zip(recs, outs, nrois):
  f = o[FEATURE_KEY][0]
  label = r["mask"] if PROTOTYPE_LABELS == "gt" else w.pseudo_label(r["id"])
  if label is None:
    label = w.cam_prediction(split, r)
  p = feats.class_prototypes(f, feats.resize_labels(np.asarray(label), f.shape[:2]),
                             w.num_classes)
  present = [c for c in range(w.num_classes) if p["counts"][c] > 0]
  sims = feats.similarity_maps(f, p["prototypes"][present])
  row = {f"{PROTOTYPE_LABELS} labels": viz.colorize(label)}
  for c, s in zip(present, sims):
    row[f"{w.class_names[c]} prototype"] = up(s, r["image"])
  panels.append(row)
  valid = seg["counts"] > 0
  for c in present:
    cos = feats.l2_normalize(seg["centers"][valid]) @ p["prototypes"][c]
    rows.append({"image": r["id"], "class": w.class_names[c], "pixels": int(p["counts"][c]),
                 "max cos to an NROI": float(cos.max()) if valid.any() else None})
display(viz.image_grid(panels, row_titles=[r["id"] for r in recs]))
display(Markdown(reader.markdown(rows)))

# %% [markdown]
# ## A memory bank over training: replay
#
# FBR keeps the NROIs of recent batches in a FIFO bank (`ops.memory`), so every anchor
# sees many negatives. Here the split is replayed in batches through such a bank with
# the trained features: after each batch, how many slots are filled, how diverse the
# stored NROIs are (mean pairwise cosine: lower = more diverse negatives), how old they are
# (in batches; it levels off once the bank wraps) and how close the nearest NROI is to
# the batch's foreground prototypes (high = hard negatives, or background leaking into
# the foreground).

# %%
history = feats.nroi_bank_replay(w, extract, split, num_nrois=NUM_NROIS,
                                 capacity=BANK_CAPACITY, batch_size=4,
                                 feature_key=FEATURE_KEY)
display(viz.lines([h["batch"] for h in history],
                  {k: [h[k] for h in history] for k in
                   ("count", "mean_pairwise_cos", "mean_age", "fg_to_bank_cos")},
                  xlabel="batch", ncols=4))

# %% [markdown]
# ## Training logs and the checkpoint's extra state
#
# The numbers the `train` stage logged (`train/metrics.jsonl`): loss, learning rate,
# throughput, and whatever the method adds (bank fill, prototype statistics, loss
# terms). Then the method's extra state from the last checkpoint: EMA teacher, memory
# banks, prototypes — empty for the CAM baseline — and, for each memory bank in it, how
# full it is and how diverse its entries are (as in the replay above).

# %%
log = [m for m in w.metrics_log("train") if "loss" in m]
keys = sorted({k for m in log for k, v in m.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
# Losses and the method's own keys ("fbr/bank_fill", ...) first, bookkeeping after.
keys.sort(key=lambda k: (not k.startswith("loss"),
                         not ("/" in k and k.split("/")[0] not in ("lr", "img", "tflop"))))
if log:
  display(viz.lines([m["step"] for m in log], {k: [m.get(k) for m in log] for k in keys[:12]},
                    xlabel="step", ncols=4))
  print(f"{len(keys)} logged keys: {keys}")
else:
  print("no train/metrics.jsonl lines with a loss")

# %%
extra = feats.checkpoint_extra(w)
if extra is None:
  print("no readable orbax checkpoint in train/")
elif not jax.tree.leaves(extra):
  print(f"the {w.config.method!r} method keeps no extra state")
else:
  display(Markdown(reader.markdown([
      {"leaf": jax.tree_util.keystr(path), "shape": str(np.shape(x)),
       "dtype": str(np.asarray(x).dtype)}
      for path, x in jax.tree_util.tree_leaves_with_path(extra)][:40])))
  banks = feats.bank_summaries(extra)
  if banks:  # the run's own memory banks at the last checkpoint
    display(Markdown(reader.markdown(banks)))
