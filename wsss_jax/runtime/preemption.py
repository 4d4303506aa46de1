"""Preemption: SIGTERM or Ctrl-C stops a run at the next safe point, saved, with a
documented exit code.

Cloud schedulers (Kubernetes, SLURM `--signal`, spot/preemptible VMs) send SIGTERM and
kill the job a grace period later; a user at a terminal presses Ctrl-C (SIGINT). Both get
the same treatment: the `wsss` command installs `install()`'s handler, which only sets a
flag (a signal handler must not do I/O or touch JAX), instead of Python's
KeyboardInterrupt, which would unwind from wherever it lands and lose every step since the
last periodic checkpoint. Long loops poll the flag at their safe points:

- the training loop (`train/loop.py`) after every step: it saves a checkpoint of that step
  (train state and data-iterator position, so the resumed run is exact) and raises
  `Preempted`;
- batched inference (`stages/inference.predict_split`: CAMs, pseudo-labels, evaluation,
  periodic evals) before every batch: the per-image files already written are kept, a
  rerun skips them;
- the stage runner before every stage.

`wsss` then exits with `EXIT_CODE` (75, `EX_TEMPFAIL`: "try again"); rerunning the same
command continues. The time from the signal to exit is at most one train step plus one
checkpoint save, or one inference batch; the `data` build (atomic: a temporary folder
renamed when complete) and the CPU-only sweep/scoring loops run to their end first. A
second signal (SIGTERM or Ctrl-C) kills the process at once (nothing trusted is lost:
every output is written atomically, see `stages/workdir.py`).

With several processes the flag is agreed collectively (`should_stop`, every `SYNC_EVERY`
steps or batches): every process stops at the same step or batch, as the collectives in
the step require.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from absl import logging
import jax

# os.EX_TEMPFAIL: a temporary failure; the caller is invited to retry (rerun to continue).
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)

# With several processes, how many calls of `should_stop` share one collective check.
SYNC_EVERY = 10

_requested = threading.Event()
_calls = 0
_previous: dict[int, Any] = {}


class Preempted(Exception):
  """The run stopped at a safe point after a preemption signal; rerun to continue.

  Attributes:
    where: the safe point (e.g. 'train step 12', 'cams batch of split train').
    step: the train step saved, when stopped in a training loop.
    checkpoint: the checkpoint directory written, when there is one.
  """

  def __init__(self, where: str, *, step: int | None = None, checkpoint: str | None = None):
    saved = f"; saved checkpoint step {step} in {checkpoint}" if checkpoint else ""
    super().__init__(f"Preempted at {where}{saved}. Rerun the same command to continue.")
    self.where, self.step, self.checkpoint = where, step, checkpoint


def _handler(signum: int, frame: Any) -> None:
  del frame
  if _requested.is_set():
    # Second signal: the user (or scheduler) insists. Die now with the default action;
    # atomic writes guarantee a rerun trusts nothing half-written.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  _requested.set()
  # logging from a handler is safe enough here: it runs between bytecodes of the main
  # thread, not inside a C library call.
  again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
  logging.warning("%s received: stopping at the next step/batch boundary after saving "
                  "(%s to exit at once).", signal.Signals(signum).name, again)


def install() -> None:
  """Installs the flag-setting handler for SIGTERM and SIGINT (main thread only;
  idempotent)."""
  if threading.current_thread() is not threading.main_thread():
    logging.warning("preemption.install: not on the main thread; SIGTERM/SIGINT not "
                    "handled.")
    return
  for sig in SIGNALS:
    if sig not in _previous:
      _previous[sig] = signal.signal(sig, _handler)


def uninstall() -> None:
  """Restores the handlers `install` replaced and clears the flag (tests, notebooks)."""
  for sig, previous in list(_previous.items()):
    signal.signal(sig, previous)
    del _previous[sig]
  _requested.clear()


def request() -> None:
  """Sets the flag as a signal would (tests; a supervisor thread that sees a notice)."""
  _requested.set()


def clear() -> None:
  _requested.clear()


def requested() -> bool:
  """True once this process got a preemption signal (local, free to call)."""
  return _requested.is_set()


def should_stop() -> bool:
  """True when any process got a preemption signal; every process must call it together.

  One process: the local flag. Several: a one-byte allgather, so all of them stop at the
  same step or batch (a process that stopped alone would leave the others waiting in a
  collective).
  """
  global _calls
  if jax.process_count() == 1:
    return requested()
  # The agreement is a host collective: pay for it every SYNC_EVERY calls only (every
  # process calls in the same order, so all of them sync at the same calls).
  _calls += 1
  if _calls % SYNC_EVERY:
    return False
  from wsss_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  return not distributed.all_processes_agree(not requested())


def raise_if_requested(where: str) -> None:
  """Raises `Preempted(where)` when `should_stop()`; for loops with no state to save."""
  if should_stop():
    raise Preempted(where)
