r"""Command line: runs the stages a config lists, in order, in one work directory.

  wsss --config=configs/synthetic/cam.py --workdir=runs/synthetic_cam
  wsss --config=configs/voc/cam.py:runlocal --config.data.root=../shared/data/msrc21 \
       --config.stages=data,train --workdir=runs/msrc

`wsss` is this module (`python -m wsss_jax.main`). The logic lives in
`wsss_jax.stages.runner.run_stages(config, workdir)` so notebooks call the same code.
"""
import logging as pylogging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `path.py` or `path.py:arg` (see configs/).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created if missing).")

# Exposes --jax_* flags (e.g. --jax_platforms). Required flags are marked only in run(),
# because this parses argv at import time (JAX_NOTES.md P7).
jax.config.parse_flags_with_absl()


class _QuietCheckpointLibrary(pylogging.Filter):
  """Drops orbax's INFO lines (a dozen per checkpoint save); its warnings still pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointLibrary())
  from wsss_jax.stages import runner  # after flag parsing: keeps `--help` fast
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if overrides:
    logging.info("Config overrides: %s", overrides)
  runner.run_stages(_CONFIG.value, _WORKDIR.value)


def run() -> None:
  """Console-script entry point (`wsss`)."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
