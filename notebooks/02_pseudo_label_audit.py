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
# # Pseudo-label audit
#
# How good are the pseudo-labels the segmentation model trains on? This notebook shows
# them next to the ground truth, where their errors go (confusion matrix), what the dense
# CRF changes, and how several runs (methods, settings, seeds) compare.
#
# `WSSS_WORKDIR` (or the cell below) names the run to audit; `WSSS_WORKDIRS`, a
# comma-separated list, names the runs to compare (default: just that one).

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display
import numpy as np

from wsss_jax import viz
from wsss_jax.ops import metrics
from wsss_jax.analysis import reader

WORKDIR = os.environ.get("WSSS_WORKDIR", "../runs/synthetic_cam")
WORKDIRS = [p for p in os.environ.get("WSSS_WORKDIRS", WORKDIR).split(",") if p]
NUM_IMAGES = int(os.environ.get("WSSS_NUM_IMAGES", "4"))
# The CRF comparison recomputes pseudo-labels on the fly; a few images are enough.
NUM_CRF_IMAGES = int(os.environ.get("WSSS_NUM_CRF_IMAGES", "3"))

w = reader.open_workdir(WORKDIR)
split = w.sweep_split  # pseudo_miou is scored here
settings = w.json("pseudo", "settings.json")
print(f"{w.path}: method={w.config.method}; pseudo-label settings: {settings}")

# %% [markdown]
# ## Scores
#
# `pseudo_miou` counts unsure pixels (255) as background, i.e. it scores the label map
# as a complete prediction; `pseudo_miou_labelled` scores only the labelled pixels and
# `pseudo_labelled_fraction` says how many there are. A high labelled-pixel mIoU with a
# small labelled fraction means the labels are precise but sparse.

# %%
r = w.results
display(Markdown(reader.markdown([{k: r.get(k) for k in (
    "cam_miou", "pseudo_threshold", "pseudo_miou", "pseudo_miou_labelled",
    "pseudo_labelled_fraction")}])))

# %% [markdown]
# ## Pseudo-labels against the ground truth
#
# Photo, ground truth, pseudo-label (cream = unsure), and the CAM label map at the best
# threshold that the pseudo-label started from. Compare the object outlines: the CRF
# should pull the CAM's blobs onto image edges.

# %%
def gallery(indices, title_scores=None):
  recs = [w.record(split, i) for i in indices]
  rows = {"ground truth": [r["mask"] for r in recs],
          "pseudo-label": [w.pseudo_label(r["id"]) for r in recs],
          "CAM @ best t": [w.cam_prediction(split, r) for r in recs]}
  titles = [r["id"] if title_scores is None else f"{r['id']} ({s:.2f})"
            for r, s in zip(recs, title_scores or [None] * len(recs))]
  return viz.label_gallery([r["image"] for r in recs], rows, titles, w.class_names)


display(gallery(range(min(NUM_IMAGES, len(w.source(split))))))

# %% [markdown]
# ### Worst pseudo-labels
#
# Images ranked by their own pseudo-label mIoU (unsure as background), worst first.

# %%
scores = reader.per_image_scores(w, split, "pseudo")
display(Markdown(reader.markdown(
    [{**s, "classes": ", ".join(s["classes"])} for s in scores[:NUM_IMAGES]])))
display(gallery([s["index"] for s in scores[:NUM_IMAGES]],
                [s["miou"] for s in scores[:NUM_IMAGES]]))

# %% [markdown]
# ## Confusion matrix
#
# Rows are the ground-truth class, columns the pseudo-label (unsure counted as
# background), each row normalised to sum to 1: the diagonal is each class's recall. Mass
# in the first column means objects lost to background (CAMs too small or the threshold
# too high); mass in the first row means background taken as an object (CAMs too broad,
# co-occurring context); off-diagonal foreground cells are class confusions. The
# segmentation model's confusion on the val split follows when `evaluate` has run.

# %%
conf = reader.pseudo_confusion(w, split)
_, miou = metrics.iou_from_confusion_np(conf)
display(viz.confusion_heatmap(conf, w.class_names,
                              title=f"pseudo-labels vs ground truth ({split}), mIoU {miou:.3f}"))
ev = w.evaluation("seg")
if ev is not None:
  display(viz.confusion_heatmap(np.asarray(ev["confusion"]), ev["class_names"],
                                title=f"segmentation model ({ev['headline']['seg_split']})"))

# %% [markdown]
# ## Effect of the CRF
#
# The pseudo-labels of a few images recomputed from the CAMs on disk in the three modes of
# `config.pseudo.mode`, with this run's thresholds and CRF preset: `threshold` (argmax at
# the best threshold), `double` (IRN double threshold: confident foreground, confident
# background, unsure between) and `crf` (each threshold's map refined by the dense CRF,
# then combined). The table scores the modes on these images only (summed confusion, unsure
# as background) — a hint, not the split's number.

# %%
n_crf = min(NUM_CRF_IMAGES, len(w.source(split)))
modes = reader.pseudo_label_modes(w, split, range(n_crf))
recs = [w.record(split, i) for i in range(n_crf)]
display(viz.label_gallery([r["image"] for r in recs],
                          {"ground truth": [r["mask"] for r in recs], **modes},
                          [r["id"] for r in recs], w.class_names))
rows = []
for mode, labels in modes.items():
  c = np.zeros((w.num_classes, w.num_classes), np.int64)
  unsure = 0
  for rec, lab in zip(recs, labels):
    unsure += int((lab == 255).sum())
    c += metrics.confusion_matrix_np(rec["mask"], np.where(lab == 255, 0, lab), w.num_classes)
  rows.append({"mode": mode, "miou": float(metrics.iou_from_confusion_np(c)[1]),
               "unsure_fraction": unsure / sum(r["mask"].size for r in recs)})
display(Markdown(reader.markdown(rows)))

# %% [markdown]
# ## Comparison across work directories
#
# Headline numbers of every run in `WSSS_WORKDIRS`, their pseudo-label IoU per class side
# by side, and their threshold curves on one plot. Runs of one config over several seeds
# are better summarised with `python -m wsss_jax.compare` (mean ± std).

# %%
runs = [reader.open_workdir(p) for p in WORKDIRS]
display(Markdown(reader.markdown(reader.headline_table(runs))))
# Runs may share a directory name (e.g. seed0 of two methods): label them by parent/name.
labels = [os.path.join(os.path.basename(os.path.dirname(r.path)), r.name) for r in runs]
labels = [f"{lab} #{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
per_class = {lab: r.results["pseudo_per_class_iou"] for lab, r in zip(labels, runs)
             if "pseudo_per_class_iou" in r.results}
if per_class:
  fig = viz.per_class_bars(runs[0].class_names, per_class)
  fig.axes[0].set_title("pseudo-label IoU per class")
  display(fig)
fig, ax = viz.new_figure(figsize=(5, 3.5), squeeze=True)
for lab, r in zip(labels, runs):
  s = r.sweep()
  if s is not None:
    ax.plot(s["thresholds"], s["miou"], marker="o", label=f"{lab} ({r.config.method})")
ax.set_xlabel("background threshold")
ax.set_ylabel("CAM mIoU")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
display(fig)
