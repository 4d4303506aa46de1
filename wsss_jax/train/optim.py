"""Optax optimizer from `config.optim`: schedules, parameter groups, decay masks, freezing.

Parameter groups (METHODS.md §1.4, §7.3), chosen by the parameter's path
`'backbone/stage1/conv/kernel'` (Linen module names joined by '/'):

| group             | which params                                   | LR multiplier (`optim.lr_mult`) |
|-------------------|------------------------------------------------|---------------------------------|
| `pretrained`      | path matches `optim.pretrained_regex`          | `pretrained` (x1)               |
|                   | (default `^backbone(/|$)`), leaf is not `bias` |                                 |
| `pretrained_bias` | same, leaf named `bias` (BatchNorm bias too)   | `pretrained_bias` (x2)          |
| `head`            | everything else, not `bias`                    | `head` (x10)                    |
| `head_bias`       | everything else, `bias`                        | `head_bias` (x20)               |
| `frozen`          | path matches any regex in `optim.frozen`       | no update (`set_to_zero`),      |
|                   | (`re.search`) or in the model's frozen stages  | no optimizer state              |
|                   | (`model.frozen_stride`), or a BatchNorm layer's |                                 |
|                   | params when `model.frozen_bn` and               |                                 |
|                   | `optim.freeze_bn_affine`                        |                                 |

This is the PNOC/PSA split: a BatchNorm `scale` counts as a weight, its `bias` as a bias.
BatchNorm layers are recognised structurally (their module path also holds `batch_stats`),
so no naming convention is assumed.

Weight decay: `optim.weight_decay` on every trainable parameter, except (`no_decay_bias`)
leaves named `bias` or `scale` (norm scales). SGD/Nesterov add it to the gradient before
momentum (PyTorch `SGD(weight_decay=...)`); AdamW decays decoupled (scaled by the LR).

Schedule (step = number of updates done so far, as optax counts):
  warm-up: lr * step / warmup_steps for step < warmup_steps;
  then with t = (step - warmup) / (num_steps - warmup) clipped to [0, 1]:
  poly: lr * (1 - t) ** poly_power; cosine: lr * (1 + cos(pi t)) / 2; constant: lr.

Order of the chain: zero the frozen grads -> global-norm clip (over trainable grads only,
`optim.clip_global_norm` > 0) -> per-group transform.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

PyTree = Any

GROUPS = ("pretrained", "pretrained_bias", "head", "head_bias")
FROZEN = "frozen"
_NODECAY = "/nodecay"
_DEFAULT_PRETRAINED_REGEX = r"^backbone(/|$)"


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple) -> str:
  """'a/b/kernel' for a jax key path."""
  return "/".join(_key_name(k) for k in path)


def make_schedule(optim_cfg: Mapping[str, Any], num_steps: int) -> Callable[[Any], jax.Array]:
  """Base learning rate as a function of the update count (see module docstring)."""
  lr = float(optim_cfg["lr"])
  kind = optim_cfg.get("schedule", "poly")
  warmup = int(optim_cfg.get("warmup_steps", 0))
  power = float(optim_cfg.get("poly_power", 0.9))
  if kind not in ("poly", "cosine", "constant"):
    raise ValueError(f"optim.schedule={kind!r}; expected poly | cosine | constant")
  decay_steps = max(int(num_steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "poly":
      value = lr * (1.0 - t) ** power
    elif kind == "cosine":
      value = lr * 0.5 * (1.0 + jnp.cos(math.pi * t))
    else:
      value = jnp.full_like(t, lr)
    if warmup > 0:
      value = jnp.where(step < warmup, lr * step / warmup, value)
    return value

  return schedule


def _norm_layer_paths(batch_stats: PyTree) -> set[str]:
  """Module paths that own BatchNorm statistics (parents of `mean`/`var` leaves)."""
  paths = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats or {})[0]:
    paths.add(path_str(path[:-1]))
  return paths


def param_labels(params: PyTree, optim_cfg: Mapping[str, Any], *,
                 batch_stats: PyTree = None, frozen_bn: bool = False,
                 extra_frozen: tuple[str, ...] = ()) -> PyTree:
  """Label per parameter: `frozen`, or a group from `GROUPS`, + '/nodecay' when undecayed.

  Args:
    params: the params pytree (arrays or `ShapeDtypeStruct`s).
    optim_cfg: `config.optim`.
    batch_stats: the batch_stats pytree; needed to find BatchNorm layers for `frozen_bn`.
    frozen_bn: freeze every BatchNorm layer's scale and bias.
    extra_frozen: further regexes of frozen paths (the model's frozen stages,
      `models.frozen_param_regexes`).

  Returns:
    A pytree of strings with the structure of `params`.
  """
  pretrained_re = re.compile(optim_cfg.get("pretrained_regex", _DEFAULT_PRETRAINED_REGEX))
  frozen = optim_cfg.get("frozen", ()) or ()
  if isinstance(frozen, str):  # `--config.optim.frozen='^backbone/stem,^backbone/layer1'`
    frozen = [f for f in frozen.split(",") if f]
  frozen_res = [re.compile(r) for r in list(frozen) + list(extra_frozen)]
  bn_paths = _norm_layer_paths(batch_stats) if frozen_bn else set()
  no_decay = bool(optim_cfg.get("no_decay_bias", True))

  def label(path, _):
    p = path_str(path)
    name = _key_name(path[-1])
    if any(r.search(p) for r in frozen_res) or path_str(path[:-1]) in bn_paths:
      return FROZEN
    group = "pretrained" if pretrained_re.search(p) else "head"
    if name == "bias":
      group += "_bias"
    if no_decay and name in ("bias", "scale"):
      group += _NODECAY
    return group

  return jax.tree_util.tree_map_with_path(label, params)


def _group_tx(optim_cfg: Mapping[str, Any], lr_fn, decay: float
              ) -> optax.GradientTransformation:
  name = optim_cfg.get("name", "sgd")
  momentum = float(optim_cfg.get("momentum", 0.9))
  if name in ("sgd", "nesterov"):
    parts = []
    if decay > 0:
      parts.append(optax.add_decayed_weights(decay))
    parts.append(optax.sgd(lr_fn, momentum=momentum or None, nesterov=(name == "nesterov")))
    return optax.chain(*parts)
  if name == "adamw":
    return optax.adamw(lr_fn, b1=float(optim_cfg.get("b1", 0.9)),
                       b2=float(optim_cfg.get("b2", 0.999)),
                       eps=float(optim_cfg.get("eps", 1e-8)), weight_decay=decay)
  raise ValueError(f"optim.name={name!r}; expected sgd | nesterov | adamw")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optax transformation plus what the loop and tests need to know about it.

  Attributes:
    tx: the optax GradientTransformation.
    labels: per-parameter label pytree (see `param_labels`).
    schedule: base LR as a function of the update count.
    lr_mult: LR multiplier per group.
  """
  tx: optax.GradientTransformation
  labels: PyTree
  schedule: Callable[[Any], jax.Array]
  lr_mult: Mapping[str, float]

  def learning_rates(self, step) -> dict[str, jax.Array]:
    """LR per group at update count `step` (only the groups that have parameters)."""
    present = {l.split("/")[0] for l in jax.tree.leaves(self.labels)} - {FROZEN}
    base_lr = self.schedule(step)
    return {g: base_lr * self.lr_mult[g] for g in GROUPS if g in present}

  def trainable(self) -> PyTree:
    """Pytree of bools: True for parameters that the optimizer moves."""
    return jax.tree.map(lambda l: l != FROZEN, self.labels)

  def zero_frozen(self, tree: PyTree) -> PyTree:
    """Replaces the leaves of frozen parameters by zeros (kills their backward pass too)."""
    return jax.tree.map(lambda l, g: jnp.zeros_like(g) if l == FROZEN else g,
                        self.labels, tree)


def make_optimizer(optim_cfg: Mapping[str, Any], num_steps: int, params: PyTree, *,
                   batch_stats: PyTree = None, frozen_bn: bool = False,
                   extra_frozen: tuple[str, ...] = ()) -> Optimizer:
  """Builds the optimizer for `params` (arrays or abstract `ShapeDtypeStruct`s).

  Args:
    optim_cfg: `config.optim` (name, lr, momentum, weight_decay, schedule, poly_power,
      warmup_steps, clip_global_norm, lr_mult, no_decay_bias, frozen; optional
      pretrained_regex, b1, b2, eps).
    num_steps: total number of updates (`config.train.num_steps`), for the schedule.
    params: the params pytree.
    batch_stats: the batch_stats pytree (finds BatchNorm layers for `frozen_bn`).
    frozen_bn: freeze BatchNorm scales and biases (`config.model.frozen_bn` and
      `config.optim.freeze_bn_affine`).
    extra_frozen: further regexes of frozen parameter paths (the model's frozen stages).
  """
  labels = param_labels(params, optim_cfg, batch_stats=batch_stats, frozen_bn=frozen_bn,
                        extra_frozen=extra_frozen)
  schedule = make_schedule(optim_cfg, num_steps)
  mult_cfg = optim_cfg.get("lr_mult", {}) or {}
  lr_mult = {g: float(mult_cfg.get(g, 1.0)) for g in GROUPS}
  wd = float(optim_cfg.get("weight_decay", 0.0))

  transforms = {FROZEN: optax.set_to_zero()}
  for g in GROUPS:
    lr_fn = (lambda m: (lambda step: schedule(step) * m))(lr_mult[g])
    transforms[g] = _group_tx(optim_cfg, lr_fn, wd)
    transforms[g + _NODECAY] = _group_tx(optim_cfg, lr_fn, 0.0)
  used = set(jax.tree.leaves(labels))
  transforms = {k: v for k, v in transforms.items() if k in used}

  frozen_mask = jax.tree.map(lambda l: l == FROZEN, labels)
  chain = [optax.masked(optax.set_to_zero(), frozen_mask)]
  clip = float(optim_cfg.get("clip_global_norm", 0.0) or 0.0)
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(optax.multi_transform(transforms, labels))
  return Optimizer(tx=optax.chain(*chain), labels=labels, schedule=schedule, lr_mult=lr_mult)
