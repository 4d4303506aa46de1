"""Every import points down the layers of DESIGN.md "Layout" (issue #27).

fs < ops < models < methods < runtime < data < train < stages < analysis < bench < main:
a module may import its own layer and the layers below it, never one above. Imports inside
functions count too (a lazy import is still a dependency). The check reads the source
(`ast`), so it costs nothing and needs no JAX.
"""
from __future__ import annotations

import ast
import os
import sys

import pytest

from conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "wsss_jax")
# Bottom up. A top-level module is its own entry; `viz` (plots) sits with data: stages
# draw figures with it and it reads only the palette.
LAYERS = ("fs", "ops", "models", "methods", "runtime", "data|viz", "train", "stages",
          "analysis|compare", "bench", "main|predict_cli")
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names.split("|")}


def layer_of(module: str) -> str | None:
  """`wsss_jax.ops.cam` -> 'ops'; the package itself (`wsss_jax`) -> None."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "wsss_jax" else None


def package_imports(path: str, module: str) -> list[tuple[int, str]]:
  """(line, imported wsss_jax module) for every import in the file, at any depth."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = module.split(".")[:-node.level]
        name = ".".join(base + ([node.module] if node.module else []))
      else:
        name = node.module or ""
      # `from wsss_jax import ops` imports the submodule `wsss_jax.ops`.
      out += [(node.lineno, f"{name}.{a.name}" if name == "wsss_jax" else name)
              for a in node.names]
  return sorted((line, name) for line, name in out if name.split(".")[0] == "wsss_jax")


def modules() -> list[tuple[str, str]]:
  out = []
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        out.append((path, rel.removesuffix(".__init__")))
  return out


def upward_imports() -> list[str]:
  problems = []
  for path, module in modules():
    own = layer_of(module)
    if own is None:
      continue
    for line, name in package_imports(path, module):
      other = layer_of(name)
      if other is not None and RANK[other] > RANK[own]:
        problems.append(f"{os.path.relpath(path, REPO_ROOT)}:{line}: {own} imports "
                        f"{name} ({other} is above {own})")
  return problems


def test_every_layer_is_known():
  unknown = {layer_of(m) for _, m in modules()} - set(RANK) - {None}
  assert not unknown, f"add {sorted(unknown)} to LAYERS (and to DESIGN.md's Layout)"


def test_imports_point_down():
  problems = upward_imports()
  assert not problems, "imports from a lower layer to a higher one:\n" + "\n".join(problems)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
  # The check must be able to fail: a fake `ops` module importing `methods` (directly, and
  # lazily inside a function, and relatively) is reported three times.
  fake = tmp_path / "wsss_jax" / "ops"
  fake.mkdir(parents=True)
  (fake / "bad.py").write_text(
      "from wsss_jax.methods import cam\n"
      "def f():\n  import wsss_jax.stages.runner\n"
      "from ..train import loop\n"
      "from wsss_jax.ops import metrics\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(tmp_path / "wsss_jax"))
  monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", str(tmp_path))
  problems = upward_imports()
  assert len(problems) == 3, problems
  assert "ops imports wsss_jax.methods" in problems[0]
  assert "ops imports wsss_jax.stages.runner" in problems[1]
  assert "ops imports wsss_jax.train" in problems[2]


@pytest.mark.parametrize("module,layer", [("wsss_jax.ops.cam", "ops"),
                                          ("wsss_jax.fs", "fs"), ("wsss_jax", None)])
def test_layer_of(module, layer):
  assert layer_of(module) == layer


def test_stages_import_helpers_not_each_other():
  # A stage orchestrates; what two stages share lives in a helper module of stages/ (or
  # lower), so no stage is another's library.
  from wsss_jax.stages import registry  # pylint: disable=import-outside-toplevel
  stage_modules = {s.module for s in registry.STAGES}
  problems = []
  for path, module in modules():
    if module in stage_modules:
      problems += [f"{module}:{line} imports the stage {name}"
                   for line, name in package_imports(path, module) if name in stage_modules]
      problems += [f"{module}:{line} imports the stage {name}.{alias}"
                   for line, name, alias in _from_imports(path)
                   if f"{name}.{alias}" in stage_modules]
  assert not problems, "\n".join(problems)


def _from_imports(path: str) -> list[tuple[int, str, str]]:
  """(line, module, name) of every `from module import name`."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  return [(node.lineno, node.module or "", a.name) for node in ast.walk(tree)
          if isinstance(node, ast.ImportFrom) for a in node.names]
