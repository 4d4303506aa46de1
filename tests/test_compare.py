"""wsss_jax.compare: mean ± std over seeds."""
import numpy as np

from wsss_jax import compare


def test_summarize_mean_std_and_table():
  runs = [{"method": "fbr", "cam_miou": 0.5, "seg_miou": 0.4, "cam_iou_per_class": [1, 2],
           "timings": {"train": 60.0, "cams": 30.0}},
          {"method": "fbr", "cam_miou": 0.7, "seg_miou": 0.5, "cam_iou_per_class": [1, 2],
           "timings": {"train": 120.0}},
          {"method": "fbr", "cam_miou": 0.6, "timings": {}}]
  s = compare.summarize(runs, [0, 1, 2])
  assert s["metrics"]["cam_miou"]["mean"] == np.float64(0.6).item()
  np.testing.assert_allclose(s["metrics"]["cam_miou"]["std"], np.std([0.5, 0.7, 0.6], ddof=1))
  assert "seg_miou" not in s["metrics"]          # missing in one run
  assert "cam_iou_per_class" not in s["metrics"]  # not a scalar
  assert s["metrics"]["total_seconds"]["values"] == [90.0, 120.0, 0.0]
  one = compare.summarize(runs[:1], [0])
  assert one["metrics"]["cam_miou"]["std"] == 0.0
  table = compare.markdown_table({"synthetic_fbr": s})
  assert "| synthetic_fbr | fbr | 3 | 0.600 ± 0.100 | 1.2 min |" in table


def test_collect_reads_finished_seeds_only(tmp_path):
  import json
  import pytest
  for seed, res in ((0, {"cam_miou": 0.5, "timings": {"evaluate": 1.0}}),
                    (1, {"cam_miou": 0.7, "timings": {"evaluate": 2.0}}),
                    (2, {"cam_miou": 0.1, "timings": {"train": 3.0}})):  # still running
    (tmp_path / f"seed{seed}").mkdir()
    (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(res))
  s = compare.collect(str(tmp_path))
  assert s["seeds"] == [0, 1] and s["metrics"]["cam_miou"]["values"] == [0.5, 0.7]
  with pytest.raises(FileNotFoundError, match="no finished"):
    compare.collect(str(tmp_path / "seed2"))


def _write_run(path, seed, finished=True, **results):
  import json
  path.mkdir(parents=True)
  results.setdefault("timings", {"train": 1.0, **({"evaluate": 1.0} if finished else {})})
  (path / "results.json").write_text(json.dumps(results))
  (path / "config.json").write_text(json.dumps({"seed": seed}))


def test_paired_differences_against_a_hand_computed_table(tmp_path):
  # Control over seeds 0-2; the method finished seeds 0 and 1 (seed 2 still running), so
  # the pairs are seeds 0 and 1. Differences, by hand:
  #   cam:    0.52-0.50 = +0.02, 0.53-0.52 = +0.01 -> mean +0.015, std 0.00707, 2/2 > 0
  #   pseudo: 0.58-0.55 = +0.03, 0.56-0.57 = -0.01 -> mean +0.010, std 0.02828, 1/2
  #   seg:    0.59-0.60 = -0.01, 0.60-0.58 = +0.02 -> mean +0.005, std 0.02121, 1/2
  # Per class (pseudo): class 0: -0.1, +0.1 -> 0; class 1: +0.2, +0.2 -> +0.2 (2/2);
  # class 2 has no IoU in either run (absent from the split).
  control = {0: (0.50, 0.55, 0.60, [0.9, 0.5, None]), 1: (0.52, 0.57, 0.58, [0.8, 0.4, None]),
             2: (0.51, 0.56, 0.59, [0.7, 0.3, None])}
  method = {0: (0.52, 0.58, 0.59, [0.8, 0.7, None]), 1: (0.53, 0.56, 0.60, [0.9, 0.6, None])}
  for name, rows in (("cam", control), ("fbr", method)):
    for seed, (c, p, s, per_class) in rows.items():
      _write_run(tmp_path / "matrix" / name / f"seed{seed}", seed, method=name, cam_miou=c,
                 pseudo_miou=p, seg_miou=s, pseudo_per_class_iou=per_class)
  _write_run(tmp_path / "matrix" / "fbr" / "seed2", 2, finished=False, cam_miou=0.9)
  rows = compare.expand([str(tmp_path / "matrix")])
  assert sorted(rows) == ["cam", "fbr"]
  out = compare.report(rows, "cam", str(tmp_path / "summary.json"))
  p = out["paired"]["fbr"]
  assert p["seeds"] == [0, 1]
  expected = {"cam_miou": (0.015, 0.0070711, 2), "pseudo_miou": (0.010, 0.0282843, 1),
              "labels_miou": (0.010, 0.0282843, 1), "seg_miou": (0.005, 0.0212132, 1)}
  for key, (mean, std, positive) in expected.items():
    m = p["metrics"][key]
    np.testing.assert_allclose([m["mean"], m["std"]], [mean, std], atol=1e-6)
    assert m["positive"] == positive
  np.testing.assert_allclose(p["per_class"]["pseudo"]["mean"][:2], [0.0, 0.2], atol=1e-9)
  assert p["per_class"]["pseudo"]["positive"][:2] == [1, 2]
  assert p["per_class"]["pseudo"]["mean"][2] is None
  table = compare.paired_table(out["paired"], "cam")
  assert "| fbr | 0,1 | +0.0150 ± 0.0071 (2/2) | +0.0100 ± 0.0283 (1/2) |" in table
  assert out["rows"]["cam"]["metrics"]["cam_miou"]["values"] == [0.50, 0.52, 0.51]


def test_collect_takes_plain_work_directories(tmp_path):
  # A work directory that is not a seed folder is a row of its own; its seed comes from
  # its config.json.
  _write_run(tmp_path / "control_run", 3, cam_miou=0.5, pseudo_miou=0.6, seg_miou=0.4)
  _write_run(tmp_path / "method_run", 3, cam_miou=0.55, pseudo_miou=0.58, seg_miou=0.45)
  rows = compare.expand([str(tmp_path / "control_run"), str(tmp_path / "method_run")])
  assert rows == {"control_run": str(tmp_path / "control_run"),
                  "method_run": str(tmp_path / "method_run")}
  out = compare.report(rows, "control_run")
  m = out["paired"]["method_run"]
  assert m["seeds"] == [3]
  np.testing.assert_allclose(m["metrics"]["pseudo_miou"]["diffs"], [-0.02], atol=1e-12)
  assert m["metrics"]["pseudo_miou"]["positive"] == 0


def test_row_specs_and_typed_overrides(tmp_path):
  import pytest
  from absl import app
  name, file_arg, overrides = compare.parse_row(
      "fbr_tap=configs/voc/fbr.py:runlocal,tap --config.fbr.lambda_fb=0.5")
  assert (name, file_arg, overrides) == ("fbr_tap", "configs/voc/fbr.py:runlocal,tap",
                                         ["fbr.lambda_fb=0.5"])
  with pytest.raises(app.UsageError, match="not --config"):
    compare.parse_row("x=configs/voc/cam.py seed=3")
  from conftest import REPO_ROOT
  import os
  config = compare.load_row_config(
      os.path.join(REPO_ROOT, "configs", "voc", "cam.py") + ":runlocal",
      ["seed=4", "cams.scales=(1.0, 2.0)", "model.frozen_bn=false", "data.root=/x"])
  assert config.seed == 4 and config.cams.scales == (1.0, 2.0)
  assert config.model.frozen_bn is False and config.data.root == "/x"
  with pytest.raises(app.UsageError, match="no key"):
    compare.load_row_config(os.path.join(REPO_ROOT, "configs", "voc", "cam.py"), ["optim.lrr=1"])
