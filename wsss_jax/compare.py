r"""Seeds and comparisons: run a config over several seeds, report mean ± std.

  python -m wsss_jax.compare --config=configs/synthetic/fbr.py --seeds=0,1,2 \
      --workdir=runs/compare/synthetic_fbr [--config.key=value ...]
  python -m wsss_jax.compare --collect runs/compare/synthetic_cam runs/compare/synthetic_fbr

The first form runs the config's stages once per seed in `WORKDIR/seed<k>` (`config.seed`
= k; the dataset, its synthetic generator seed included, stays the same, so seeds differ
only in initialisation, augmentation order and sampling) and writes `WORKDIR/summary.json`
with the mean, sample standard deviation (ddof=1) and per-seed values of every numeric
headline key of results.json. Seeds that already finished are not rerun (each stage
resumes). `--collect` prints a Markdown table of several such directories side by side,
from the seeds that have finished so far.
"""
from __future__ import annotations

import math
import os
from typing import Any

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from wsss_jax import fs
from wsss_jax.stages import workdir as wd

HEADLINE_KEYS = ("train_map", "baseline_map", "cam_miou", "cam_threshold", "pseudo_miou",
                 "spml_pseudo_miou", "spml_classifier_miou", "seg_miou", "seg_gt_miou")

_FLAGS: dict[str, Any] = {}


def define_flags() -> dict[str, Any]:
  """Flags, defined only when run as a program (absl flags are process-global, so a
  library import must not define a second `--config`)."""
  jax.config.parse_flags_with_absl()
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Config file.",
                                                lock_config=False),
      "seeds": flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run."),
      "workdir": flags.DEFINE_string("workdir", None, "Parent directory of the per-seed runs."),
      "collect": flags.DEFINE_bool("collect", False, "Tabulate the run directories given "
                                   "as arguments instead of running."),
  }


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
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else 0.0)
    out["metrics"][k] = {"mean": mean, "std": std, "values": values}
  total = [sum(r.get("timings", {}).values()) for r in results]
  out["metrics"]["total_seconds"] = {"mean": sum(total) / len(total), "std": 0.0,
                                     "values": total}
  return out


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


def collect(directory: str) -> dict[str, Any]:
  """The summary of a `run_seeds` directory from the seeds whose runs are complete (the
  `evaluate` stage finished), so a partly done comparison can already be read."""
  results, seeds = [], []
  for name in sorted(fs.listdir(directory)):
    path = os.path.join(directory, name, "results.json")
    if name.startswith("seed") and fs.exists(path):
      r = wd.read_json(path)
      if "evaluate" in r.get("timings", {}):
        results.append(r)
        seeds.append(int(name[len("seed"):]))
  if not results:
    raise FileNotFoundError(f"{directory}: no finished seed*/results.json")
  return summarize(results, seeds)


def run_seeds(config, seeds: list[int], workdir: str) -> dict[str, Any]:
  from wsss_jax.stages import runner  # pylint: disable=import-outside-toplevel
  for seed in seeds:
    c = type(config)(config.to_dict())
    c.seed = seed
    runner.run_stages(c, os.path.join(workdir, f"seed{seed}"))
  # Every finished seed in the directory, also those of earlier invocations (adding seeds
  # later extends the summary instead of replacing it).
  summary = collect(workdir)
  wd.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def main(argv) -> None:
  if _FLAGS["collect"].value:
    summaries = {}
    for d in argv[1:]:
      summaries[os.path.basename(os.path.normpath(d))] = collect(d)
    print(markdown_table(summaries))
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]} (directories need --collect)")
  if _FLAGS["config"].value is None or not _FLAGS["workdir"].value:
    raise app.UsageError("give --config and --workdir (or --collect DIR ...)")
  summary = run_seeds(_FLAGS["config"].value, [int(s) for s in _FLAGS["seeds"].value], _FLAGS["workdir"].value)
  print(markdown_table({os.path.basename(os.path.normpath(_FLAGS["workdir"].value)): summary}))


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  app.run(main)
