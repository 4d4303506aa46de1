"""Progress lines with an ETA for the per-image loops (CAMs, pseudo-labels, evaluation,
`wsss predict`).

Log lines, not a bar: runs on clusters write to files, where a tqdm bar is one endless
line of carriage returns. A line every `every_s` seconds, and one when the loop ends:

  pseudo 'train': 96/276 images (35%), 3.1 img/s, ETA 58.1s
  pseudo 'train': 276 images in 1m32s (3.0 img/s)

The rate leaves out the first computed batch (it includes compiling) and images skipped
because their outputs already existed (a resumed run), so the ETA is what is left to do at
the current speed. Only process 0 logs; the counts it gets are the global ones.
"""
from __future__ import annotations

import time
from typing import Callable

from absl import logging
import jax

# Seconds between two progress lines of one loop.
EVERY_S = 30.0


def format_duration(seconds: float) -> str:
  """`1h02m03s`, `2m03s` or `3.4s`."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_rate(images_per_s: float) -> str:
  """`12.3 img/s`, or `4.2 s/img` below one image per second."""
  if images_per_s >= 1:
    return f"{images_per_s:.1f} img/s"
  return f"{1 / images_per_s:.1f} s/img"


class Progress:
  """Counts images of a loop of known length and logs progress lines.

  Args:
    what: the loop's name in the lines (e.g. "cams 'train'").
    total: images the loop will go through (all processes together).
    every_s: seconds between lines (default `EVERY_S`).
    clock: seconds, monotonic (tests pass a fake one).
    log: where lines go (default: absl INFO on process 0 only).
  """

  def __init__(self, what: str, total: int, *, every_s: float | None = None,
               clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] | None = None):
    self.what, self.total = what, int(total)
    self.every_s = EVERY_S if every_s is None else float(every_s)
    self._clock = clock
    self._log = log if log is not None else _chief_info
    self._start = self._last_line = clock()
    self.done = 0           # images passed, skipped ones included
    self._timed = 0         # images computed after the first computed batch
    self._timed_from = None  # clock at the end of the first computed batch

  def update(self, images: int, *, computed: bool = True) -> None:
    """Adds `images` (a batch); `computed=False` for images skipped as already done."""
    now = self._clock()
    self.done = min(self.total, self.done + int(images))
    if computed:
      if self._timed_from is None:
        self._timed_from = now  # the first batch carries the compile time: not a rate
      else:
        self._timed += int(images)
    if now - self._last_line >= self.every_s and self.done < self.total:
      self._last_line = now
      self._log(self.line(now))

  def rate(self, now: float | None = None) -> float | None:
    """Images per second since the first computed batch, or None before a second one."""
    now = self._clock() if now is None else now
    if self._timed_from is None or not self._timed or now <= self._timed_from:
      return None
    return self._timed / (now - self._timed_from)

  def line(self, now: float | None = None) -> str:
    """The progress line as it would be logged now."""
    rate = self.rate(now)
    pct = 100.0 * self.done / max(self.total, 1)
    text = f"{self.what}: {self.done}/{self.total} images ({pct:.0f}%)"
    if rate:
      eta = (self.total - self.done) / rate
      text += f", {format_rate(rate)}, ETA {format_duration(eta)}"
    return text

  def close(self) -> None:
    """Logs the closing line (total time and mean rate over the computed images)."""
    now = self._clock()
    if self._timed_from is None:  # a resumed loop whose outputs all existed
      self._log(f"{self.what}: all {self.done} images were already done")
      return
    text = f"{self.what}: {self.done} images in {format_duration(now - self._start)}"
    rate = self.rate(now)
    if rate:
      text += f" ({format_rate(rate)})"
    self._log(text)


def _chief_info(text: str) -> None:
  if jax.process_index() == 0:
    logging.info("%s", text)
