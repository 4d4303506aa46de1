"""NaN/Inf guard: find the first non-finite metric, refuse to checkpoint a non-finite state.

The loop keeps each step's metrics on device (no per-step host sync) and checks all of them
at every log/checkpoint boundary, so the error names the exact first bad step and metric.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Metrics whose non-finite value means the run is broken (others, e.g. a ratio with an empty
# denominator, are reported but do not stop training).
GUARDED_PREFIXES = ("loss", "l2_")


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf. Attributes: step, metric, value."""

  def __init__(self, message: str, *, step: int | None = None, metric: str | None = None,
               value: float | None = None):
    super().__init__(message)
    self.step, self.metric, self.value = step, metric, value


def first_non_finite(history: Iterable[tuple[int, Mapping[str, Any]]],
                     prefixes: tuple[str, ...] = GUARDED_PREFIXES
                     ) -> tuple[int, str, float] | None:
  """First `(step, metric, value)` with a non-finite guarded metric, or None.

  Args:
    history: `(step, host metrics dict)` in step order.
    prefixes: metric-name prefixes to guard.
  """
  for step, metrics in history:
    for name in sorted(metrics):
      if name.startswith(prefixes):
        value = float(np.asarray(metrics[name]))
        if not np.isfinite(value):
          return step, name, value
  return None


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  ok = jnp.array(True)
  for x in leaves:
    ok &= jnp.all(jnp.isfinite(x))
  return ok


def tree_all_finite(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is finite (keys and ints are skipped)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(_all_finite(leaves)) if leaves else True
