"""Shared plumbing of the inference stages: trained variables on disk, sharded batched
prediction over a split (static shapes: images padded to P×P with a validity mask)."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from wsss_jax.data import pipeline
from wsss_jax.data import sources
from wsss_jax.stages import workdir as wd
from wsss_jax.train import mesh as mesh_lib

VARIABLES_FILE = "final_variables.msgpack"


def save_variables(path: str, params: Any, batch_stats: Any) -> None:
  """Writes trained `{'params', 'batch_stats'}` (msgpack), atomically."""
  variables = jax.device_get({"params": params, "batch_stats": batch_stats})
  with wd.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(variables))


def load_variables(path: str) -> dict[str, Any]:
  """Reads variables written by `save_variables`, naming the file on failure."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: trained weights not found; run the stage that "
                            "writes them first (train or seg)")
  try:
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f"{path}: unreadable weights file ({e}); delete it to retrain") from e


def forward(model: Any, variables: dict[str, Any], images: jax.Array) -> dict[str, jax.Array]:
  """Model outputs for `images [B,H,W,3]` in inference mode (BatchNorm running stats)."""
  vs = {"params": variables["params"]}
  if variables.get("batch_stats"):
    vs["batch_stats"] = variables["batch_stats"]
  return model.apply(vs, images, train=False)


def predict_split(config: mlc.ConfigDict, split: str,
                  batch_fn: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
                  mesh: jax.sharding.Mesh, *, variables: Any = None,
                  skip: Callable[[str], bool] | None = None,
                  add_inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                  | None = None
                  ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
  """Runs `batch_fn` over every image of `split`; yields `(record, outputs)` per image.

  `batch_fn(variables, batch)` is jitted here; `batch` is the eval batch of CONVENTIONS.md
  (global arrays, sharded on `data`) and its outputs must have the batch axis first.
  `variables` (e.g. trained weights) are a jit argument, replicated, not constants baked
  into the program: calling again with new weights (a periodic eval) reuses the compiled
  function. Batches whose images
  all satisfy `skip(id)` are not computed (resume). `record` is the source record
  (id, image, mask, labels); outputs are host numpy arrays of one image, still padded.
  `add_inputs(batch)` adds host arrays to a batch before it goes to the devices (e.g. CAMs
  read from disk, batch axis first, padded like the images).
  """
  source = sources.get_source(config.data, split)
  pad = pipeline.eval_pad_size(source, config.data)
  batch_size = int(config.data.eval_batch_size)
  ds = pipeline.eval_dataset(source, config.data, pad_size=pad, batch_size=batch_size,
                             mesh=mesh, oversize="resize")
  fn = jax.jit(batch_fn, out_shardings=mesh_lib.replicated(mesh))
  variables = jax.device_put({} if variables is None else variables,
                             mesh_lib.replicated(mesh))
  for batch in ds:
    ids = [str(i) for i in batch["id"]]
    index = np.asarray(batch["index"])
    live = [k for k in range(len(ids)) if index[k] >= 0]
    if skip is not None and all(skip(ids[k]) for k in live):
      continue
    if add_inputs is not None:
      batch = {**batch, **add_inputs(batch)}
    out = jax.device_get(fn(variables, mesh_lib.to_global(batch, mesh)))
    for k in live:
      yield source[int(index[k])], {name: value[k] for name, value in out.items()}


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
