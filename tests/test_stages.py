"""The pipeline end to end through the real command line, on a tiny synthetic set.

One module-scoped run in two processes: the first stops after `cams` (as a run killed
between stages would), the second runs every stage and must reuse what exists. The same
two runs with `--workdir=gs://...` on a Cloud Storage server on localhost
(`gcs_emulator.py`) must write the same results into the bucket.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic", "cam.py") + ":runlocal"
TINY = [
    "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=8",
    "--config.data.synthetic.image_size=64", "--config.data.crop_size=64",
    "--config.data.batch_size=8", "--config.data.eval_batch_size=8",
    "--config.train.num_steps=2", "--config.train.ckpt_every=1",
    "--config.train.log_every=1", "--config.train.progress=False",
    "--config.train.eval_every=2",
    "--config.seg.num_steps=2", "--config.seg.batch_size=8",
    "--config.cams.scales=(1.0,)", "--config.pseudo.crf_iters=2",
]
NUM_CLASSES = 11


def wsss(workdir, cache, *extra, env=None):
  env = {**os.environ, **(env or {}), "WSSS_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop run
  proc = subprocess.run(
      [sys.executable, "-m", "wsss_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
       *TINY, *extra], capture_output=True, text=True, timeout=1200, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  workdir, cache = root / "work", root / "cache"
  wsss(workdir, cache, "--config.stages=data,train,cams")
  variables = workdir / "train" / "final_variables.msgpack"
  first = {"variables_mtime": variables.stat().st_mtime_ns}
  proc = wsss(workdir, cache)
  return {"workdir": workdir, "cache": cache, "first": first, "stdout": proc.stdout,
          "stderr": proc.stderr, "results": _results(workdir)}


def _results(workdir):
  with open(workdir / "results.json") as f:
    return json.load(f)


def test_results_json_schema(run):
  r = _results(run["workdir"])
  for key in ("cam_miou", "pseudo_miou", "seg_miou", "train_map", "cam_threshold"):
    assert isinstance(r[key], float), key
  for key in ("cam_miou", "pseudo_miou", "seg_miou"):
    assert 0.0 <= r[key] <= 1.0
  for key in ("cam_per_class_iou", "pseudo_per_class_iou", "seg_per_class_iou"):
    assert len(r[key]) == NUM_CLASSES
  assert set(r["timings"]) == {"data", "train", "cams", "sweep", "pseudo", "seg", "evaluate"}
  assert {"jax", "flax", "optax", "wsss_jax"} <= set(r["versions"])
  assert r["method"] == "cam" and r["dataset"] == "synthetic"
  assert "cam_miou" in run["stdout"]  # the closing table


def test_sweep_picks_the_best_threshold(run):
  with open(run["workdir"] / "sweep.json") as f:
    sweep = json.load(f)
  best = int(np.argmax(sweep["miou"]))
  assert sweep["best_threshold"] == sweep["thresholds"][best]
  assert _results(run["workdir"])["cam_miou"] == pytest.approx(max(sweep["miou"]))


def test_outputs_on_disk(run):
  w = run["workdir"]
  for name in ("cam_overlays", "pseudo_gallery", "threshold_curve", "per_class_iou",
               "seg_gallery"):
    assert (w / "figures" / f"{name}.png").stat().st_size > 0
  pngs = sorted((w / "pseudo").glob("*.png"))
  assert len(pngs) == 16
  for p in pngs[:4]:
    im = Image.open(p)
    assert im.mode == "P"
    assert set(np.unique(np.asarray(im)).tolist()) <= set(range(NUM_CLASSES)) | {255}
  assert len(list((w / "cams" / "train").glob("*.npz"))) == 16
  assert (w / "train" / "metrics.jsonl").exists() and (w / "seg" / "metrics.jsonl").exists()
  with open(w / "train" / "metrics.jsonl") as f:
    evals = [json.loads(line) for line in f if "eval/map" in line]
  assert [e["step"] for e in evals] == [2] and 0.0 <= evals[0]["eval/map"] <= 1.0


def test_second_run_reused_finished_stages(run):
  variables = run["workdir"] / "train" / "final_variables.msgpack"
  assert variables.stat().st_mtime_ns == run["first"]["variables_mtime"]


def test_partial_cams_are_completed_identically(run):
  w = run["workdir"]
  cam_dir = w / "cams" / "train"
  victims = sorted(cam_dir.glob("*.npz"))[:3]
  saved = {p.name: dict(np.load(p)) for p in victims}
  for p in victims:
    p.unlink()
  (cam_dir / "complete.json").unlink()
  wsss(w, run["cache"], "--config.stages=cams")
  for name, arrays in saved.items():
    again = np.load(cam_dir / name)
    for key, value in arrays.items():
      np.testing.assert_array_equal(again[key], value)


def test_ground_truth_upper_bound(run):
  w = run["workdir"]
  wsss(w, run["cache"], "--config.stages=seg,evaluate", "--config.seg.pseudo_source=gt")
  r = _results(w)
  assert 0.0 <= r["seg_gt_miou"] <= 1.0 and len(r["seg_gt_per_class_iou"]) == NUM_CLASSES
  assert (w / "seg_gt" / "final_variables.msgpack").exists()
  assert "seg_miou" in r  # the pseudo-label model's score is kept beside it


def test_seg_refuses_to_resume_from_other_pseudo_labels(run, tmp_path):
  from wsss_jax.stages import training
  w = run["workdir"]
  with open(w / "seg" / "inputs.json") as f:
    inputs = json.load(f)
  assert inputs["pseudo_source"] == "pseudo" and "pseudo" in inputs
  changed = json.loads(json.dumps(inputs))
  changed["pseudo"]["bg_threshold"] = 0.5
  with pytest.raises(ValueError, match="Delete"):
    training.check_inputs(str(w / "seg"), changed)
  training.check_inputs(str(w / "seg"), inputs)  # same inputs: resumes quietly


def test_second_run_says_why_it_skips(run):
  for stage in ("train", "cams"):
    assert f"Stage {stage}: skipped, its outputs are up to date (fingerprint" in run["stderr"]
  assert "Stage sweep: start" in run["stderr"]


def test_closing_table_names_splits_files_and_times_in_order(run):
  lines = run["stdout"].splitlines()
  for row in ("train_map (val)", "cam_miou (train)", "pseudo_miou (train)",
              "seg_miou (val)"):
    assert any(line.startswith(row + " ") for line in lines), row
  assert f"results {run['workdir'] / 'results.json'}" in " ".join(run["stdout"].split())
  assert any(line.split()[-1] == str(run["workdir"] / "figures") + os.sep for line in lines)
  times = [line.split()[0] for line in lines if line.startswith("time[")]
  assert times == [f"time[{s}]" for s in ("data", "train", "cams", "sweep", "pseudo", "seg",
                                          "evaluate")]


# The reruns of issue #27: a finished work directory run again with other settings stops
# before any work naming the changed keys (or, asked to, recomputes), and never relabels.
def _stops(workdir, cache, *extra):
  """Runs the command, which must stop before any work; returns its stderr."""
  env = {**os.environ, "WSSS_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "wsss_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
       *TINY, *extra], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr and "FATAL: " in proc.stderr, proc.stderr[-4000:]
  return proc.stderr


def _snapshot(workdir):
  """Every file a relabelling run would touch, byte for byte, plus the folder listing."""
  names = ("config.json", "results.json", "train/config.json", "train/fingerprint.json",
           "cams/fingerprint.json", "sweep.json", "seg_evaluate.json")
  return {"listing": sorted(os.listdir(workdir)),
          **{n: (workdir / n).read_bytes() for n in names}}


def test_changed_seed_and_backbone_stop_naming_the_keys(run):
  w = run["workdir"]
  before = _snapshot(w)
  err = _stops(w, run["cache"], "--config.seed=7", "--config.optim.lr=0.5",
               "--config.model.backbone=resnet50", "--config.stages=train,cams,sweep")
  assert 'model.backbone  "efficientnet_lite0" -> "resnet50"' in err
  assert "seed" in err and "0 -> 7" in err and "optim.lr" in err
  for stage in ("train", "cams", "sweep", "pseudo", "seg", "evaluate"):
    assert f"  {stage}: {w}" in err, stage
  assert "--config.rerun=changed" in err and "--workdir" in err
  assert _snapshot(w) == before          # no config.json, results or table of another run


def test_a_failing_run_changes_nothing(run):
  w = run["workdir"]
  before = _snapshot(w)
  err = _stops(w, run["cache"], "--config.data.name=voc", "--config.data.root=/no/such/dir")
  assert "config.data.root='/no/such/dir' is not a directory" in err
  assert _snapshot(w) == before


def test_changed_cam_scales_stop_then_recompute_on_request(run, tmp_path):
  w = run["workdir"]
  err = _stops(w, run["cache"], "--config.cams.scales=(0.5,)", "--config.stages=cams,sweep")
  assert "cams.scales" in err and "[1.0] -> " in err
  for stage in ("cams", "sweep", "pseudo", "seg", "evaluate"):
    assert f"  {stage}: {w}" in err, stage
  assert "  train: " not in err
  # --config.rerun=changed, on a copy: the stale outputs go, the listed stages remake
  # theirs, and results.json describes what is on disk.
  copy = tmp_path / "copy"
  shutil.copytree(w, copy)
  wsss(copy, run["cache"], "--config.cams.scales=(0.5,)", "--config.stages=cams,sweep",
       "--config.rerun=changed")
  r = _results(copy)
  assert r["train_map"] == run["results"]["train_map"]   # upstream kept
  # (seg_gt/, from the ground-truth test, depends on no CAM and may stay.)
  assert "cam_miou" in r and {"data", "train", "cams", "sweep"} <= set(r["timings"])
  assert "pseudo" not in r["timings"]
  for key in ("pseudo_miou", "seg_miou", "seg_per_class_iou"):
    assert key not in r, key
  for gone in ("pseudo", "seg", "seg_evaluate.json"):
    assert not (copy / gone).exists(), gone
  with open(copy / "cams" / "fingerprint.json") as f:
    record = json.load(f)
  with open(copy / "config.json") as f:
    assert record["settings"]["cams.scales"] == list(json.load(f)["cams"]["scales"])
  assert record["settings"]["cams.scales"] != [1.0]
  assert ((copy / "train" / "final_variables.msgpack").read_bytes()
          == (w / "train" / "final_variables.msgpack").read_bytes())


HEADLINE = ("train_map", "cam_miou", "cam_threshold", "pseudo_miou", "seg_miou",
            "cam_per_class_iou", "pseudo_per_class_iou", "seg_per_class_iou")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, run):
  """`run`'s two invocations again with the work directory in a bucket (gs://bkt/run)."""
  import gcs_emulator
  from wsss_jax import fs
  from wsss_jax.analysis import reader
  store = tmp_path_factory.mktemp("gcs")
  server, url = gcs_emulator.start(str(store))
  env = gcs_emulator.client_env(url)
  # What the server stores for an object: a plain file (for the untouched-object check).
  blob = lambda *parts: store.joinpath(".cloudstorage", gcs_emulator.BUCKET, "run", *parts)
  workdir = f"gs://{gcs_emulator.BUCKET}/run"
  try:
    wsss(workdir, run["cache"], "--config.stages=data,train,cams", env=env)
    variables = blob("train", "final_variables.msgpack")
    first_mtime = variables.stat().st_mtime_ns
    wsss(workdir, run["cache"], env=env)
    with pytest.MonkeyPatch.context() as mp:
      for key, value in env.items():
        mp.setenv(key, value)
      w = reader.open_workdir(workdir)
      yield {"workdir": workdir, "blob": blob, "first_mtime": first_mtime, "fs": fs,
             "results": w.json("results.json"), "open": w,
             "train_log": w.metrics_log("train")}
  finally:
    server.stop()


def test_bucket_workdir_gives_the_local_results(bucket, run):
  for key in HEADLINE:
    assert bucket["results"][key] == run["results"][key], key
  image_id = "train_000003"
  local = np.load(run["workdir"] / "cams" / "train" / f"{image_id}.npz")
  remote = bucket["open"].cams("train", image_id)
  for key in ("keys", "cam", "high_res"):
    np.testing.assert_array_equal(remote[key], local[key].astype(remote[key].dtype))
  np.testing.assert_array_equal(
      bucket["open"].pseudo_label(image_id),
      np.asarray(Image.open(run["workdir"] / "pseudo" / f"{image_id}.png")))


def test_bucket_workdir_holds_every_output_and_resumes(bucket):
  fs, w = bucket["fs"], bucket["workdir"]
  names = fs.names_in(f"{w}/pseudo")
  assert len([n for n in names if n.endswith(".png")]) == 16
  assert len([n for n in fs.names_in(f"{w}/cams/train") if n.endswith(".npz")]) == 16
  for step in ("1", "2"):  # orbax (tensorstore) wrote complete checkpoints
    assert bucket["blob"]("train", "checkpoints", step, "commit_success.txt").exists()
  assert [r["step"] for r in bucket["train_log"] if "eval/map" in r] == [2]
  assert set(bucket["results"]["timings"]) == {"data", "train", "cams", "sweep", "pseudo",
                                               "seg", "evaluate"}
  # The second run took the trained weights from the bucket instead of retraining.
  assert (bucket["blob"]("train", "final_variables.msgpack").stat().st_mtime_ns
          == bucket["first_mtime"])


def test_bucket_writes_are_whole_and_appends_keep_lines(bucket):
  fs, path = bucket["fs"], bucket["workdir"] + "/scratch/log.txt"
  fs.append_text(path, "one\n")
  fs.append_text(path, "two\n")
  assert fs.read_bytes(path) == b"one\ntwo\n"
  with pytest.raises(RuntimeError):
    with fs.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("killed while writing")
  assert fs.read_bytes(path) == b"one\ntwo\n"  # the old object is intact
  fs.rmtree(bucket["workdir"] + "/scratch")
  assert not fs.exists(path)
