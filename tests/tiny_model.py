"""A tiny Linen CAM model for the train-core tests (stands in for wsss_jax.models).

Same contract as the real CAM models (CONVENTIONS.md): `__call__(images, train) -> dict`
with `logits` [B, C-1] and `cams` [B, h, w, C-1]; params split into a `backbone` (the
"pretrained" part) and a `head`; BatchNorm takes its axis name from `bn_axis_name` so the
shard_map step can synchronise it; `dtype` is the compute dtype (params stay float32).
"""
from __future__ import annotations

import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


class TinyBackbone(nn.Module):
  width: int = 8
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), strides=(2, 2), dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=(not train) or self.frozen_bn, momentum=0.9,
                     axis_name=self.bn_axis_name, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


class TinyTwoScaleBackbone(nn.Module):
  """Stride-2 'stride4' map and stride-4 'out' map, with BatchNorm (SPML's input contract)."""

  @nn.compact
  def __call__(self, x, train: bool):
    s4 = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="conv1")(x))
    s4 = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(s4)
    out = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="conv2")(s4))
    return {"stride4": s4, "out": out}


class TinyCAM(nn.Module):
  """Conv(stride 2) + BN + ReLU backbone, 1x1-conv class maps, global average pooling."""
  num_fg: int
  width: int = 8
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, images, train: bool):
    feats = TinyBackbone(self.width, self.dtype, self.bn_axis_name, self.frozen_bn,
                         name="backbone")(images.astype(self.dtype), train)
    cams = nn.Conv(self.num_fg, (1, 1), dtype=self.dtype, name="head")(feats)
    logits = jnp.mean(cams.astype(jnp.float32), axis=(1, 2))
    return {"logits": logits, "cams": cams, "features": feats}


def tiny_config(**overrides):
  """A full config (configs/common.py blocks) sized for CPU tests."""
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs")
  if configs_dir not in sys.path:
    sys.path.insert(0, configs_dir)
  import common  # pylint: disable=import-error,import-outside-toplevel
  c = common.base_config(method="cam", dataset="synthetic", runlocal=True)
  c.data.batch_size = 16
  c.data.crop_size = 16
  c.optim.lr = 0.05
  c.optim.weight_decay = 1e-3
  c.train.num_steps = 10
  c.train.log_every = 2
  c.train.ckpt_every = 5
  c.train.progress = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def make_batches(n: int, batch: int = 16, size: int = 16, num_fg: int = 4, seed: int = 0):
  """Deterministic host batches in the CONVENTIONS.md train format."""
  rng = np.random.default_rng(seed)
  colors = np.random.default_rng(1234).normal(size=(num_fg, 3)).astype(np.float32)
  out = []
  for _ in range(n):
    labels = (rng.random((batch, num_fg)) < 0.4).astype(np.float32)
    labels[0] = 0  # an image with no foreground label
    img = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    img += (labels @ colors)[:, None, None, :]  # make the labels learnable
    out.append({"image": img, "labels": labels})
  return out


@pytest.fixture(scope="module", autouse=False)
def fast_compile():
  """XLA:CPU compiles `jax.random.normal` in ~2.5 s with optimisations on (measured on the
  2-core CI box), ~0.2 s without; these tests check math, not codegen, so they turn most
  optimisations off for their module and restore the flag afterwards. The SPMD
  partitioner, which the sharding tests exercise, runs either way."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def make_records(n: int = 48, size: int = 16, num_fg: int = 4, seed: int = 0):
  """In-memory records (a list is a grain random-access source)."""
  batches = make_batches(1, batch=n, size=size, num_fg=num_fg, seed=seed)[0]
  return [{"image": batches["image"][i], "labels": batches["labels"][i]} for i in range(n)]


def grain_train_iter(records, batch: int = 16, seed: int = 0):
  """A checkpointable grain iterator: shuffle each epoch, repeat forever, batch."""
  import grain  # pylint: disable=import-outside-toplevel
  return iter(grain.MapDataset.source(records).seed(seed).shuffle().repeat(None)
              .batch(batch, drop_remainder=True).to_iter_dataset())


def run_steps(method, cfg, n_dev: int, impl: str, batches):
  """Runs the real train step of `method` over `batches` on an `n_dev`-device mesh.

  Returns `(host state, [host metrics per step])`. Compare `n_dev=1, impl='jit'` with
  8 devices under `jit` and `shard_map` for "sharded == unsharded" tests.
  """
  from jax.sharding import PartitionSpec  # pylint: disable=import-outside-toplevel
  from wsss_jax.runtime import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  cfg.mesh.data = n_dev
  mesh = mesh_lib.make_mesh(cfg.mesh)
  opt = state_lib.make_optimizer_for(method, cfg, batches[0])
  state = state_lib.create_train_state(method, cfg, mesh, batches[0], optimizer=opt)
  step = step_lib.make_train_step(method, opt, mesh, cfg, step_impl=impl)
  history = []
  for b in batches:
    state, metrics = step(state, mesh_lib.to_global(b, mesh))
    history.append(jax.device_get(metrics))
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.spec == PartitionSpec() and len(leaf.sharding.device_set) == n_dev
  return jax.device_get(state), history


def max_abs_diff(a, b) -> float:
  """Largest absolute difference over two pytrees of the same structure."""
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
      a, b)))

