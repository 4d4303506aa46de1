"""CAM files on disk: one `.npz` per image, read back quickly by stages and notebooks.

Layout: `workdir/cams/<split>/<id>.npz` with
  keys      int32 [K]          class ids (1..C-1) of the image's labels, in channel order
  cam       float16 [K, h, w]  stride-4 CAMs, per-class max-normalised to [0, 1]
  high_res  float16 [K, H, W]  full-resolution CAMs, same normalisation
(the IRN/PNOC layout, METHODS.md §7.6), and `cams/<split>/complete.json` once every image
of the split is written. Images without foreground labels have K = 0.
"""
from __future__ import annotations

import os

import numpy as np

from wsss_jax import fs
from wsss_jax.stages import workdir as wd

COMPLETE = "complete.json"


def split_dir(workdir: str, split: str) -> str:
  return os.path.join(workdir, "cams", split)


def cam_path(directory: str, image_id: str) -> str:
  return os.path.join(directory, f"{image_id}.npz")


def save(directory: str, image_id: str, keys: np.ndarray, cam: np.ndarray,
         high_res: np.ndarray, **extra: np.ndarray) -> None:
  """Writes one image's CAMs atomically (np.savez, uncompressed: fast to read back);
  `extra` arrays are stored beside them under their own names."""
  with wd.atomic_path(cam_path(directory, image_id)) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, keys=keys.astype(np.int32), cam=cam.astype(np.float16),
               high_res=high_res.astype(np.float16), **extra)


def load(directory: str, image_id: str) -> dict[str, np.ndarray]:
  """Reads one image's CAMs as float32 arrays; names the file if it is unreadable."""
  path = cam_path(directory, image_id)
  try:
    with fs.open_file(path, "rb") as f, np.load(f) as z:
      return {"keys": z["keys"], "cam": z["cam"].astype(np.float32),
              "high_res": z["high_res"].astype(np.float32)}
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path}: unreadable CAM file ({e}); delete it to recompute") from e


def dense_scores(record: dict[str, np.ndarray], num_fg: int) -> np.ndarray:
  """Full-resolution CAMs scattered to all fg channels: float32 [num_fg, H, W], 0 elsewhere."""
  high = record["high_res"]
  out = np.zeros((num_fg,) + high.shape[1:], np.float32)
  if len(record["keys"]):
    out[record["keys"] - 1] = high
  return out


def dense_cams_batch(batch: dict[str, np.ndarray], cam_dir: str, num_fg: int
                     ) -> dict[str, np.ndarray]:
  """CAMs from disk for the images of an eval batch: float32 [B, P, P, K], zero-padded."""
  b, p = batch["image"].shape[:2]
  out = np.zeros((b, p, p, num_fg), np.float32)
  for k, (image_id, index) in enumerate(zip(batch["id"], batch["index"])):
    if index < 0:
      continue
    dense = dense_scores(load(cam_dir, str(image_id)), num_fg)
    h, w = dense.shape[1:]
    out[k, :h, :w] = dense.transpose(1, 2, 0)
  return {"cams": out}


def is_complete(directory: str, ids: list[str]) -> bool:
  """True when the split's marker lists exactly these ids and every file exists."""
  marker = os.path.join(directory, COMPLETE)
  if not fs.exists(marker) or wd.read_json(marker).get("ids") != ids:
    return False
  present = fs.names_in(directory)
  return all(os.path.basename(cam_path(directory, i)) in present for i in ids)


def mark_complete(directory: str, ids: list[str]) -> None:
  wd.write_json(os.path.join(directory, COMPLETE), {"ids": ids, "count": len(ids)})
