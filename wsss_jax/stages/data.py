"""`data` stage: prepares the dataset (array_record, once) and prints its statistics."""
from __future__ import annotations

import os
from typing import Any

import ml_collections as mlc

from wsss_jax.data import sources
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import distributed


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  meta = sources.prepare(config.data)
  splits = sorted({config.data.train_split, config.data.sweep_split, config.data.val_split})
  stats = {split: sources.split_statistics(config.data, split) for split in splits}
  if distributed.is_chief():
    wd.write_json(os.path.join(workdir, "data_stats.json"),
                  {"class_names": list(meta.class_names), "splits": meta.splits,
                   "stats": stats})
    print(format_statistics(meta, stats))
  return {"num_classes": meta.num_classes, "class_names": list(meta.class_names),
          "split_sizes": dict(meta.splits)}


def format_statistics(meta: sources.DatasetMeta, stats: dict[str, dict[str, Any]]) -> str:
  """A human-readable table: images per split, images per class, labels per image."""
  lines = [f"dataset {meta.name}: {meta.num_classes} classes (incl. background)",
           "splits: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.splits.items()))]
  for split, s in stats.items():
    h, w = s["mean_image_size"]
    lines.append(f"[{split}] images={s['images']}  skipped={s['skipped']}  "
                 f"mean size={h:.0f}x{w:.0f}  no-foreground images="
                 f"{s['no_foreground_images']}  ignore pixels={s['ignore_fraction']:.3f}")
    lines.append(f"  foreground labels per image: {s['labels_per_image']}")
    per_class = s["images_per_class"]
    lines.append("  images per class: " + ", ".join(
        f"{name}={per_class.get(name, 0)}" for name in meta.class_names[1:]))
  return "\n".join(lines)
