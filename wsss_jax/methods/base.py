"""The Method seam: what a WSSS method contributes to the one shared train step.

A method is a frozen bundle of a Linen model and pure functions. It has no loop, no
optimizer and no I/O: `wsss_jax.train.step.make_train_step` differentiates `loss`, applies
the optimizer, calls `update_extra`, and runs the whole thing sharded (jit) or per device
(shard_map). Everything here must be jittable and shape-static.

Signatures (`P` = params pytree, `S` = batch_stats pytree, `E` = extra pytree)::

  init_extra(rng, variables) -> E
      Extra state created once, after the model variables (and pretrained weights): an EMA
      teacher `{'params': ..., 'batch_stats': ...}`, memory banks, prototypes. `{}` for CAM.
      `variables` is `{'params': P, 'batch_stats': S}` (S may be `{}`).

  loss(params, batch_stats, extra, batch, rng, step, ctx) -> (scalar, LossAux)
      Pure. `params` is the only differentiated argument. `batch` is the train batch of
      CONVENTIONS.md (the global batch under jit, the per-device shard under shard_map).
      `rng` is a typed key already unique to this step (and device, under shard_map).
      `step` is the int32 number of updates done so far. `ctx` is a `StepContext`: call the
      model through `ctx.apply` (it is `self.model`, or its clone whose BatchNorm reduces over
      the device axis), and use `ctx.psum` / `ctx.pmean` / `ctx.all_gather` for any
      cross-example statistic (a global normaliser, a memory-bank enqueue) so the method is
      right under both step implementations; they are identities under jit.
      Returns the loss (float32 scalar, the mean over the batch) and
      `LossAux(metrics, batch_stats, extra_aux)`:
        - `metrics`: dict of float32 scalars that are means over the batch, or
          `(numerator, denominator)` pairs for ratios (precision, per-pixel accuracy) that the
          step sums across devices before dividing.
        - `batch_stats`: the new BatchNorm statistics (the input ones if unchanged).
        - `extra_aux`: whatever `update_extra` needs (teacher features to enqueue, ...).

  update_extra(extra, params, batch_stats, extra_aux, step, ctx) -> E
      Runs after the optimizer update, on the *new* params and batch_stats (the mean-teacher
      convention: the teacher tracks the updated student). Identity for CAM.

  export_variables(params, batch_stats, extra) -> {'params': P, 'batch_stats': S}
      The variables the later stages (CAMs, classification mAP) use once training ends:
      the student by default; CSRM's reference exports its EMA teacher.

Why a context argument instead of `model` inside the closures: under shard_map the BatchNorm
layers must reduce over the `data` axis (SyncBN), which needs a model clone with
`bn_axis_name='data'` (or, for models without that field, the step's BatchNorm
interception, see `train/step.py`), and cross-example statistics need the axis name; the
step passes both in, so one Method works unchanged under both implementations.

Under jit the loss sees the global batch and XLA partitions it; under shard_map it sees one
device's shard and the step differentiates `pmean(loss)`. A loss that is a per-example
mean is the same either way; one normalised by a global count must psum numerator and
count (`methods/cam.py` with `ignore_bg_images`, `methods/seg.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
Metrics = dict[str, Any]


class LossAux(NamedTuple):
  """Auxiliary output of `Method.loss` (a pytree, so it can leave `value_and_grad`)."""
  metrics: Metrics
  batch_stats: PyTree
  extra_aux: PyTree = None


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the train step tells a method's pure functions about how they are run.

  Attributes:
    model: the Linen model to apply (the method's model, or its SyncBN clone).
    axis_name: `None` under jit (arrays are global, XLA inserts collectives); `'data'`
      inside shard_map (arrays are per-device; reduce explicitly).
    train: whether BatchNorm uses batch statistics (always True in the train step).
  """
  model: nn.Module
  axis_name: str | None = None
  train: bool = True

  def apply(self, params: PyTree, batch_stats: PyTree, images: jax.Array, *,
            train: bool | None = None, **kwargs) -> tuple[dict[str, jax.Array], PyTree]:
    """Runs the model; returns `(outputs, new_batch_stats)`.

    In train mode with BatchNorm, `new_batch_stats` are the updated running statistics;
    otherwise the input `batch_stats` are returned unchanged.
    """
    train = self.train if train is None else train
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if train and batch_stats:
      out, mutated = self.model.apply(variables, images, train=True,
                                      mutable=["batch_stats"], **kwargs)
      return out, mutated["batch_stats"]
    return self.model.apply(variables, images, train=train, **kwargs), batch_stats

  def pmean(self, x: PyTree) -> PyTree:
    """Mean over devices inside shard_map; identity under jit (already global)."""
    return x if self.axis_name is None else jax.lax.pmean(x, self.axis_name)

  def psum(self, x: PyTree) -> PyTree:
    """Sum over devices inside shard_map; identity under jit."""
    return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

  def all_gather(self, x: PyTree) -> PyTree:
    """Concatenates per-device batches on axis 0 inside shard_map; identity under jit."""
    if self.axis_name is None:
      return x
    return jax.tree.map(lambda a: jax.lax.all_gather(a, self.axis_name, tiled=True), x)

  def all_gather_invariant(self, x: PyTree) -> PyTree:
    """`all_gather` whose result is typed device-invariant: the same global batch on every
    device, as replicated state (memory banks, queues, previous-batch prototypes) and
    computations that must agree across devices need under shard_map's `check_vma`
    (`lax.all_gather` is typed device-varying). Exact. Identity under jit."""
    if self.axis_name is None:
      return x
    return jax.tree.map(lambda a: _all_gather_invariant(a, self.axis_name), x)

  def local_rows(self, x: jax.Array, n_local: int) -> jax.Array:
    """This device's `n_local` rows of a global-batch array (all rows under jit)."""
    if self.axis_name is None:
      return x
    start = jax.lax.axis_index(self.axis_name) * n_local
    return jax.lax.dynamic_slice_in_dim(x, start, n_local, axis=0)

  def global_index(self, n_local: int) -> jax.Array:
    """int32 [n_local]: the index of each local row in the global batch (device-major
    under shard_map; 0..n-1 under jit)."""
    idx = jnp.arange(n_local, dtype=jnp.int32)
    if self.axis_name is None:
      return idx
    return jax.lax.axis_index(self.axis_name).astype(jnp.int32) * n_local + idx


def _all_gather_invariant(x: jax.Array, axis_name: str) -> jax.Array:
  """Tiled all-gather typed invariant. JAX's `all_gather_invariant` (not yet public in
  jax.lax) is Varying -> Invariant; without it, a psum of zero-padded blocks (x + 0: exact)
  is the same. Booleans travel as int32."""
  kind = x.dtype
  x = x.astype(jnp.int32) if kind == jnp.bool_ else x
  try:
    from jax._src.lax import parallel  # pylint: disable=import-outside-toplevel
    out = parallel.all_gather_invariant(x, axis_name, tiled=True)
  except (ImportError, AttributeError):
    n = x.shape[0]
    full = jnp.zeros((n * jax.lax.axis_size(axis_name),) + x.shape[1:], x.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, x, jax.lax.axis_index(axis_name) * n, 0)
    out = jax.lax.psum(full, axis_name)
  return out.astype(kind)


def _no_extra(rng: jax.Array, variables: PyTree) -> PyTree:
  del rng, variables
  return {}


def _identity_update(extra, params, batch_stats, extra_aux, step, ctx):
  del params, batch_stats, extra_aux, step, ctx
  return extra


def _export_student(params: PyTree, batch_stats: PyTree, extra: PyTree) -> dict[str, PyTree]:
  del extra
  return {"params": params, "batch_stats": batch_stats}


@dataclasses.dataclass(frozen=True)
class Method:
  """A WSSS method: model + extra state + pure loss + extra-state update.

  Attributes:
    name: method id (`cam`, `csrm`, ...), as in `config.method`.
    model: Linen module, `__call__(images, train) -> dict` (CONVENTIONS.md). To run under
      the shard_map step its BatchNorm layers must take their `axis_name` from a module
      attribute `bn_axis_name` (default None).
    loss: see the module docstring.
    init_extra: see the module docstring. Default: `{}`.
    update_extra: see the module docstring. Default: identity.
    load_pretrained: `variables -> variables`: puts pretrained weights into freshly
      initialised variables. It runs outside jit (it may read files); the train state
      places the result with the state sharding before `init_extra` and the optimizer
      state are built from it. Default: none.
    init_variables: `(rng, images) -> variables`; default `model.init(rng, images,
      train=False)`. `images` is a small float32 NHWC array.
    export_variables: see the module docstring. Default: the student.
  """
  name: str
  model: nn.Module
  loss: Callable[..., tuple[jax.Array, LossAux]]
  init_extra: Callable[[jax.Array, PyTree], PyTree] = _no_extra
  update_extra: Callable[..., PyTree] = _identity_update
  load_pretrained: Callable[[PyTree], PyTree] | None = None
  init_variables: Callable[[jax.Array, jax.Array], PyTree] | None = None
  export_variables: Callable[[PyTree, PyTree, PyTree], dict[str, PyTree]] = _export_student

  def init(self, rng: jax.Array, images: jax.Array) -> dict[str, PyTree]:
    """Randomly initialised model variables `{'params', 'batch_stats'}` (jittable)."""
    if self.init_variables is not None:
      variables = self.init_variables(rng, images)
    else:
      variables = self.model.init(rng, images, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def reduce_metrics(metrics: Metrics, axis_name: str | None = None) -> dict[str, jax.Array]:
  """Turns method metrics into float32 scalars, reduced across devices when `axis_name`.

  A scalar is a batch mean (pmean across devices); a `(num, den)` pair is summed across
  devices and divided (0 when the denominator is 0, not NaN, so empty classes do not trip
  the NaN guard).
  """
  out = {}
  for k, v in metrics.items():
    if isinstance(v, (tuple, list)):
      num, den = (jnp.asarray(a, jnp.float32) for a in v)
      if axis_name is not None:
        num, den = jax.lax.psum((num, den), axis_name)
      out[k] = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    else:
      v = jnp.asarray(v, jnp.float32)
      out[k] = v if axis_name is None else jax.lax.pmean(v, axis_name)
  return out
