"""Sweep points timed in alternation, each in a fresh process (`bench --interleave=N`).

On a shared or drifting host, a step's time can move by 20 % within an hour with the code
unchanged (BENCHMARKS.md, 2026-11-22: one ResNet-50 step timed 2.14 s and then 2.51 s). A
plain `--sweep` times point A, then point B, in one process, so it compares two moments as
much as two programs. With `--interleave=N` the bench runs N rounds. Each round runs every
sweep point once, in sweep order, each in its own `python -m wsss_jax.bench` process (a
fresh compile and allocator). The summary gives each point's median per round and its
ratio to the first point of the same round, the number to read.

  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --steps=5 \\
      --sweep=model.maxpool_impl=window,argmax --interleave=3
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Callable, Sequence

# Flags the parent handles itself: the children get one pinned point each and print to
# stdout, and only the parent appends to `--out`.
_PARENT_FLAGS = ("interleave", "sweep", "out")


def child_argv(argv: Sequence[str], point: dict[str, str]) -> list[str]:
  """The bench arguments of one child: `argv` (without the program name) minus
  `--interleave`, `--sweep` and `--out` (as `--flag=v` or `--flag v`), plus one
  `--sweep=key=value` per key of `point`."""
  out, skip_next = [], False
  for arg in argv:
    if skip_next:
      skip_next = False
      continue
    name, has_value, _ = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in _PARENT_FLAGS:
      skip_next = not has_value
      continue
    out.append(arg)
  return out + [f"--sweep={key}={value}" for key, value in point.items()]


def schedule(points: Sequence[dict[str, str]], rounds: int) -> list[tuple[int, dict[str, str]]]:
  """`(round, point)` in run order: round 1 runs every point, then round 2, ..."""
  if rounds < 1:
    raise ValueError(f"--interleave must be >= 1, got {rounds}")
  if len(points) < 2:
    raise ValueError("--interleave needs a --sweep with at least 2 points to alternate")
  return [(r, dict(p)) for r in range(1, rounds + 1) for p in points]


def run_child(args: list[str]) -> list[dict]:
  """Runs `python -m wsss_jax.bench *args` and returns its JSON records."""
  proc = subprocess.run([sys.executable, "-m", "wsss_jax.bench", *args], capture_output=True,
                        text=True, check=False)
  if proc.returncode != 0:
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"bench child {' '.join(args)} exited with {proc.returncode}:\n{tail}")
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run(argv: Sequence[str], points: Sequence[dict[str, str]], rounds: int,
        emit: Callable[[dict], None],
        runner: Callable[[list[str]], list[dict]] = run_child) -> list[dict]:
  """Runs the schedule; every child record gets `round` and `sweep` and goes to `emit`."""
  records = []
  for round_, point in schedule(points, rounds):
    print(f"round {round_}/{rounds}: {point}", file=sys.stderr, flush=True)
    for record in runner(child_argv(argv, point)):
      record = {**record, "round": round_, "sweep": point}
      emit(record)
      records.append(record)
  return records


def format_rounds(records: Sequence[dict]) -> str:
  """Per measurement kind: each point's median per round, and its ratio to the round's
  first point (mean and range over rounds)."""
  timed = [r for r in records if "time_median_s" in r]
  groups: dict[tuple, dict[str, dict[int, float]]] = {}
  for r in timed:
    key = (r.get("kind"), r.get("method"), r.get("phase"), r.get("framework"))
    point = json.dumps(r["sweep"], sort_keys=True)
    groups.setdefault(key, {}).setdefault(point, {})[r["round"]] = r["time_median_s"]
  lines = []
  for key, by_point in groups.items():
    label = ":".join(str(k) for k in key if k is not None)
    rounds = sorted({rd for per_round in by_point.values() for rd in per_round})
    first = next(iter(by_point.values()))
    lines.append(f"{label}: s/call median per round {rounds}; ratio to the first point")
    for point, per_round in by_point.items():
      times = " ".join(f"{per_round[rd]:.3f}" if rd in per_round else "-" for rd in rounds)
      ratios = [per_round[rd] / first[rd] for rd in rounds if rd in per_round and rd in first]
      ratio = (f"{statistics.mean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
               if ratios else "-")
      lines.append(f"  {point}: {times}  ratio {ratio}")
  return "\n".join(lines)
