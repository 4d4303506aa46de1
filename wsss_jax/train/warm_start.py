"""Warm start: copy the leaves two variable trees share into freshly initialised ones.

CSRM starts from a trained CAM baseline (METHODS.md §2.1): its backbone and CAM classifier
are copied, the new heads (segmentation decoder, projection) keep their random init. The
rule is structural so it needs no per-method table: a leaf is copied when the same path
exists in the saved tree with the same shape. A saved leaf of the same path but another
shape is an error (a different backbone or class count), not something to skip silently.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

PyTree = Any


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _copy_dicts(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def merge_matching(variables: Mapping[str, Any], saved: Mapping[str, Any], source: str = ""
                   ) -> tuple[dict[str, Any], list[str], list[str]]:
  """Returns `(merged, copied_paths, fresh_paths)`.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` freshly initialised (and ImageNet
      loaded) for the new model.
    saved: variables of a trained model (e.g. `inference.load_variables(...)`).
    source: name of the saved file, for error messages.

  Raises:
    ValueError: a shared path with a different shape, or no leaf in common at all.
  """
  merged = _copy_dicts(variables)
  target, donor = _flatten(variables), _flatten(saved)
  copied, fresh = [], []
  for path, value in target.items():
    name = "/".join(path)
    if path not in donor:
      fresh.append(name)
      continue
    if tuple(np.shape(donor[path])) != tuple(np.shape(value)):
      raise ValueError(f"{source}: warm-start leaf {name} has shape {np.shape(donor[path])}, "
                       f"the model wants {np.shape(value)} (another backbone or class count?)")
    _set(merged, path, np.asarray(donor[path], dtype=np.asarray(value).dtype))
    copied.append(name)
  if not copied:
    raise ValueError(f"{source}: no parameter in common with the model; is "
                     "config.train.init_from the right file?")
  return merged, copied, fresh
