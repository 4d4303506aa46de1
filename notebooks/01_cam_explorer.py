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
# # CAM explorer
#
# Looks at the class activation maps (CAMs) of one work directory written by
# `wsss --config=... --workdir=DIR`: the headline numbers, the background-threshold sweep,
# each image's CAM per class, per-class IoU, and the images the CAMs get most wrong.
#
# Set the work directory with the environment variable `WSSS_WORKDIR` or in the cell
# below. The dataset is read from the cache the run used (`$WSSS_JAX_CACHE`, else
# `~/.cache/wsss_jax`). Nothing is written to the work directory.

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display
import numpy as np

from wsss_jax import viz
from wsss_jax.analysis import reader

WORKDIR = os.environ.get("WSSS_WORKDIR", "../runs/synthetic_cam")
NUM_IMAGES = int(os.environ.get("WSSS_NUM_IMAGES", "4"))  # images per gallery

w = reader.open_workdir(WORKDIR)
split = w.sweep_split  # where CAMs are scored (sweep.json, cam_miou)
print(f"{w.path}: method={w.config.method}, dataset={w.config.data.name}, "
      f"backbone={w.config.model.backbone}, {w.num_classes} classes, "
      f"{len(w.source(split))} images in split {split!r}")

# %% [markdown]
# ## Headline numbers
#
# `cam_miou` is the CAMs' mIoU on the sweep split at the best background threshold
# (`cam_threshold`); `pseudo_miou` scores the pseudo-labels made from them and `seg_miou`
# the segmentation model trained on those (val split). A dash means the stage has not run.

# %%
display(Markdown(reader.markdown(reader.headline_table([w]))))
timings = w.results.get("timings", {})
display(Markdown("Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())))

# %% [markdown]
# ## Threshold curve
#
# A constant background plane of value *t* is put in front of the max-normalised CAMs and
# the argmax is scored. Small *t* labels almost everything foreground (CAMs spread over
# the background), large *t* keeps only the CAM peaks. The best *t* says how far the CAMs
# spread: broad CAMs need a high threshold. A flat curve means the threshold barely
# matters; a sharp peak means pseudo-labels will be sensitive to it.

# %%
sweep = w.sweep()
if sweep is None:
  print("No sweep.json yet: run the `sweep` stage.")
else:
  display(viz.threshold_curve(sweep))

# %% [markdown]
# ## CAMs per class
#
# One row per image: the photo, its ground truth (VOC colours), then one heat map per
# class in the image's label (red = strong activation, 1.0 after per-class max
# normalisation). Look for *partial activation* (only the most discriminative part of the
# object lights up) and *co-occurrence* (the CAM leaks onto a background that usually
# comes with the class, e.g. a texture on the synthetic set).

# %%
def cam_rows(indices):
  recs = [w.record(split, i) for i in indices]
  cams = [w.cams(split, r["id"]) for r in recs]
  return viz.cam_per_class(
      [r["image"] for r in recs], [c["high_res"] for c in cams], [c["keys"] for c in cams],
      w.class_names, titles=[r["id"] for r in recs], masks=[r["mask"] for r in recs])


display(cam_rows(range(min(NUM_IMAGES, len(w.source(split))))))

# %% [markdown]
# ## Per-class IoU
#
# IoU of every class after each stage (`results.json`): CAMs at the best threshold,
# pseudo-labels, and the segmentation model. Classes whose CAM IoU is far below the
# others are the ones to look at in the galleries; a class at 0 may simply be absent
# from the split.

# %%
series = {stage: w.results[key] for stage, key in reader.PER_CLASS_KEYS.items()
          if key in w.results}
if series:
  display(viz.per_class_bars(w.class_names, series))
else:
  print("No per-class IoU in results.json yet.")

# %% [markdown]
# ## Worst images
#
# Every image of the split scored on its own (mean IoU over the classes in its ground
# truth or CAM prediction, at the best threshold), worst first. The gallery shows the
# worst ones: photo, ground truth, the CAM label map, and the pseudo-label if the
# `pseudo` stage has run (cream = unsure, 255).

# %%
scores = reader.per_image_scores(w, split, "cam")
display(Markdown(reader.markdown(
    [{**s, "classes": ", ".join(s["classes"])} for s in scores[:NUM_IMAGES]])))
median = np.median([s["miou"] for s in scores])
print(f"per-image mIoU over {len(scores)} images: median {median:.3f}")

# %%
worst = [s["index"] for s in scores[:NUM_IMAGES]]
recs = [w.record(split, i) for i in worst]
rows = {"ground truth": [r["mask"] for r in recs],
        "CAM @ best t": [w.cam_prediction(split, r) for r in recs]}
pseudo = [w.pseudo_label(r["id"]) for r in recs]
if all(p is not None for p in pseudo):
  rows["pseudo-label"] = pseudo
display(viz.label_gallery([r["image"] for r in recs], rows,
                          [f"{s['id']} ({s['miou']:.2f})" for s in scores[:NUM_IMAGES]],
                          w.class_names))
display(cam_rows(worst))
