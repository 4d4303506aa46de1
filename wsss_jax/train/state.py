"""TrainState and its sharded creation (nothing is materialised on the host first).

Creation (JAX_NOTES §2, big_vision): `jax.eval_shape` gives the abstract state, its
shardings are derived (replicated for data parallelism), and `jax.jit(init,
out_shardings=...)` builds it directly on the devices. Pretrained weights, which come from
host files, are loaded between two jitted halves: model variables are initialised on
device, `method.load_pretrained` fills them, they are placed with the state sharding, and
the second half builds the optimizer state and the method's extra state (an EMA teacher
must start from the pretrained weights) from them.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wsss_jax import models
from wsss_jax.methods.base import Method
from wsss_jax.runtime import mesh as mesh_lib
from wsss_jax.train import optim as optim_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, checkpointed whole.

  Attributes:
    step: int32 scalar, number of updates done.
    params: model params (float32 whatever the compute dtype).
    batch_stats: BatchNorm running statistics (`{}` for models without BatchNorm).
    opt_state: optax state.
    extra: the method's extra state (`Method.init_extra`), `{}` for CAM.
    rng: typed PRNG key; the step uses `fold_in(rng, step)`, so it never changes and a
      resumed run draws the same numbers.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  extra: PyTree
  rng: jax.Array


def _shape(x: Any) -> tuple[tuple[int, ...], Any]:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), x.dtype
  return tuple(x), jnp.float32


def init_images(sample_batch_shapes: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
  """Abstract images `[1, H, W, 3]` used to initialise the model.

  Args:
    sample_batch_shapes: dict with at least `image`, given as a shape tuple, an array or a
      `ShapeDtypeStruct` (`[B, H, W, 3]`).
  """
  shape, _ = _shape(sample_batch_shapes["image"])
  return jax.ShapeDtypeStruct((1,) + shape[1:], jnp.float32)


def abstract_variables(method: Method, sample_batch_shapes: Mapping[str, Any]) -> PyTree:
  """`{'params', 'batch_stats'}` as `ShapeDtypeStruct`s (no computation)."""
  images = init_images(sample_batch_shapes)
  return jax.eval_shape(lambda r: method.init(r, jnp.zeros(images.shape, images.dtype)),
                        jax.random.key(0))


def make_optimizer_for(method: Method, config: Any,
                       sample_batch_shapes: Mapping[str, Any]) -> optim_lib.Optimizer:
  """The optimizer from `config.optim` for this method's (abstract) params."""
  v = abstract_variables(method, sample_batch_shapes)
  # Frozen BatchNorm statistics (model.frozen_bn) freeze the BN affine parameters too unless
  # optim.freeze_bn_affine=False (IRN's FixedBatchNorm: fixed statistics, trained affine).
  frozen_bn = (bool(config.model.get("frozen_bn", False))
               and bool(config.optim.get("freeze_bn_affine", True)))
  return optim_lib.make_optimizer(
      config.optim, int(config.train.num_steps), v["params"], batch_stats=v["batch_stats"],
      frozen_bn=frozen_bn, extra_frozen=models.frozen_param_regexes(config.model))


def _base_key(config: Any) -> jax.Array:
  return jax.random.key(int(config.get("seed", 0)))


def _finish(method: Method, tx: optax.GradientTransformation, variables: PyTree,
            key: jax.Array) -> TrainState:
  params, batch_stats = variables["params"], variables["batch_stats"]
  extra = method.init_extra(jax.random.fold_in(key, 1), variables)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), extra=extra, rng=jax.random.fold_in(key, 2))


def _init_all(method: Method, tx: optax.GradientTransformation, images_shape,
              key: jax.Array) -> TrainState:
  variables = method.init(jax.random.fold_in(key, 0), jnp.zeros(images_shape, jnp.float32))
  return _finish(method, tx, variables, key)


# Leaves smaller than this stay replicated under FSDP: splitting a bias or a BatchNorm
# scale saves nothing and adds an all-gather per use.
FSDP_MIN_SIZE = 2 ** 14


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """PartitionSpec splitting the largest dimension divisible by `fsdp` over `fsdp`.

  Replicated (`P()`) for leaves under `min_size` elements or without such a dimension.
  Conv kernels `[kh, kw, in, out]` are thus split on their channel dimensions.
  """
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % fsdp == 0]
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[int(dims[0])] = mesh_lib.FSDP_AXIS
  return P(*spec)


def state_shardings(abstract: PyTree, mesh: Mesh, *,
                    min_size: int = FSDP_MIN_SIZE) -> PyTree:
  """Shardings of the train state (or any pytree of arrays / ShapeDtypeStructs).

  Replicated on a data-parallel mesh. On a mesh with an `fsdp` axis, every leaf of at
  least `min_size` elements (params, their optimizer moments, an EMA teacher) is split
  over `fsdp` along its largest divisible dimension (`fsdp_spec`); the rest, the step and
  the rng stay replicated.
  """
  repl = mesh_lib.replicated(mesh)
  if mesh_lib.FSDP_AXIS not in mesh.axis_names or mesh.shape[mesh_lib.FSDP_AXIS] == 1:
    return jax.tree.map(lambda _: repl, abstract)
  fsdp = int(mesh.shape[mesh_lib.FSDP_AXIS])

  def leaf(x):
    if not hasattr(x, "shape") or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return repl
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size))

  return jax.tree.map(leaf, abstract)


def abstract_train_state(method: Method, config: Any, mesh: Mesh,
                         sample_batch_shapes: Mapping[str, Any], *,
                         optimizer: optim_lib.Optimizer | None = None) -> TrainState:
  """The train state as `ShapeDtypeStruct`s carrying their shardings (restore target)."""
  optimizer = optimizer or make_optimizer_for(method, config, sample_batch_shapes)
  images = init_images(sample_batch_shapes)
  abstract = jax.eval_shape(lambda k: _init_all(method, optimizer.tx, images.shape, k),
                            _base_key(config))
  shardings = state_shardings(
      abstract, mesh, min_size=int(config.mesh.get("fsdp_min_size", FSDP_MIN_SIZE)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(method: Method, config: Any, mesh: Mesh,
                       sample_batch_shapes: Mapping[str, Any], *,
                       optimizer: optim_lib.Optimizer | None = None) -> TrainState:
  """Initialises the train state directly with its sharding.

  Args:
    method: the Method (model, extra state).
    config: full config (`seed`, `optim`, `train.num_steps`, `model.frozen_bn`).
    mesh: the device mesh.
    sample_batch_shapes: `{'image': [B, H, W, 3] shape / array / ShapeDtypeStruct, ...}`;
      only the image's spatial size is used.
    optimizer: the optimizer to create `opt_state` for (default: from the config).

  Returns:
    A TrainState whose leaves are replicated over `mesh`.
  """
  optimizer = optimizer or make_optimizer_for(method, config, sample_batch_shapes)
  key = _base_key(config)
  images = init_images(sample_batch_shapes)
  abstract = abstract_train_state(method, config, mesh, sample_batch_shapes,
                                  optimizer=optimizer)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  if method.load_pretrained is None:
    return jax.jit(lambda k: _init_all(method, optimizer.tx, images.shape, k),
                   out_shardings=shardings)(key)
  var_shardings = {"params": shardings.params, "batch_stats": shardings.batch_stats}
  variables = jax.jit(lambda k: method.init(jax.random.fold_in(k, 0),
                                            jnp.zeros(images.shape, jnp.float32)),
                      out_shardings=var_shardings)(key)
  loaded = method.load_pretrained(variables)
  loaded = {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
  # Same structure and shapes are required: a converter that drops or renames a leaf must
  # fail here, not silently train from random weights.
  jax.tree.map(lambda a, b: _check_same_shape(a, b), variables, loaded)
  # Host arrays stay on the host until device_put places them with the state sharding.
  loaded = jax.tree.map(lambda x, a: x.astype(a.dtype) if hasattr(x, "astype")
                        else np.asarray(x, a.dtype), loaded, variables)
  loaded = jax.device_put(loaded, var_shardings)
  return jax.jit(lambda v, k: _finish(method, optimizer.tx, v, k),
                 out_shardings=shardings)(loaded, key)


def _check_same_shape(a, b):
  if tuple(a.shape) != tuple(np.shape(b)):
    raise ValueError(f"load_pretrained changed a shape: {a.shape} -> {np.shape(b)}")
