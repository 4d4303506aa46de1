"""Superpixels (low-level over-segmentation for SPML's relation I), computed once per split.

SPML used HED-owt-ucm regions (MATLAB; METHODS.md §5.7 item 4); here scikit-image's SLIC
(`method='slic'`, `n_segments`, `compactness`, `sigma`) or Felzenszwalb
(`method='felzenszwalb'`, `fz_scale`, `sigma`, `fz_min_size`) stand in for them. Maps are
computed on the full-resolution record image and stored beside the prepared dataset:
`<prepared folder>/superpixels/<method-params-hash>/<split>/<id>.png` (16-bit PNG, ids
0..n-1), with a `complete.json` marker, so every later run reads them.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from wsss_jax.data import sources

METHODS = ("slic", "felzenszwalb")


def _params(sp_cfg: Any) -> dict[str, Any]:
  method = sp_cfg["method"]
  if method not in METHODS:
    raise ValueError(f"config.spml.superpixels.method={method!r}; expected one of {METHODS}")
  if method == "slic":
    return {"method": method, "n_segments": int(sp_cfg["n_segments"]),
            "compactness": float(sp_cfg["compactness"]), "sigma": float(sp_cfg["sigma"])}
  return {"method": method, "scale": float(sp_cfg["fz_scale"]),
          "sigma": float(sp_cfg["sigma"]), "min_size": int(sp_cfg["fz_min_size"])}


def compute(image: np.ndarray, sp_cfg: Any) -> np.ndarray:
  """Superpixel ids of one uint8 RGB image [H, W, 3] -> uint16 [H, W], ids 0..n-1."""
  from skimage import segmentation  # Local import: only SPML needs scikit-image here.
  p = _params(sp_cfg)
  if p["method"] == "slic":
    seg = segmentation.slic(image, n_segments=p["n_segments"], compactness=p["compactness"],
                            sigma=p["sigma"], start_label=0, channel_axis=-1)
  else:
    seg = segmentation.felzenszwalb(image, scale=p["scale"], sigma=p["sigma"],
                                    min_size=p["min_size"], channel_axis=-1)
  _, ids = np.unique(seg, return_inverse=True)  # consecutive ids
  return ids.reshape(seg.shape).astype(np.uint16)


def split_dir(data_cfg: Any, sp_cfg: Any, split: str) -> str:
  """Where the maps of `split` live (depends on the dataset and the parameters)."""
  meta = sources.prepare(data_cfg)
  p = _params(sp_cfg)
  key = hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.join(meta.path, "superpixels", f"{p['method']}-{key}", split)


def path(directory: str, image_id: str) -> str:
  return os.path.join(directory, f"{image_id}.png")


def read(directory: str, image_id: str) -> np.ndarray:
  """uint16 [H, W] superpixel ids of one image."""
  p = path(directory, image_id)
  try:
    return np.asarray(Image.open(p), np.uint16)
  except OSError as e:
    raise ValueError(f"{p}: unreadable superpixel map ({e}); delete it to recompute") from e


def ensure(data_cfg: Any, sp_cfg: Any, split: str, num_threads: int = 2) -> str:
  """Computes the missing superpixel maps of `split`; returns their folder."""
  from wsss_jax.stages import workdir as wd  # Local import: atomic writes.
  directory = split_dir(data_cfg, sp_cfg, split)
  marker = os.path.join(directory, "complete.json")
  if os.path.exists(marker):
    return directory
  source = sources.get_source(data_cfg, split)

  def one(i: int) -> int:
    record = source[i]
    out = path(directory, record["id"])
    if not os.path.exists(out):
      ids = compute(record["image"], sp_cfg)
      with wd.atomic_path(out) as tmp:
        Image.fromarray(ids).save(tmp, format="PNG")
    return 1

  os.makedirs(directory, exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    done = sum(pool.map(one, range(len(source))))
  wd.write_json(marker, {"images": done, "params": _params(sp_cfg)})
  return directory
