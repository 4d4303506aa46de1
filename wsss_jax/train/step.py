"""The one train step for every method, in two interchangeable implementations.

`config.mesh.step_impl`:

- `'jit'` (default): `jax.jit` over global arrays with `NamedSharding` (state replicated
  `P()`, batch `P('data')`), `donate_argnums=(0,)`. XLA inserts the gradient all-reduce, and
  BatchNorm computes its statistics over the global batch (SyncBN for free), so the result
  is the single-device result on any number of devices.

- `'shard_map'`: the same update written as per-device code with `jax.shard_map`
  (`check_vma=True`). Two things make it equal to the jit step:
  * Gradients: the step differentiates `lax.pmean(local_loss, 'data')`. Under
    `check_vma=True` the cotangent of a replicated (`P()`) parameter is summed over devices
    automatically, so the pmap idiom `pmean(grads)` would give `n_devices` times the true
    gradient (JAX_NOTES P3, re-verified by tests/test_train_step.py).
  * BatchNorm: every `nn.BatchNorm` applied inside the step must average its batch
    moments over `data` (SyncBN), as the jit step does implicitly. A model with a
    `bn_axis_name` attribute is cloned with `bn_axis_name='data'` (the explicit way). Any
    other Linen model gets the same effect through `flax.linen.intercept_methods`: the step
    sets `axis_name='data'` on each BatchNorm whose `axis_name` is None just before it runs
    (the module instances are the ones created for this trace, so nothing leaks out). This
    is how the registry models (`wsss_jax.models`, no `bn_axis_name` field) run under
    shard_map; tests/test_train_step.py checks both routes against the jit step. Should a
    BatchNorm still compute per-device statistics, `check_vma=True` rejects the step at
    trace time (the new `batch_stats` would not be replicated, as `out_specs=P()` needs).
  Method losses that are per-example means give the same value; losses that normalise by a
  global count must use `ctx.psum` (see `methods/cam.py`, `ignore_bg_images`). Random
  numbers differ from the jit step (each device folds its index into the key).

Metrics (`Method.loss` aux) are reduced with `base.reduce_metrics`: scalar means are
pmean-ed and `(num, den)` pairs psum-ed across devices (no-ops under jit, where arrays are
global). The step adds `loss`, `l2_grads` (trainable params only), `l2_params`,
`l2_updates`, `lr` (base) and `lr/<group>`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from wsss_jax.methods import base
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import optim as optim_lib
from wsss_jax.train.state import TrainState

StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


def sync_bn_model(model: nn.Module, axis_name: str) -> nn.Module:
  """`model` cloned with `bn_axis_name=axis_name` if it has that field, else unchanged."""
  if hasattr(model, "bn_axis_name"):
    return model.clone(bn_axis_name=axis_name)
  return model


@contextlib.contextmanager
def sync_batch_norm(axis_name: str):
  """Inside this context, Linen BatchNorms without an `axis_name` reduce over `axis_name`.

  Only for code traced inside `shard_map` (or another context that binds `axis_name`).
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and module.axis_name is None):
      # Linen modules are frozen dataclasses; this instance was created for the current
      # trace and is discarded after it, so setting the field here is local.
      object.__setattr__(module, "axis_name", axis_name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _update(method: base.Method, optimizer: optim_lib.Optimizer, ctx: base.StepContext,
            state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
  """One optimizer update; global arrays (ctx.axis_name None) or per-device (shard_map)."""

  def loss_fn(params):
    loss, aux = method.loss(params, state.batch_stats, state.extra, batch, rng, state.step,
                            ctx)
    aux = base.LossAux(*aux)
    # shard_map: differentiate the *global* mean loss (P3); identity under jit.
    return ctx.pmean(jnp.asarray(loss, jnp.float32)), aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = optimizer.zero_frozen(grads)  # No backward pass for frozen params (XLA DCE).
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  batch_stats = aux.batch_stats
  extra = method.update_extra(state.extra, params, batch_stats, aux.extra_aux, state.step,
                              ctx)
  metrics = base.reduce_metrics(aux.metrics, ctx.axis_name)
  metrics.update(loss=loss, l2_grads=optax.tree.norm(grads),
                 l2_params=optax.tree.norm(params), l2_updates=optax.tree.norm(updates),
                 lr=optimizer.schedule(state.step))
  for group, lr in optimizer.learning_rates(state.step).items():
    metrics[f"lr/{group}"] = lr
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, extra=extra)
  return new_state, metrics


def make_train_step(method: base.Method, optimizer: optim_lib.Optimizer, mesh: Mesh,
                    config: Any = None, *, step_impl: str | None = None,
                    state_shardings: Any = None) -> StepFn:
  """Builds the jitted, sharded train step `step(state, batch) -> (state, metrics)`.

  Args:
    method: the Method.
    optimizer: from `optim.make_optimizer` (or `state.make_optimizer_for`).
    mesh: the device mesh (axis `data`).
    config: full config; reads `config.mesh.step_impl` (`jit` | `shard_map`).
    step_impl: overrides the config.
    state_shardings: the TrainState's shardings (`state.abstract_train_state(...)`
      leaves' `.sharding`); default replicated. Needed for FSDP meshes, where large
      leaves are split over `fsdp`; the updated state keeps the same shardings.

  Returns:
    The jitted step. `state` is donated: do not reuse it after the call. `batch` holds
    global arrays (or host arrays, which jit shards) with the batch on axis 0; `metrics`
    are replicated float32 scalars.
  """
  if step_impl is None:
    step_impl = config.mesh.get("step_impl", "jit") if config is not None else "jit"
  repl, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  axis = mesh_lib.DATA_AXIS
  state_sh = repl if state_shardings is None else state_shardings
  if mesh_lib.FSDP_AXIS in mesh.axis_names and step_impl != "jit":
    raise ValueError(f"mesh.step_impl={step_impl!r} needs a data-parallel mesh; with "
                     "mesh.fsdp > 1 use step_impl='jit' (XLA inserts the FSDP gathers)")

  if step_impl == "jit":
    ctx = base.StepContext(model=method.model, axis_name=None)

    def step(state, batch):
      return _update(method, optimizer, ctx, state, batch,
                     jax.random.fold_in(state.rng, state.step))

  elif step_impl == "shard_map":

    ctx = base.StepContext(model=sync_bn_model(method.model, axis), axis_name=axis)

    def local_step(state, batch):
      rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                               jax.lax.axis_index(axis))
      with sync_batch_norm(axis):
        return _update(method, optimizer, ctx, state, batch, rng)

    step = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(axis)),
                         out_specs=(P(), P()), check_vma=True)
  else:
    raise ValueError(f"mesh.step_impl={step_impl!r}; expected 'jit' or 'shard_map'")

  return jax.jit(step, in_shardings=(state_sh, data), out_shardings=(state_sh, repl),
                 donate_argnums=(0,))
