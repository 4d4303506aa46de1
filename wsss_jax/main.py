r"""Command line: runs the stages a config lists, in order, in one work directory.

  wsss --config=configs/synthetic/cam.py --workdir=runs/synthetic_cam
  wsss --config=configs/voc/cam.py:runlocal --config.data.root=../shared/data/msrc21 \
       --config.stages=data,train --workdir=runs/msrc

  wsss predict --workdir=runs/msrc --input=photos/ --output=out/   # wsss_jax/predict_cli.py

`wsss` is this module (`python -m wsss_jax.main`). The logic lives in
`wsss_jax.stages.runner.run_stages(config, workdir)` so notebooks call the same code.
"""
import glob
import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `path.py` or `path.py:arg` (see configs/).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created if missing).")
# Multi-host (wsss_jax/runtime/distributed.py). Every process runs the same command; with
# `auto`, SLURM (srun) and TPU_WORKER_HOSTNAMES are detected, `on` asks JAX's own cluster
# detection (TPU VM pods), explicit flags work anywhere (and localhost tests).
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed: auto-detect, always, never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (explicit multi-process start).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

# Exposes --jax_* flags (e.g. --jax_platforms). Required flags are marked only in run(),
# because this parses argv at import time (JAX_NOTES.md P7).
jax.config.parse_flags_with_absl()


# The keys most runs set (configs/common.py has them all; any key takes --config.KEY=VALUE).
COMMON_KEYS = (
    ("stages", "comma list of stages to run, in order"),
    ("method", "cam | csrm | fbr | spml | dscnet_r"),
    ("seed", "random seed (data order, initialisation)"),
    ("data.name / data.root", "synthetic | voc | coco, and the dataset folder"),
    ("data.train_split / sweep_split / val_split", "where to train, sweep, evaluate"),
    ("data.batch_size", "global train batch"),
    ("model.backbone", "efficientnet_lite0 | resnet50 | ..."),
    ("train.num_steps / optim.lr", "training schedule"),
    ("cams.scales / pseudo.mode", "CAM test-time scales; pseudo-label rule"),
    ("seg.pseudo_source", "segmentation labels: pseudo | gt (upper bound)"),
    ("rerun", "'' stops when outputs came from other settings; 'changed' remakes them"),
)


def usage() -> str:
  """`wsss --help`: the stages (from the registry), the config files and the common keys."""
  from wsss_jax.stages import registry  # pylint: disable=g-import-not-at-top
  lines = [__doc__.rstrip(), "", "Stages (config.stages; default "
           f"{','.join(registry.DEFAULT_STAGES)}):"]
  width = max(len(n) for n in registry.NAMES)
  lines += [f"  {s.name:<{width}}  {s.summary}" for s in registry.STAGES]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folders = sorted(glob.glob(os.path.join(repo, "configs", "*", "")))
  if folders:
    lines += ["", "Config files (configs/<dataset>/<method>.py, each with a CPU-sized "
              "`:runlocal` variant):"]
    lines += [f"  configs/{os.path.basename(os.path.dirname(f))}/: " + " ".join(
        os.path.basename(c) for c in sorted(glob.glob(os.path.join(f, "*.py"))))
              for f in folders]
  width = max(len(k) for k, _ in COMMON_KEYS)
  lines += ["", "Most used keys (--config.KEY=VALUE):"]
  lines += [f"  {k:<{width}}  {v}" for k, v in COMMON_KEYS]
  if __name__ != "__main__":  # the console script: absl lists only __main__'s own flags
    lines += ["", "Flags:", flags.FLAGS.module_help(sys.modules[__name__])]
  return "\n".join(lines) + "\n"


class _QuietCheckpointLibrary(pylogging.Filter):
  """Drops orbax's INFO lines (a dozen per checkpoint save); its warnings still pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointLibrary())
  from wsss_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  # Before anything starts a JAX backend.
  distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from wsss_jax.stages import preflight  # pylint: disable=g-import-not-at-top
  from wsss_jax.stages import registry  # pylint: disable=g-import-not-at-top
  from wsss_jax.stages import runner  # after flag parsing: keeps `--help` fast
  try:
    config = _CONFIG.value
    config.keys()   # a lazily loaded config file loads here
  except (ValueError, OSError) as e:  # a config file that does not exist or does not load
    preflight.fatal(f"--config={flags.FLAGS['config'].config_filename}", e)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if overrides:
    logging.info("Config overrides: %s", overrides)
  from wsss_jax.data import sources  # pylint: disable=g-import-not-at-top
  from wsss_jax.runtime import preemption  # pylint: disable=g-import-not-at-top
  # SIGTERM (pre-emption) and Ctrl-C stop at the next step/batch after saving; exit code
  # 75 means "rerun the same command to continue" (wsss_jax/runtime/preemption.py).
  preemption.install()
  try:
    runner.run_stages(config, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.EXIT_CODE)
  except registry.ConfigError as e:
    # Every config/environment problem, or the outputs another config made: one message
    # that names the keys, no traceback. Nothing was started or written.
    sys.stderr.write(f"FATAL: {e}\n")
    sys.exit(1)
  except sources.BadInputError as e:
    # A bad data file: its name and problem are the whole story; the 40 frames through
    # tfds' builder between here and the file would only bury them.
    sys.stderr.write(f"FATAL: {e}\n")
    sys.exit(1)


def run() -> None:
  """Console-script entry point (`wsss`; `wsss predict ...` is `predict_cli`)."""
  if len(sys.argv) > 1 and sys.argv[1] == "predict":
    from wsss_jax import predict_cli  # pylint: disable=g-import-not-at-top
    predict_cli.run(sys.argv[:1] + sys.argv[2:])
    return
  flags.mark_flags_as_required(["config", "workdir"])
  # absl's --help prints the __main__ module's docstring (the console script has none).
  sys.modules["__main__"].__doc__ = usage()
  from wsss_jax.stages import preflight  # pylint: disable=g-import-not-at-top
  # A misspelt --config.KEY gives one line naming the flag, not an ml_collections trace.
  app.run(main, flags_parser=preflight.parse_flags_or_exit)


if __name__ == "__main__":
  run()
