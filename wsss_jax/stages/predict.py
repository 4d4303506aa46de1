"""`wsss predict`: a finished work directory's segmentation model (or its CAMs) on new
images.

  wsss predict --workdir=runs/msrc --input=photos/ --output=out/
  wsss predict --workdir=runs/msrc --input='photos/**/*.jpg' --output=out/ --what=cams

or from Python:

  model = predict.load_model("runs/msrc")             # what="seg" (default) or "cams"
  report = predict.predict_files(model, predict.list_inputs("photos/"), "out/")

Inference is the pipeline's own: the evaluate stage's `seg_batch_fn` (`seg.scales`,
`seg.flip`, `seg.crf` of the work directory's config.json) or the cams stage's
`cam_batch_fn` (`cams.scales`, `cams.flip`). Each image is padded bottom/right to a square
canvas as evaluate pads the val split: the canvas evaluate recorded (`pad_size` in
`seg_evaluate.json`; else `data.eval_pad_size`; else none), or the image's longer side
rounded up to 32 when that is larger, so the prediction for a val image equals the one
evaluate scored. Images whose longer side exceeds `max_side` are shrunk to fit it and their
outputs resized back. Pixels are the stored grid (EXIF orientation is not applied, as in
the dataset builders).

Outputs, one per input, named by the input's path relative to the inputs' common folder
with the extension replaced (`a/b.jpg` -> `a/b.png`; `b.png` if `b.jpg` also exists):
- `what='seg'`: `<name>.png`, a palette PNG (VOC colours) of class ids at the image's size.
- `what='cams'`: `<name>.npz` in the CAM files' layout (`stages/cam_store.py`): `keys`
  int32 [K], the classes the classifier finds present (probability >= 0.5); `cam` float16
  [K, ceil(h/4), ceil(w/4)] at stride 4 of the h x w the model saw (the image's size
  unless it was shrunk) and `high_res` float16 [K, H, W], max-normalised per class;
  plus `scores` float32 [C-1], the classifier's probability of every foreground class.
  And `<name>.png`: the argmax of the kept CAMs, background (0) where none exceeds the
  pseudo stage's foreground threshold (`pseudo.fg_threshold`, else sweep.json's best).

An image that cannot be read is reported (one warning naming it) and skipped; the others
are still predicted. Every file is written atomically.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Any, Callable, Sequence

from absl import logging
import jax
import ml_collections as mlc
import numpy as np
from PIL import Image

from wsss_jax import fs
from wsss_jax import methods
from wsss_jax.data import palette
from wsss_jax.data import pipeline
from wsss_jax.data import sources
from wsss_jax.data import transforms
from wsss_jax.data import voc_builder
from wsss_jax.ops import cam as cam_ops
from wsss_jax.stages import cam_store
from wsss_jax.stages import cams as cams_stage
from wsss_jax.stages import evaluate
from wsss_jax.stages import inference
from wsss_jax.stages import progress as progress_lib
from wsss_jax.stages import registry
from wsss_jax.stages import seg as seg_stage
from wsss_jax.stages import sweep as sweep_stage
from wsss_jax.stages import training
from wsss_jax.stages import workdir as wd
from wsss_jax.runtime import mesh as mesh_lib

WHATS = ("seg", "cams")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# A class's CAM is kept when the classifier gives it at least this probability (new images
# carry no labels to restrict the CAMs to).
PRESENT_PROBABILITY = 0.5
# Longer image sides are shrunk to this for inference (memory; outputs are resized back).
MAX_SIDE = 1024
# Background threshold of the CAM label PNG when neither the config nor a sweep gives one.
DEFAULT_CAM_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True, repr=False)
class Model:
  """A work directory's trained model, ready for `predict_files`.

  Attributes:
    what: 'seg' or 'cams'.
    workdir: the work directory (absolute).
    config: its resolved config (config.json).
    class_names: background first.
    batch_fn: jittable `(variables, eval batch) -> outputs` (the stage's own).
    variables: the trained `{'params', 'batch_stats'}`.
    pad_size: the smallest canvas side (0: each image's own size rounded up to 32).
    threshold: background threshold of the CAM label PNG (what='cams').
  """
  what: str
  workdir: str
  config: mlc.ConfigDict
  class_names: tuple[str, ...]
  batch_fn: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]
  variables: Any
  pad_size: int
  threshold: float = DEFAULT_CAM_THRESHOLD

  def __repr__(self) -> str:
    return (f"Model(what={self.what!r}, workdir={self.workdir!r}, "
            f"classes={len(self.class_names)}, pad_size={self.pad_size})")


@dataclasses.dataclass
class Report:
  """What `predict_files` did: outputs written (paths) and inputs that failed (path,
  reason)."""
  written: list[str] = dataclasses.field(default_factory=list)
  failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def load_model(workdir: str, what: str = "seg") -> Model:
  """Loads the segmentation model (`what='seg'`) or the CAM model (`'cams'`) of a work
  directory, with the inference settings its config.json holds.

  Raises:
    FileNotFoundError: not a work directory, or the model's weights are missing (the
      message names the file and the stage that writes it).
    ValueError: an unknown `what`, or an unreadable weights file (named).
  """
  if what not in WHATS:
    raise ValueError(f"--what={what!r}: expected one of {WHATS}")
  workdir = fs.absolute(workdir)
  config_path = os.path.join(workdir, "config.json")
  if not fs.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: {workdir} is not a wsss work "
                            "directory (run `wsss --config=... --workdir=DIR` first)")
  config = mlc.ConfigDict(wd.read_json(config_path))
  names = _class_names(config, workdir)
  if what == "seg":
    method = methods.make_method(config, len(names), name="seg")
    variables = inference.load_variables(
        os.path.join(seg_stage.seg_dir(config, workdir), inference.VARIABLES_FILE))
    return Model(what, workdir, config, names,
                 evaluate.seg_batch_fn(method.model, evaluate.inference_settings(config)),
                 variables, _evaluate_pad_size(config, workdir))
  method, variables = cams_stage.cam_model(config, workdir, len(names))
  cam_fn = cams_stage.cam_batch_fn(config, method.model)
  logits_fn = training.classification_logits_fn(method.model)

  def batch_fn(variables, batch):
    return {**cam_fn(variables, batch), **logits_fn(variables, batch)}

  return Model(what, workdir, config, names, batch_fn, variables,
               int(config.data.get("eval_pad_size", 0) or 0),
               _cam_threshold(config, workdir))


def _class_names(config: mlc.ConfigDict, workdir: str) -> tuple[str, ...]:
  """From results.json (the data stage writes them), else from the prepared dataset."""
  names = wd.read_results(workdir).get("class_names")
  if names:
    return tuple(names)
  return sources.get_meta(config.data).class_names


def _evaluate_pad_size(config: mlc.ConfigDict, workdir: str) -> int:
  path = os.path.join(workdir, f"{registry.seg_home(config)}_{evaluate.EVAL_FILE}")
  if fs.exists(path):
    recorded = wd.read_json(path).get("pad_size")
    if recorded:
      return int(recorded)
  return int(config.data.get("eval_pad_size", 0) or 0)


def _cam_threshold(config: mlc.ConfigDict, workdir: str) -> float:
  try:
    return wd.foreground_threshold(config, workdir)
  except FileNotFoundError:  # no sweep.json and pseudo.fg_threshold < 0
    logging.warning("No %s in %s and pseudo.fg_threshold < 0: CAM label PNGs use the "
                    "background threshold %s.", sweep_stage.SWEEP_FILE, workdir,
                    DEFAULT_CAM_THRESHOLD)
    return DEFAULT_CAM_THRESHOLD


def list_inputs(spec: str) -> list[str]:
  """The image files `spec` names: a folder (its image files, by extension, not
  recursive), a glob pattern (`**` recurses; every matching file), or one file. Sorted.

  Raises:
    FileNotFoundError: nothing matches, naming `spec`.
  """
  if os.path.isdir(spec):
    paths = [os.path.join(spec, n) for n in os.listdir(spec)
             if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
  else:
    paths = glob.glob(spec, recursive=True)
  paths = sorted(p for p in paths if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"--input={spec}: no images found (give a folder of "
                            f"{'/'.join(IMAGE_EXTS)} files, a glob pattern or a file)")
  return paths


def output_names(paths: Sequence[str]) -> list[str]:
  """Output names without extension: each path relative to the common folder of all,
  extension dropped; where two inputs would collide (`b.jpg`, `b.png`), the full name."""
  absolute = [os.path.abspath(p) for p in paths]
  root = os.path.commonpath([os.path.dirname(p) for p in absolute])
  stems = [os.path.splitext(os.path.relpath(p, root))[0] for p in absolute]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [s if counts[s] == 1 else os.path.relpath(p, root) for s, p in zip(stems, absolute)]


def canvas_size(h: int, w: int, pad_size: int, max_side: int = MAX_SIDE) -> int:
  """Side P of the square canvas an h x w image is padded to (shrunk first if P < its
  longer side): `pad_size`, or the longer side rounded up to 32, at most `max_side`
  rounded up to 32 (and never below `pad_size`)."""
  multiple = pipeline.PAD_MULTIPLE
  need = math.ceil(max(h, w) / multiple) * multiple
  cap = max(pad_size, math.ceil(max_side / multiple) * multiple)
  return min(max(pad_size, need), cap)


def _image_size(path: str) -> tuple[int, int]:
  """(H, W) from the file's header (no decoding); BadInputError naming the file."""
  try:
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise sources.BadInputError(
        f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def predict_files(model: Model, paths: Sequence[str], output: str, *,
                  mesh: jax.sharding.Mesh | None = None, max_side: int = MAX_SIDE,
                  on_error: Callable[[str, str], None] | None = None) -> Report:
  """Predicts every image of `paths` into the folder `output` (see the module docstring).

  Args:
    model: from `load_model`.
    paths: image files.
    output: folder (created).
    mesh: devices to run on (default: all local devices, data parallel).
    max_side: longer sides above it are shrunk for inference.
    on_error: `(path, message)` per unreadable image (default: a logged warning).

  Returns:
    The Report; unreadable images are in `failed`, the rest in `written`.
  """
  if not paths:
    return Report()
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(None)
  devices = mesh_lib.num_data_devices(mesh)
  batch_size = -(-int(model.config.data.eval_batch_size) // devices) * devices
  num_fg = len(model.class_names) - 1
  report = Report()

  def fail(path: str, message: str) -> None:
    report.failed.append((path, message))
    if on_error is not None:
      on_error(path, message)
    else:
      logging.warning("%s; skipped", message)

  # Group by canvas size: one compiled program per size, full batches.
  groups: dict[int, list[tuple[str, str]]] = {}
  for path, name in zip(paths, output_names(paths)):
    try:
      h, w = _image_size(path)
    except sources.BadInputError as e:
      fail(path, str(e))
      continue
    groups.setdefault(canvas_size(h, w, model.pad_size, max_side), []).append((path, name))
  run = inference.compiled_batch_fn(model.batch_fn, mesh, model.variables)
  progress = progress_lib.Progress(f"predict {model.what}", len(paths))
  progress.update(len(report.failed), computed=False)
  for pad, items in groups.items():
    transform = transforms.EvalTransform(pad, oversize="resize")
    for start in range(0, len(items), batch_size):
      chunk = items[start:start + batch_size]
      examples, kept = [], []
      for path, name in chunk:
        try:
          image = voc_builder.read_image(path)
        except sources.BadInputError as e:
          fail(path, str(e))
          continue
        examples.append(transform.compact({
            "id": name, "image": image, "mask": np.zeros(image.shape[:2], np.uint8),
            "labels": np.ones(num_fg, np.uint8), "index": len(kept)}))
        kept.append((path, name, image.shape[:2]))
      if kept:
        examples += [transform.padding_example(num_fg)] * (batch_size - len(examples))
        out = run(transform.collate(examples))
        for j, (path, name, size) in enumerate(kept):
          fed = tuple(int(v) for v in examples[j]["size"])
          row = {k: np.asarray(v[j]) for k, v in out.items()}
          report.written.append(_write(model, output, name, row, fed, size))
      progress.update(len(chunk), computed=bool(kept))
  progress.close()
  return report


def _write(model: Model, output: str, name: str, out: dict[str, np.ndarray],
           fed: tuple[int, int], size: tuple[int, int]) -> str:
  """Writes one image's outputs; `fed` is the (h, w) the model saw, `size` the image's."""
  png = os.path.join(output, name + ".png")
  h, w = fed
  if model.what == "seg":
    labels = _resize_labels(out["pred"][:h, :w], size)
  else:
    scores = 1.0 / (1.0 + np.exp(-out["logits"].astype(np.float64)))
    keys = np.flatnonzero(scores >= PRESENT_PROBABILITY) + 1
    high = np.stack([_resize_map(out["high_res"][:h, :w, k - 1], size) for k in keys]
                    ) if len(keys) else np.zeros((0,) + tuple(size), np.float32)
    low = out["stride4"][:math.ceil(h / 4), :math.ceil(w / 4), keys - 1].transpose(2, 0, 1)
    cam_store.save(output, name, keys, low, high, scores=scores.astype(np.float32))
    # Labelled from the CAMs as stored (float16), as the sweep and pseudo stages read them.
    stored = {"keys": keys, "high_res": high.astype(np.float16).astype(np.float32)}
    dense = cam_store.dense_scores(stored, len(model.class_names) - 1)
    labels = np.asarray(cam_ops.threshold_labels(
        dense.transpose(1, 2, 0), np.ones(dense.shape[0], np.float32), [model.threshold]))[0]
  with wd.atomic_path(png) as tmp:
    palette.save_palette_png(tmp, labels.astype(np.uint8))
  return png


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if tuple(labels.shape) == tuple(size):
    return labels
  return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(
      (size[1], size[0]), Image.NEAREST))


def _resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if tuple(cam.shape) == tuple(size):
    return cam.astype(np.float32)
  return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(
      (size[1], size[0]), Image.BILINEAR))


def summary(report: Report, total: int, output: str) -> str:
  """The closing line of `wsss predict`."""
  text = f"{len(report.written)} of {total} images predicted into {output}"
  if report.failed:
    text += (f"; {len(report.failed)} could not be read: "
             + ", ".join(p for p, _ in report.failed[:5])
             + (", ..." if len(report.failed) > 5 else ""))
  return text

