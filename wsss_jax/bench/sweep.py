"""Sweeps over config keys and the summary table of `python -m wsss_jax.bench`."""
from __future__ import annotations

import itertools

TABLE_COLUMNS = ("kind", "method", "backbone", "batch", "crop", "dtype", "devices",
                 "time_median_s", "time_p10_s", "time_p90_s", "img/s/device", "mfu",
                 "compile_s", "peak_mem_gib")


def set_key(config, dotted: str, value: object) -> None:
  """Sets `a.b.c` on a ConfigDict, casting strings to the existing value's type."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise KeyError(f"--sweep/--shortcut key {dotted!r}: no {p!r} in the config")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"--sweep key {dotted!r}: no {leaf!r} in the config")
  old = node[leaf]
  if isinstance(value, str) and not isinstance(old, str):
    value = (value.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(value)
  node[leaf] = value


def sweep_points(sweeps: list[str]) -> list[dict[str, str]]:
  """`['a=1,2', 'b=x,y']` -> the 4 combinations as `{key: value}` dicts."""
  axes = []
  for item in sweeps:
    key, sep, values = item.partition("=")
    if not sep or not values:
      raise ValueError(f"--sweep={item!r}: expected key=v1,v2")
    axes.append([(key, v) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def format_table(records: list[dict]) -> str:
  """Aligned text table of the step/inference records (kernel and op-profile records,
  which have their own tables, are left out)."""
  rows = [[_fmt(_label(r) if c == "kind" else r.get(c)) for c in TABLE_COLUMNS]
          for r in records
          if "kernel" not in r and not str(r.get("kind")).startswith("op_profile")]
  rows = [list(TABLE_COLUMNS)] + rows
  widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def _label(record: dict) -> str:
  """`kind`, or `breakdown:<framework>:<phase>` for the phases of `bench/breakdown.py`."""
  if "phase" in record:
    return f"{record['kind']}:{record.get('framework', '?')}:{record['phase']}"
  return str(record.get("kind"))


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
