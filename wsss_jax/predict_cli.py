r"""`wsss predict`: a work directory's trained model on a folder (or glob) of new images.

  wsss predict --workdir=runs/msrc --input=photos/ --output=out/            # segmentation
  wsss predict --workdir=runs/msrc --input='photos/*.jpg' --output=out/ --what=cams

One palette PNG per image at its own size (and, with --what=cams, one .npz of class maps);
see `wsss_jax/stages/predict.py` for the formats. An unreadable image gets one warning
naming it and is skipped; the exit code is then 1 and the last line counts them.
`wsss_jax.main` hands `wsss predict ...` to `run` here.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

_INPUT = flags.DEFINE_string(
    "input", None,
    "wsss predict: a folder of images, a glob pattern ('**' recurses) or one image file.")
_OUTPUT = flags.DEFINE_string("output", None, "wsss predict: folder for the outputs.")
_WHAT = flags.DEFINE_enum("what", "seg", ["seg", "cams"],
                          "wsss predict: the segmentation model's labels (seg) or the "
                          "CAM model's class maps (cams).")
# Default = stages.predict.MAX_SIDE (not imported here: it would slow down `--help`).
_MAX_SIDE = flags.DEFINE_integer(
    "max_side", 1024, "wsss predict: longer image sides are shrunk to this for inference "
    "(outputs are resized back to the image's size).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  from wsss_jax.stages import predict  # pylint: disable=g-import-not-at-top
  try:
    model = predict.load_model(flags.FLAGS.workdir, _WHAT.value)
    paths = predict.list_inputs(_INPUT.value)
  except (FileNotFoundError, ValueError) as e:
    sys.stderr.write(f"FATAL: {e}\n")
    sys.exit(1)
  logging.info("Predicting %d images with %r into %s", len(paths), model, _OUTPUT.value)
  try:
    report = predict.predict_files(model, paths, _OUTPUT.value, max_side=_MAX_SIDE.value)
  except KeyboardInterrupt:
    sys.stderr.write(f"Interrupted; the PNGs already in {_OUTPUT.value} are complete.\n")
    sys.exit(130)
  line = predict.summary(report, len(paths), _OUTPUT.value)
  print(line)
  if report.failed:
    sys.exit(1)


def usage() -> str:
  """`wsss predict --help`: this module's docstring and its flags (absl's own help would
  show the stage runner's)."""
  workdir = flags.FLAGS["workdir"]
  return (f"{__doc__}\nflags:\n  --{workdir.name}: wsss predict: the work directory whose "
          f"model is run.\n{flags.FLAGS.module_help(__name__)}\n")


def run(argv: list[str]) -> None:
  """Runs `wsss predict` with `argv` = [program, flags...] (the word `predict` removed)."""
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
    print(usage())
    sys.exit(0)
  flags.mark_flags_as_required(["workdir", "input", "output"])
  app.run(main, argv=argv)
