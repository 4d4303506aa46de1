"""`wsss predict` on real MSRC photos (issue #32), and the modes of what a run writes.

One module-scoped run of the real command (`preempt_worker.py`: `wsss_jax.main` with a
two-convolution backbone) under umask 022 trains the CAM model and a segmentation model
(on the ground truth, seg.lr tiny so its predictions stay varied) on 2 MSRC images and
evaluates on 4: 3 photos and a crop of one (smaller than the val canvas, so it is padded
more than its own size needs). `wsss predict` then runs on a folder holding those 4 val
images, an enlarged copy of one and a file that is not an image.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import REPO_ROOT
from wsss_jax.data import palette
from wsss_jax.ops import metrics

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "preempt_worker.py")
CONFIG = os.path.join(REPO_ROOT, "configs", "voc", "cam.py") + ":runlocal"
TRAIN_IDS = ("10_10_s", "10_11_s")
# 320x213, 213x320 and 240x320 (W x H) photos: the val canvas is 320 and each pads
# differently; the crop (150x100) fits a 160 canvas alone but is padded to 320 as well.
PHOTO_IDS = ("10_13_s", "10_19_s", "16_19_s")
CROP_ID = "10_13_s_crop"
VAL_IDS = PHOTO_IDS + (CROP_ID,)
TINY = [
    "--config.model.pretrained=False", "--config.data.crop_size=64",
    "--config.data.batch_size=2", "--config.data.eval_batch_size=2",
    "--config.train.num_steps=2", "--config.train.progress=False",
    "--config.train.log_every=1", "--config.train.ckpt_every=2",
    "--config.seg.num_steps=1", "--config.seg.batch_size=2", "--config.seg.lr=1e-9",
    "--config.seg.pseudo_source=gt", "--config.seg.scales=(1.0,0.75)",
    "--config.seg.flip=True", "--config.cams.scales=(1.0,)",
    "--config.stages=data,train,seg,evaluate", "--config.train.init_from=",
]


def _env(cache) -> dict[str, str]:
  env = {**os.environ, "WSSS_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a laptop run
  return env


def _run(args, cache) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True,
                        timeout=900, env=_env(cache), preexec_fn=lambda: os.umask(0o022))


@pytest.fixture(scope="module")
def run(tmp_path_factory, msrc_root):
  tmp = tmp_path_factory.mktemp("predict")
  root = tmp / "msrc"
  for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (root / folder).mkdir(parents=True)
  for id_ in TRAIN_IDS + PHOTO_IDS:
    shutil.copy(os.path.join(msrc_root, "JPEGImages", id_ + ".jpg"), root / "JPEGImages")
    shutil.copy(os.path.join(msrc_root, "SegmentationClass", id_ + ".png"),
                root / "SegmentationClass")
  box = (100, 40, 250, 140)
  Image.open(root / "JPEGImages" / f"{PHOTO_IDS[0]}.jpg").crop(box).save(
      root / "JPEGImages" / f"{CROP_ID}.png")
  with Image.open(root / "SegmentationClass" / f"{PHOTO_IDS[0]}.png") as mask:
    mask.crop(box).save(root / "SegmentationClass" / f"{CROP_ID}.png")
  shutil.copy(os.path.join(msrc_root, "classes.txt"), root)
  (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN_IDS) + "\n")
  (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL_IDS) + "\n")
  workdir, cache = tmp / "work", tmp / "cache"
  stages = _run([f"--config={CONFIG}", f"--workdir={workdir}",
                 f"--config.data.root={root}", f"--config.data.cache_dir={cache / 'data'}",
                 *TINY], cache)
  assert stages.returncode == 0, stages.stderr[-4000:]
  inputs = tmp / "photos"
  inputs.mkdir()
  for name in os.listdir(root / "JPEGImages"):
    if os.path.splitext(name)[0] in VAL_IDS:
      shutil.copy(root / "JPEGImages" / name, inputs)
  photo = Image.open(root / "JPEGImages" / f"{PHOTO_IDS[0]}.jpg")
  photo.resize((700, 466)).save(inputs / "enlarged.jpg")          # above --max_side
  (inputs / "notes.jpg").write_bytes(b"not a photo")
  out = tmp / "out"
  predict = _run(["predict", f"--workdir={workdir}", f"--input={inputs}",
                  f"--output={out}", "--max_side=400"], cache)
  return {"root": root, "workdir": workdir, "cache": cache, "inputs": inputs, "out": out,
          "stages": stages, "predict": predict}


def _evaluation(workdir):
  with open(workdir / "seg_gt_evaluate.json") as f:
    return json.load(f)


def test_one_palette_png_per_readable_image_at_its_size(run):
  out, inputs = run["out"], run["inputs"]
  names = sorted(os.listdir(out))
  assert names == sorted([f"{i}.png" for i in VAL_IDS] + ["enlarged.png"])
  for name in names:
    stem = os.path.splitext(name)[0]
    source = next(p for p in os.listdir(inputs) if os.path.splitext(p)[0] == stem)
    with Image.open(out / name) as png, Image.open(inputs / source) as photo:
      assert png.size == photo.size, name
      assert png.mode == "P", name
      assert png.getpalette()[:768] == palette.voc_palette().ravel().tolist()


def test_predictions_equal_those_evaluate_scored(run):
  """The confusion matrix of the predicted PNGs of the val photos against their masks is
  the one the evaluate stage recorded, cell by cell."""
  evaluation = _evaluation(run["workdir"])
  c = len(evaluation["class_names"])
  conf = np.zeros((c, c), np.int64)
  predicted = []
  for id_ in VAL_IDS:
    pred = np.asarray(Image.open(run["out"] / f"{id_}.png"))
    mask = np.asarray(Image.open(run["root"] / "SegmentationClass" / f"{id_}.png"))
    conf += metrics.confusion_matrix_np(mask, pred, c)
    predicted.append(pred)
  assert len(np.unique(np.concatenate([p.ravel() for p in predicted]))) > 1  # not trivial
  np.testing.assert_array_equal(conf, np.asarray(evaluation["confusion"]))
  assert evaluation["pad_size"] == 320


def test_unreadable_image_is_named_and_the_rest_goes_on(run):
  proc = run["predict"]
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  bad = str(run["inputs"] / "notes.jpg")
  warnings = [line for line in proc.stderr.splitlines() if bad in line]
  assert len(warnings) == 1 and "cannot read image" in warnings[0], proc.stderr[-4000:]
  assert proc.stdout.strip().splitlines()[-1] == (
      f"5 of 6 images predicted into {run['out']}; 1 could not be read: {bad}")


def test_cam_maps_of_new_images(run, monkeypatch, tmp_path):
  """--what=cams (in process): an .npz per image with the classes the classifier finds
  present, full-size maps in [0, 1], and a label PNG made of those classes."""
  import tiny_backbone  # pylint: disable=import-outside-toplevel
  from wsss_jax.models import registry  # pylint: disable=import-outside-toplevel
  from wsss_jax.stages import predict  # pylint: disable=import-outside-toplevel
  from wsss_jax.runtime import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(registry, "build_backbone", tiny_backbone.tiny_backbone)
  monkeypatch.setenv("WSSS_JAX_CACHE", str(run["cache"]))
  model = predict.load_model(str(run["workdir"]), "cams")
  paths = [str(run["inputs"] / f"{i}.jpg") for i in PHOTO_IDS]
  report = predict.predict_files(model, paths, str(tmp_path),
                                 mesh=mesh_lib.make_mesh({"data": 1}))
  assert not report.failed and len(report.written) == len(PHOTO_IDS)
  for id_ in PHOTO_IDS:
    w, h = Image.open(run["inputs"] / f"{id_}.jpg").size
    with np.load(tmp_path / f"{id_}.npz") as z:
      keys, scores, high, low = z["keys"], z["scores"], z["high_res"], z["cam"]
    assert scores.shape == (len(model.class_names) - 1,)
    np.testing.assert_array_equal(keys, np.flatnonzero(scores >= 0.5) + 1)
    assert high.shape == (len(keys), h, w) and low.shape == (len(keys), -(-h // 4),
                                                             -(-w // 4))
    assert high.size == 0 or (0 <= high.min() and high.max() <= 1)
    labels = np.asarray(Image.open(tmp_path / f"{id_}.png"))
    assert labels.shape == (h, w) and set(np.unique(labels)) <= {0, *keys.tolist()}


def test_log_is_quiet_and_says_progress(run):
  log = run["stages"].stderr + run["stages"].stdout
  assert "Downloading and preparing" not in log and "downloaded and prepared" not in log
  assert log.count("Load dataset info") == 1, log.count("Load dataset info")
  assert f"evaluate 'val': {len(VAL_IDS)} images in" in log


def test_outputs_are_readable_by_others_under_umask_022(run):
  """Every file the run and `wsss predict` wrote is 0644 and every folder 0755: the work
  directory (checkpoints included), the prepared-dataset cache and the predictions."""
  wrong = []
  for top in (run["workdir"], run["cache"] / "data", run["out"]):
    for folder, dirs, files in os.walk(top):
      for name in dirs + files:
        path = os.path.join(folder, name)
        want = 0o755 if os.path.isdir(path) else 0o644
        if stat.S_IMODE(os.stat(path).st_mode) != want:
          wrong.append((path, oct(stat.S_IMODE(os.stat(path).st_mode))))
  assert not wrong, wrong[:10]


def test_canvas_sizes():
  from wsss_jax.stages import predict  # pylint: disable=import-outside-toplevel
  assert predict.canvas_size(213, 320, 320) == 320      # a val photo: evaluate's canvas
  assert predict.canvas_size(50, 75, 320) == 320        # smaller: padded as evaluate pads
  assert predict.canvas_size(50, 75, 0) == 96           # no recorded canvas: own size
  assert predict.canvas_size(466, 700, 320, max_side=400) == 416  # shrunk to fit
  assert predict.canvas_size(2000, 100, 0) == 1024


def test_inputs_and_output_names(tmp_path):
  from wsss_jax.stages import predict  # pylint: disable=import-outside-toplevel
  (tmp_path / "sub").mkdir()
  for name in ("a.jpg", "a.PNG", "notes.txt", "sub/b.jpeg"):
    (tmp_path / name).write_bytes(b"")
  assert predict.list_inputs(str(tmp_path)) == [str(tmp_path / "a.PNG"),
                                                str(tmp_path / "a.jpg")]
  found = predict.list_inputs(str(tmp_path / "**" / "*.jp*g"))
  assert found == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.jpeg")]
  assert predict.output_names(found) == ["a", os.path.join("sub", "b")]
  assert predict.output_names(predict.list_inputs(str(tmp_path))) == ["a.PNG", "a.jpg"]
  with pytest.raises(FileNotFoundError, match=r"--input=.*\*\.gif: no images found"):
    predict.list_inputs(str(tmp_path / "*.gif"))


def test_missing_model_is_named(run, tmp_path):
  from wsss_jax.stages import predict  # pylint: disable=import-outside-toplevel
  with pytest.raises(FileNotFoundError, match=r"config.json not found: .* is not a wsss "
                     "work directory"):
    predict.load_model(str(tmp_path))
  for name in ("config.json", "results.json"):
    shutil.copy(run["workdir"] / name, tmp_path)
  with pytest.raises(FileNotFoundError, match=r"seg_gt/final_variables.msgpack: trained "
                     "weights not found"):
    predict.load_model(str(tmp_path))
  with pytest.raises(ValueError, match=r"--what='masks': expected one of \('seg', 'cams'\)"):
    predict.load_model(str(tmp_path), "masks")


def test_predict_help_lists_its_flags():
  proc = subprocess.run([sys.executable, "-m", "wsss_jax.main", "predict", "--help"],
                        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  for flag in ("--workdir", "--input", "--output", "--what", "--max_side"):
    assert flag in proc.stdout, flag
