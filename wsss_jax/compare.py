r"""Methods against their control, seed by seed: run a matrix, report paired differences.

Run a matrix of configs (rows) x seeds; the row named by `--control` (default `cam`) is the
control every other row is compared with, seed by seed:

  python -m wsss_jax.compare --workdir=runs/matrix --seeds=0,1,2 \
      --row=cam=configs/voc/cam.py:runlocal --row=fbr=configs/voc/fbr.py:runlocal \
      --row="fbr_tap=configs/voc/fbr.py:runlocal,tap --config.fbr.lambda_fb=0.5" \
      --set=data.root=../shared/data/msrc21

Each cell runs in `WORKDIR/<row>/seed<k>` with `config.seed = k` (seeds outermost, so the
first seeds finish every row first and the shared baseline of a seed is trained once and
reused by the other rows: README, "Comparing methods"). `--set=KEY=VALUE` overrides every
row; a row may add its own `--config.KEY=VALUE` after the file. Finished cells are not
rerun (each stage resumes). `WORKDIR/summary.json` and the printed tables hold, per row, the
mean ± sample std (ddof=1) of each headline key, and per method row the **paired**
difference from the control: per seed, its mean ± std and how many seeds are positive, for
the CAM, pseudo-label, label (`labels_miou`: the labels the segmentation model trained on)
and segmentation mIoU, and per class.

  python -m wsss_jax.compare --collect [--control=runs/matrix/cam] DIR ...

tabulates finished runs without running anything. A DIR may be a matrix directory (its row
folders), a row directory (`seed<k>/` folders) or a plain work directory (its results.json,
seed taken from it); only finished runs (the `evaluate` stage done) count.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import shlex
from typing import Any

from absl import app
from absl import flags
import jax

from wsss_jax import fs
from wsss_jax.stages import workdir as wd

HEADLINE_KEYS = ("train_map", "baseline_map", "cam_miou", "cam_threshold", "pseudo_miou",
                 "spml_pseudo_miou", "spml_classifier_miou", "labels_miou", "seg_miou",
                 "seg_gt_miou")
# What a method is judged on against the control (paired, seed by seed).
PAIRED_KEYS = ("cam_miou", "pseudo_miou", "labels_miou", "seg_miou")
# Per-class IoU lists paired the same way: results key -> short name.
PER_CLASS_KEYS = {"cam_per_class_iou": "cam", "pseudo_per_class_iou": "pseudo",
                  "seg_per_class_iou": "seg"}

_FLAGS: dict[str, Any] = {}


def define_flags() -> dict[str, Any]:
  """Flags, defined only when run as a program (absl flags are process-global)."""
  jax.config.parse_flags_with_absl()
  return {
      "row": flags.DEFINE_multi_string(
          "row", [], "NAME=FILE.py[:ARG] [--config.KEY=VALUE ...]: one row of the matrix."),
      "set": flags.DEFINE_multi_string("set", [], "KEY=VALUE override for every row."),
      "control": flags.DEFINE_string("control", "cam", "The control row (or, with "
                                     "--collect, the control's directory)."),
      "seeds": flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run."),
      "workdir": flags.DEFINE_string("workdir", None, "Parent directory of the matrix."),
      "collect": flags.DEFINE_bool("collect", False, "Tabulate the directories given as "
                                   "arguments instead of running."),
  }


# ----------------------------------------------------------------------------------------
# Reading results.
# ----------------------------------------------------------------------------------------


def with_derived_keys(results: dict[str, Any]) -> dict[str, Any]:
  """Adds `labels_miou`: the mIoU of the labels the segmentation model trained on (SPML's
  own labels where it made them, else the pseudo stage's)."""
  out = dict(results)
  for key in ("spml_bootstrap_miou", "spml_pseudo_miou", "pseudo_miou"):
    if isinstance(results.get(key), (int, float)):
      out["labels_miou"] = results[key]
      break
  return out


def _finished(run_dir: str) -> dict[str, Any] | None:
  """A work directory's results.json (+ `seed` from its config.json and `class_names`
  from its sweep.json) if its `evaluate` stage finished, else None."""
  path = os.path.join(run_dir, wd.RESULTS)
  if not fs.exists(path):
    return None
  r = wd.read_json(path)
  if "evaluate" not in r.get("timings", {}):
    return None
  r = with_derived_keys(r)
  for name, key in (("config.json", "seed"), ("sweep.json", "class_names")):
    extra = os.path.join(run_dir, name)
    if key not in r and fs.exists(extra):
      value = wd.read_json(extra).get(key)
      if value is not None:
        r[key] = value
  return r


def load_runs(directory: str) -> dict[int, dict[str, Any]]:
  """seed -> finished results of a row directory (`seed<k>/`) or of a plain workdir."""
  plain = _finished(directory)
  if plain is not None:
    return {int(plain.get("seed", 0)): plain}
  runs = {}
  for name in sorted(fs.listdir(directory)) if fs.isdir(directory) else []:
    if name.startswith("seed") and name[len("seed"):].isdigit():
      r = _finished(os.path.join(directory, name))
      if r is not None:
        runs[int(name[len("seed"):])] = r
  return runs


def _is_row_dir(directory: str) -> bool:
  return (fs.exists(os.path.join(directory, wd.RESULTS))
          or any(n.startswith("seed") for n in fs.listdir(directory)))


def expand(directories: list[str]) -> dict[str, str]:
  """Row name -> directory: a matrix directory stands for its row folders."""
  rows = {}
  for d in directories:
    d = os.path.normpath(d)
    if fs.isdir(d) and not _is_row_dir(d):
      for name in sorted(fs.listdir(d)):
        sub = os.path.join(d, name)
        if fs.isdir(sub) and _is_row_dir(sub):
          rows[name] = sub
    else:
      rows[os.path.basename(d)] = d
  return rows


# ----------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value)."""
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
  """Mean, std (ddof=1; 0 for one seed) and values of each numeric headline-like key.

  A key enters when every run has it as a number (per-class lists are left out).
  """
  keys = [k for k in results[0]
          if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                 for r in results)]
  out = {"seeds": seeds, "method": results[0].get("method"),
         "dataset": results[0].get("dataset"), "backbone": results[0].get("backbone"),
         "metrics": {}}
  for k in keys:
    values = [float(r[k]) for r in results]
    mean, std = mean_std(values)
    out["metrics"][k] = {"mean": mean, "std": std, "values": values}
  total = [sum(r.get("timings", {}).values()) for r in results]
  out["metrics"]["total_seconds"] = {"mean": sum(total) / len(total), "std": 0.0,
                                     "values": total}
  return out


def paired(control: dict[int, dict[str, Any]], method: dict[int, dict[str, Any]],
           keys: tuple[str, ...] = PAIRED_KEYS) -> dict[str, Any]:
  """Paired differences method - control over the seeds both finished.

  Returns `{'seeds': [...], 'metrics': {key: {'diffs', 'mean', 'std', 'positive'}},
  'per_class': {short: {'mean': [C], 'std': [C], 'positive': [C]}}}`; a key enters when
  every paired run has it. Per-class entries are None for a class without an IoU in
  either run (absent from the split).
  """
  seeds = sorted(set(control) & set(method))
  out: dict[str, Any] = {"seeds": seeds, "metrics": {}, "per_class": {}}
  if not seeds:
    return out
  for k in keys:
    if all(isinstance(r.get(k), (int, float)) for s in seeds for r in (control[s], method[s])):
      diffs = [float(method[s][k]) - float(control[s][k]) for s in seeds]
      mean, std = mean_std(diffs)
      out["metrics"][k] = {"diffs": diffs, "mean": mean, "std": std,
                           "positive": sum(d > 0 for d in diffs)}
  for key, short in PER_CLASS_KEYS.items():
    lists = [(control[s].get(key), method[s].get(key)) for s in seeds]
    if not all(isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
               for a, b in lists):
      continue
    stats = {"mean": [], "std": [], "positive": []}
    for c in range(len(lists[0][0])):
      diffs = [b[c] - a[c] for a, b in lists if a[c] is not None and b[c] is not None]
      if not diffs:
        for v in stats.values():
          v.append(None)
        continue
      mean, std = mean_std(diffs)
      stats["mean"].append(mean)
      stats["std"].append(std)
      stats["positive"].append(sum(d > 0 for d in diffs))
    out["per_class"][short] = stats
  return out


# ----------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------


def markdown_table(summaries: dict[str, dict[str, Any]],
                   keys: tuple[str, ...] = HEADLINE_KEYS + ("total_seconds",)) -> str:
  """Rows = runs (directory names), columns = keys, cells = mean ± std (n seeds)."""
  present = [k for k in keys if any(k in s["metrics"] for s in summaries.values())]
  lines = ["| run | method | seeds | " + " | ".join(present) + " |",
           "|---" * (len(present) + 3) + "|"]
  for name, s in summaries.items():
    cells = []
    for k in present:
      m = s["metrics"].get(k)
      if m is None:
        cells.append("-")
      elif k == "total_seconds":
        cells.append(f"{m['mean'] / 60:.1f} min")
      else:
        cells.append(f"{m['mean']:.3f} ± {m['std']:.3f}")
    lines.append(f"| {name} | {s.get('method')} | {len(s['seeds'])} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def paired_table(pairs: dict[str, dict[str, Any]], control: str) -> str:
  """Rows = methods; cells = mean ± std of the paired difference (positive seeds / n)."""
  present = [k for k in PAIRED_KEYS if any(k in p["metrics"] for p in pairs.values())]
  lines = [f"| run - {control} | seeds | " + " | ".join(f"Δ {k}" for k in present) + " |",
           "|---" * (len(present) + 2) + "|"]
  for name, p in pairs.items():
    cells = []
    for k in present:
      m = p["metrics"].get(k)
      cells.append("-" if m is None else
                   f"{m['mean']:+.4f} ± {m['std']:.4f} ({m['positive']}/{len(m['diffs'])})")
    lines.append(f"| {name} | {','.join(map(str, p['seeds']))} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_class_table(pairs: dict[str, dict[str, Any]], class_names: list[str],
                    which: str = "pseudo") -> str:
  """Rows = classes, columns = methods: mean paired IoU difference of `which` labels."""
  names = [n for n, p in pairs.items() if which in p["per_class"]]
  if not names:
    return ""
  lines = [f"| class ({which} IoU) | " + " | ".join(names) + " |",
           "|---" * (len(names) + 1) + "|"]
  for c, cls in enumerate(class_names):
    cells = []
    for n in names:
      m = pairs[n]["per_class"][which]["mean"][c] if c < len(
          pairs[n]["per_class"][which]["mean"]) else None
      cells.append("absent" if m is None else f"{m:+.3f}")
    lines.append(f"| {cls} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------


def parse_row(spec: str) -> tuple[str, str, list[str]]:
  """`NAME=FILE.py[:ARG] [--config.K=V ...]` -> (name, 'FILE.py[:ARG]', overrides)."""
  name, sep, rest = spec.partition("=")
  parts = shlex.split(rest)
  if not sep or not name or not parts or not parts[0].split(":")[0].endswith(".py"):
    raise app.UsageError(f"--row={spec!r}: expected NAME=FILE.py[:ARG] [--config.K=V ...]")
  overrides = []
  for p in parts[1:]:
    if not p.startswith("--config.") or "=" not in p:
      raise app.UsageError(f"--row={spec!r}: {p!r} is not --config.KEY=VALUE")
    overrides.append(p[len("--config."):])
  return name, parts[0], overrides


def _set(config, dotted: str, text: str) -> None:
  """`config.<dotted> = text`, typed like the current value (as --config.K=V would)."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise app.UsageError(f"override {dotted}={text!r}: the config has no key {dotted!r}")
  current = node[leaf]
  if isinstance(current, bool):
    value: Any = text.lower() in ("1", "true")
  elif isinstance(current, (int, float)) and not isinstance(current, bool):
    value = type(current)(text)
  elif isinstance(current, (tuple, list)):
    value = ast.literal_eval(text)
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  else:
    value = text
  node[leaf] = value


def load_row_config(file_arg: str, overrides: list[str]):
  """The config of `FILE.py[:ARG]` with `KEY=VALUE` overrides applied."""
  path, _, arg = file_arg.partition(":")
  spec = importlib.util.spec_from_file_location(
      "compare_row_" + re.sub(r"\W", "_", os.path.abspath(path)), path)
  if spec is None or not os.path.isfile(path):
    raise app.UsageError(f"{file_arg}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, value = item.partition("=")
    _set(config, key, value)
  return config


def run_matrix(rows: list[tuple[str, str, list[str]]], seeds: list[int], workdir: str,
               control: str, overrides: list[str]) -> dict[str, Any]:
  from wsss_jax.stages import runner  # pylint: disable=import-outside-toplevel
  configs = {name: load_row_config(file_arg, overrides + row_overrides)
             for name, file_arg, row_overrides in rows}
  for seed in seeds:
    for name, config in configs.items():
      c = type(config)(config.to_dict())
      c.seed = seed
      runner.run_stages(c, os.path.join(workdir, name, f"seed{seed}"))
  return report(expand([workdir]), control, os.path.join(workdir, "summary.json"))


def report(rows: dict[str, str], control: str, summary_path: str | None = None
           ) -> dict[str, Any]:
  """Summaries and paired differences of the finished runs of `rows`; prints the tables."""
  runs = {name: load_runs(d) for name, d in rows.items()}
  runs = {name: r for name, r in runs.items() if r}
  if not runs:
    raise FileNotFoundError(f"{list(rows.values())}: no finished runs")
  summaries = {name: summarize(list(r.values()), sorted(r)) for name, r in runs.items()}
  print(markdown_table(summaries))
  out: dict[str, Any] = {"rows": summaries, "control": control, "paired": {}}
  if control in runs:
    out["paired"] = {name: paired(runs[control], r) for name, r in runs.items()
                     if name != control}
    if out["paired"]:
      print()
      print(paired_table(out["paired"], control))
      any_run = next(iter(runs[control].values()))
      names = any_run.get("class_names") or []
      if names:
        print()
        print(per_class_table(out["paired"], names))
  if summary_path:
    wd.write_json(summary_path, out)
  return out


def collect(directory: str) -> dict[str, Any]:
  """The summary of one row directory (or plain workdir) from its finished runs."""
  runs = load_runs(directory)
  if not runs:
    raise FileNotFoundError(f"{directory}: no finished seed*/results.json")
  return summarize(list(runs.values()), sorted(runs))


def main(argv) -> None:
  f = {k: v.value for k, v in _FLAGS.items()}
  if f["collect"]:
    rows = expand(argv[1:])
    control = f["control"]
    if control and os.path.isdir(control):  # a directory: add it as the control row
      name = os.path.basename(os.path.normpath(control))
      rows = {name: os.path.normpath(control), **{k: v for k, v in rows.items()
                                                  if k != name}}
      control = name
    report(rows, control)
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]} (directories need --collect)")
  if not f["row"] or not f["workdir"]:
    raise app.UsageError("give --row=NAME=FILE.py[:ARG] (one per row) and --workdir "
                         "(or --collect DIR ...)")
  rows = [parse_row(r) for r in f["row"]]
  names = [r[0] for r in rows]
  if len(set(names)) != len(names):
    raise app.UsageError(f"--row names must be unique, got {names}")
  run_matrix(rows, [int(s) for s in f["seeds"]], f["workdir"], f["control"], f["set"])


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  app.run(main)
