"""Shared plumbing of the inference stages: trained variables on disk, sharded batched
prediction over a split (static shapes: images padded to P×P with a validity mask)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import flax.serialization
import jax
from jax.experimental import multihost_utils
import ml_collections as mlc
import numpy as np

from wsss_jax import fs
from wsss_jax.data import pipeline
from wsss_jax.data import sources
from wsss_jax.stages import progress as progress_lib
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import distributed
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.runtime import preemption

VARIABLES_FILE = "final_variables.msgpack"


def save_variables(path: str, params: Any, batch_stats: Any) -> None:
  """Writes trained `{'params', 'batch_stats'}` (msgpack), atomically.

  Every process must call it (arrays sharded over several processes, FSDP, are gathered
  collectively); process 0 writes, and all return once the file exists.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if jax.process_count() > 1:
    variables = multihost_utils.process_allgather(variables, tiled=True)
  variables = jax.device_get(variables)
  if distributed.is_chief():
    with wd.atomic_path(path) as tmp, open(tmp, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(variables))
  distributed.barrier("save_variables")


def load_variables(path: str) -> dict[str, Any]:
  """Reads variables written by `save_variables`, naming the file on failure."""
  if not fs.exists(path):
    raise FileNotFoundError(f"{path}: trained weights not found; run the stage that "
                            "writes them first (train or seg)")
  try:
    return flax.serialization.msgpack_restore(fs.read_bytes(path))
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
                  | None = None, what: str = "inference"
                  ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
  """Runs `batch_fn` over every image of `split`; yields `(record, outputs)` per image.

  `batch_fn(variables, batch)` is jitted here; `batch` is the eval batch of CONVENTIONS.md
  (global arrays, sharded on `data`) and its outputs must have the batch axis first.
  `variables` (e.g. trained weights) are a jit argument, replicated, not constants baked
  into the program: calling again with new weights (a periodic eval) reuses the compiled
  function. Batches whose images
  all satisfy `skip(id)` are not computed (resume). `record` is the source record
  (id, image, mask, labels, and `index`: its position in the split); outputs are host
  numpy arrays of one image, still padded.
  `add_inputs(batch)` adds host arrays to a batch before it goes to the devices (e.g. CAMs
  read from disk, batch axis first, padded like the images).
  With several processes each yields only its own share of the split (the eval pipeline
  gives every record to exactly one process); callers merge with `runtime.distributed`.
  Progress lines with an ETA (`stages/progress.py`) are named `what` and the split.
  """
  source = sources.get_source(config.data, split)
  pad = pipeline.eval_pad_size(source, config.data)
  batch_size = int(config.data.eval_batch_size)
  ds = pipeline.eval_dataset(source, config.data, pad_size=pad, batch_size=batch_size,
                             mesh=mesh, oversize="resize")
  run = compiled_batch_fn(batch_fn, mesh, variables)
  progress = progress_lib.Progress(f"{what} {split!r}", len(source))
  for number, batch in enumerate(ds):
    # Safe point for SIGTERM: outputs of earlier batches are on disk (callers write each
    # yielded image before asking for the next), so a rerun skips them.
    preemption.raise_if_requested(f"a batch of split {split!r}")
    ids = [str(i) for i in batch["id"]]
    index = np.asarray(batch["index"])
    live = [k for k in range(len(ids)) if index[k] >= 0]
    # Images of this global batch over all processes (each process sees its rows only).
    in_batch = min(batch_size, len(source) - number * batch_size)
    # The jitted call is collective over all processes: skip only when all of them can.
    if skip is not None and distributed.all_processes_agree(
        all(skip(ids[k]) for k in live)):
      progress.update(in_batch, computed=False)
      continue
    if add_inputs is not None:
      batch = {**batch, **add_inputs(batch)}
    out = run(batch)
    for k in live:
      record = source[int(index[k])]
      record["index"] = int(index[k])  # position in the split (for gather_indexed)
      yield record, {name: value[k] for name, value in out.items()}
    progress.update(in_batch)
  progress.close()


def compiled_batch_fn(batch_fn: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
                      mesh: jax.sharding.Mesh, variables: Any = None
                      ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """`batch_fn(variables, batch)` jitted over `mesh`, as a function of this process's
  host batch (batch axis first) returning this process's rows of the outputs (numpy).

  `variables` are put on the devices once (replicated) and passed as a jit argument.
  """
  # Outputs stay sharded like the batch: each process fetches only its own rows (its
  # images), never the whole global batch.
  data = mesh_lib.batch_sharding(mesh)
  fn = jax.jit(batch_fn, out_shardings=data)
  variables = jax.device_put({} if variables is None else variables,
                             mesh_lib.replicated(mesh))

  def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = fn(variables, mesh_lib.to_global(batch, mesh))
    return jax.device_get(multihost_utils.global_array_to_host_local_array(
        out, mesh, data.spec))

  return run


def local_slots(config: mlc.ConfigDict, num_records: int) -> int:
  """The most images one process gets from `predict_split` over `num_records` images
  (the `slots` of `distributed.gather_indexed`)."""
  batch_size = int(config.data.eval_batch_size)
  return pipeline.num_batches_eval(num_records, batch_size) * (
      batch_size // jax.process_count())
