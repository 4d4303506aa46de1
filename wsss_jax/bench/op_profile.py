"""Per-op profile of a compiled step: which HLO ops the time goes to.

  python -m wsss_jax.bench --backbone=resnet50 --batch=8 --crop=224 --what=profile

Traces `calls` steady-state calls of the compiled train step with `jax.profiler` (a
Perfetto trace) and matches each traced event to the HLO instruction of the same name in
the compiled module (`compiled.as_text()`). XLA:CPU traces one event per thunk, named
after its instruction (`ynn_fusion.245`, `dot.138`, `copy_bitcast_fusion.5`), so every
event gets:

- `category`: what the instruction computes, from its opcode or, for a fusion, the
  opcodes inside the fused computation: convolution, matmul, window/scatter (pools and
  their gradients), copy/transpose (layout changes), reduction, elementwise;
- `pass`: `backward` when JAX's metadata says the op came from a transpose (autodiff's
  backward), `forward` for a JVP, `other` for the rest (optimizer update, metrics), and
  `unlabelled` where XLA left no metadata (e.g. some convolution weight gradients);
- `module`: the Flax module path (`backbone/layer4_0/bn3`) from the metadata.

Read the numbers with two caveats. Thunks that are independent may run at the same time,
so the per-op seconds can sum to more than the wall time of a call. And a thunk that only
launches asynchronous work (XLA:CPU's Eigen matmuls, `dot.N`) is timed for the launch, not
the work. On GPU the trace names CUDA kernels, not HLO instructions, so few events match;
use the profile viewer there (the trace stays in `trace_dir`).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable, NamedTuple

import jax

CATEGORY_BY_OPCODE = (  # first match wins: the heaviest op inside a fusion names it
    ("convolution", "convolution"), ("dot", "matmul"),
    ("select-and-scatter", "window/scatter"), ("reduce-window", "window/scatter"),
    ("scatter", "window/scatter"), ("transpose", "copy/transpose"),
    ("copy", "copy/transpose"), ("reduce", "reduction"))
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


class HloOp(NamedTuple):
  """One instruction of a compiled module: its opcode, the opcodes of the computation it
  calls (fusions), and JAX's `op_name` metadata ('' where XLA left none)."""
  opcode: str
  called_opcodes: tuple[str, ...]
  op_name: str


def parse_hlo(text: str) -> dict[str, HloOp]:
  """Instruction name -> HloOp for every instruction of an HLO module's text."""
  bodies: dict[str, list[tuple[str, str, str, str]]] = {}
  current = None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = bodies.setdefault(head.group(1), [])
      continue
    inst = _INSTRUCTION.match(line)
    if inst and current is not None:
      name, _, opcode, rest = inst.groups()
      called = re.search(r"calls=%([\w.\-]+)", rest)
      meta = re.search(r'op_name="([^"]*)"', rest)
      current.append((name, opcode, called.group(1) if called else "",
                      meta.group(1) if meta else ""))
  ops = {}
  for body in bodies.values():
    for name, opcode, called, op_name in body:
      inner = bodies.get(called, [])
      if not op_name:  # a fusion without metadata: name it after its last op that has some
        op_name = next((m for *_, m in reversed(inner) if m), "")
      ops[name] = HloOp(opcode, tuple(i[1] for i in inner), op_name)
  return ops


def classify(op: HloOp) -> tuple[str, str, str]:
  """(category, pass, module) of one instruction (see the module docstring)."""
  opcodes = (op.opcode,) + op.called_opcodes
  category = next((cat for code, cat in CATEGORY_BY_OPCODE if code in opcodes),
                  "elementwise")
  if "transpose(" in op.op_name:
    pass_ = "backward"
  elif "jvp(" in op.op_name:
    pass_ = "forward"
  elif op.op_name:
    pass_ = "other"
  else:
    pass_ = "unlabelled"
  # 'jit(step)/transpose(jvp(CAMNet))/backbone/layer4_0/bn3/add_any' -> 'backbone/layer4_0/bn3':
  # drop the transformation wrappers (segments with parentheses) and the primitive.
  parts = [p for p in op.op_name.split("/")[:-1] if "(" not in p]
  return category, pass_, "/".join(parts)


def event_seconds(trace_path: str) -> tuple[dict[str, float], dict[str, int]]:
  """Total duration (s) and count of the complete ('X') events of a Perfetto JSON trace,
  by event name."""
  with gzip.open(trace_path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  seconds, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      seconds[e["name"]] += e.get("dur", 0) / 1e6  # Perfetto durations are microseconds
      counts[e["name"]] += 1
  return dict(seconds), dict(counts)


def trace_calls(call: Callable[[], Any], calls: int, trace_dir: str) -> tuple[str, float]:
  """Runs `call()` `calls` times under the profiler; (Perfetto trace path, wall s/call)."""
  before = set(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                         recursive=True))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(call())
    wall = (time.perf_counter() - t) / calls
  new = set(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                      recursive=True)) - before
  if not new:
    raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
  return max(new, key=os.path.getmtime), wall


def profile(call: Callable[[], Any], compiled: Any, *, calls: int = 2, warmup: int = 1,
            trace_dir: str) -> dict[str, Any]:
  """Profiles `calls` calls of `call()` (which runs `compiled` once and returns something
  to block on).

  Returns {'wall_s': seconds per call, 'trace': path, 'ops': [one dict per traced HLO
  instruction: op, opcode, category, pass, module, op_name, seconds (per call), events]},
  ops sorted by seconds, largest first. Events that are no HLO instruction (the runtime,
  Python frames; on GPU the kernels) are left out.
  """
  for _ in range(warmup):
    jax.block_until_ready(call())
  path, wall = trace_calls(call, calls, trace_dir)
  seconds, counts = event_seconds(path)
  hlo = parse_hlo(compiled.as_text())
  ops = []
  for name, total in seconds.items():
    if name not in hlo:
      continue
    category, pass_, module = classify(hlo[name])
    ops.append({"op": name, "opcode": hlo[name].opcode, "category": category,
                "pass": pass_, "module": module, "op_name": hlo[name].op_name,
                "seconds": total / calls, "events": counts[name] // calls})
  ops.sort(key=lambda r: -r["seconds"])
  return {"wall_s": wall, "trace": path, "ops": ops}


def summarize(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Seconds per call and op count by (pass, category), largest first."""
  groups: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
  for r in ops:
    groups[(r["pass"], r["category"])].append(r["seconds"])
  rows = [{"pass": p, "category": c, "seconds": sum(v), "ops": len(v)}
          for (p, c), v in groups.items()]
  return sorted(rows, key=lambda r: -r["seconds"])


def format_profile(result: dict[str, Any], top: int = 15) -> str:
  """The summary table, then the `top` slowest ops."""
  total = sum(r["seconds"] for r in result["ops"])
  lines = [f"wall {result['wall_s']:.3f} s/call; traced HLO ops {total:.3f} s/call "
           "(ops may overlap; async launches count only the launch)",
           f"{'pass':>9}  {'category':>15}  {'s/call':>7}  {'share':>5}  ops"]
  for r in summarize(result["ops"]):
    lines.append(f"{r['pass']:>9}  {r['category']:>15}  {r['seconds']:7.3f}  "
                 f"{r['seconds'] / max(total, 1e-12):5.1%}  {r['ops']}")
  lines.append(f"slowest {top} ops:")
  for r in result["ops"][:top]:
    lines.append(f"  {r['seconds']:7.4f}  {r['op']:<28} {r['category']:<15} {r['pass']:<8} "
                 f"{r['module']}")
  return "\n".join(lines)
