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
