"""Progress lines of the per-image loops (`stages/progress.py`): counts, rate and ETA
against a fake clock."""
from wsss_jax.stages import progress


class Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def _progress(total, every_s=10.0):
  clock, lines = Clock(), []
  p = progress.Progress("pseudo 'train'", total, every_s=every_s, clock=clock,
                        log=lines.append)
  return p, clock, lines


def test_rate_and_eta_leave_out_the_first_batch_and_skipped_images():
  p, clock, lines = _progress(100)
  p.update(20, computed=False)           # a resumed run: these already existed
  clock.t += 30.0
  p.update(10)                           # first computed batch: compile time, no rate
  assert lines == ["pseudo 'train': 30/100 images (30%)"]
  clock.t += 4.0
  p.update(10)
  clock.t += 4.0
  p.update(10)                           # 20 images in 8 s after the first batch
  assert p.rate() == 2.5 and not lines[1:]  # under every_s since the last line
  clock.t += 4.0                         # 12 s since the last line: a new one
  p.update(10)                           # 30 images in 12 s: 2.5 img/s, 40 left
  assert lines[1:] == ["pseudo 'train': 60/100 images (60%), 2.5 img/s, ETA 16.0s"]
  clock.t += 16.0
  p.update(40)
  p.close()
  assert lines[2:] == ["pseudo 'train': 100 images in 58.0s (2.5 img/s)"]


def test_nothing_computed_says_so():
  p, _, lines = _progress(8)
  p.update(8, computed=False)
  p.close()
  assert lines == ["pseudo 'train': all 8 images were already done"]


def test_formats():
  assert progress.format_duration(3.44) == "3.4s"
  assert progress.format_duration(123) == "2m03s"
  assert progress.format_duration(3723) == "1h02m03s"
  assert progress.format_rate(12.34) == "12.3 img/s"
  assert progress.format_rate(0.25) == "4.0 s/img"
