"""Stages declared once, fingerprints, and a work directory that never holds the outputs of
another config (issue #27). Fast: nothing is trained; records are written by hand where a
test needs outputs on disk (tests/test_stages.py runs the real command line)."""
from __future__ import annotations

import json
import os

import pytest

from tiny_model import tiny_config
from wsss_jax.stages import preflight
from wsss_jax.stages import provenance
from wsss_jax.stages import registry


def _fps(config) -> dict[str, str]:
  """Fingerprints of the default pipeline's stages (a CAM config's)."""
  return {name: registry.fingerprint(config, name) for name in registry.DEFAULT_STAGES}


def _changed(before, after) -> set[str]:
  return {name for name in before if before[name] != after[name]}


# ---------------------------------------------------------------------------------------
# The one list of stages.
# ---------------------------------------------------------------------------------------
def test_the_registry_is_the_only_stage_list():
  tiny_config()  # puts configs/ on the path
  import common  # pylint: disable=import-error,import-outside-toplevel  (configs/common.py)
  from wsss_jax.stages import runner  # pylint: disable=import-outside-toplevel
  assert len(set(registry.NAMES)) == len(registry.STAGES)
  assert common.ALL_STAGES == registry.DEFAULT_STAGES
  assert common.base_config(method="cam", dataset="synthetic",
                            runlocal=True).stages == ",".join(registry.DEFAULT_STAGES)
  for module in (runner, preflight):  # no second list of stage names or modules
    assert not [k for k, v in vars(module).items()
                if isinstance(v, (dict, tuple, list)) and set(registry.NAMES) <= set(v)], module
  for stage in registry.STAGES:
    assert callable(stage.function()), stage.name
    assert stage.makes(tiny_config())[0], stage.name


def test_needs_follow_the_config():
  c = tiny_config()
  assert [n.stage for n in registry.stage("cams").needs(c)] == ["data", "train"]
  assert [n.stage for n in registry.stage("pseudo").needs(c)] == ["data", "cams", "sweep"]
  c = tiny_config(**{"cams.variables": "baseline", "pseudo.fg_threshold": 0.3,
                     "train.init_from": "baseline", "seg.pseudo_source": "gt"})
  assert [n.stage for n in registry.stage("cams").needs(c)] == ["data", "baseline"]
  assert [n.stage for n in registry.stage("pseudo").needs(c)] == ["data", "cams"]
  assert [n.stage for n in registry.stage("train").needs(c)] == ["data", "baseline"]
  assert [n.stage for n in registry.stage("seg").needs(c)] == ["data"]
  assert registry.stage("seg").makes(c)[0] == "seg_gt/"


# ---------------------------------------------------------------------------------------
# Fingerprints.
# ---------------------------------------------------------------------------------------
def test_baseline_fingerprint_ignores_what_does_not_decide_its_weights(tmp_path):
  base = tiny_config(**{"stages": "data,baseline,train"})
  fp = registry.fingerprint(base, "baseline")
  same = {"stages": "baseline", "rerun": "changed", "train.log_every": 7,
          "train.ckpt_every": 3, "train.progress": True, "train.keep_checkpoints": 9,
          "train.eval_every": 5, "train.num_steps": 3, "train.init_from": "baseline",
          "data.val_split": "train", "data.sweep_split": "val", "data.num_workers": 2,
          "data.eval_batch_size": 4, "mesh.data": 2, "mesh.fsdp": 2, "cams.scales": (2.0,),
          "seg.lr": 0.5, "method": "fbr", "data.cache_dir": str(tmp_path)}
  base.data.weak_label = "points"   # SPML's keys do not reach the baseline's records
  base.data.extra_maps = ("superpixels",)
  assert registry.fingerprint(base, "baseline") == fp
  for key, value in same.items():
    assert registry.fingerprint(tiny_config(**{key: value}), "baseline") == fp, key
  changes = {"seed": 1, "optim.lr": 0.5, "optim.name": "adamw", "model.backbone": "resnet50",
             "model.weights_path": "/w.pth", "baseline.num_steps": 3,
             "data.batch_size": 8, "data.crop_size": 32, "data.train_split": "val",
             "data.synthetic.num_train": 32, "cam_train.ignore_bg_images": True,
             "mesh.step_impl": "shard_map"}
  for key, value in changes.items():
    assert registry.fingerprint(tiny_config(**{key: value}), "baseline") != fp, key
  # With its own learning rate the baseline no longer depends on optim.lr.
  own = tiny_config(**{"baseline.lr": 0.1})
  assert registry.fingerprint(own, "baseline") == registry.fingerprint(
      tiny_config(**{"baseline.lr": 0.1, "optim.lr": 0.9}), "baseline")


def test_a_change_invalidates_its_stage_and_everything_downstream():
  before = _fps(tiny_config())
  assert _changed(before, _fps(tiny_config(**{"cams.scales": (1.0, 2.0)}))) == {
      "cams", "sweep", "pseudo", "seg", "evaluate"}
  assert _changed(before, _fps(tiny_config(**{"sweep.thresholds": (0.2, 0.4)}))) == {
      "sweep", "pseudo", "seg", "evaluate"}
  # pseudo.fg_threshold >= 0: the pseudo-labels no longer read the sweep.
  fixed = _fps(tiny_config(**{"pseudo.fg_threshold": 0.3}))
  assert fixed["sweep"] == before["sweep"] and fixed["pseudo"] != before["pseudo"]
  assert _changed(fixed, _fps(tiny_config(**{"pseudo.fg_threshold": 0.3,
                                             "sweep.thresholds": (0.2,)}))) == {"sweep"}
  # The dataset: every stage.
  assert _changed(before, _fps(tiny_config(**{"data.synthetic.seed": 3}))) == set(
      registry.DEFAULT_STAGES)


def test_evaluation_settings_only_invalidate_evaluate():
  before = _fps(tiny_config())
  for key, value in (("seg.scales", (0.5, 1.0)), ("seg.crf", True), ("seg.flip", False),
                     ("data.val_split", "train")):
    changed = _changed(before, _fps(tiny_config(**{key: value})))
    assert "evaluate" in changed and "seg" not in changed, key
  assert _changed(before, _fps(tiny_config(**{"seg.lr": 0.1}))) == {"seg", "evaluate"}


def test_report_settings_rescore_without_invalidating():
  a, b = tiny_config(), tiny_config(**{"data.val_split": "train"})
  ia, ib = registry.identities(a)("train"), registry.identities(b)("train")
  assert ia.fingerprint == ib.fingerprint
  assert ia.report == {"data.val_split": "val"} and ib.report == {"data.val_split": "train"}


# ---------------------------------------------------------------------------------------
# Records on disk: stop naming the keys, or recompute.
# ---------------------------------------------------------------------------------------
def _finish(workdir: str, config, names: list[str]) -> None:
  """Writes the records (and a file in each home) as if `names` had run with `config`."""
  identity = registry.identities(config)
  for name in names:
    stage = registry.stage(name)
    home = os.path.join(workdir, stage.makes(config)[0])
    os.makedirs(home if home.endswith("/") else os.path.dirname(home), exist_ok=True)
    if not home.endswith("/"):
      open(home, "w").close()
    provenance.write_record(workdir, stage, config, identity(name), status="done",
                            values={f"{name}_value": 1.0}, seconds=2.0)


def test_changed_settings_stop_before_any_work_naming_each_key(tmp_path):
  w = str(tmp_path)
  old = tiny_config()
  _finish(w, old, ["data", "train", "cams", "sweep"])
  new = tiny_config(**{"seed": 7, "optim.lr": 0.5, "model.backbone": "resnet50",
                       "stages": "train,cams,sweep"})
  listing = sorted(os.listdir(w))
  with pytest.raises(provenance.StaleWorkdirError) as e:
    provenance.check(new, w, ["train", "cams", "sweep"])
  msg = str(e.value)
  assert 'model.backbone  "efficientnet_lite0" -> "resnet50"  (train)' in msg
  assert "optim.lr" in msg and "0.05 -> 0.5" in msg
  assert "seed" in msg and "0 -> 7" in msg
  for name, home in (("train", "train/"), ("cams", "cams/"), ("sweep", "sweep.json")):
    assert f"  {name}: {os.path.join(w, home)}" in msg
  assert "data:" not in msg                          # the dataset did not change
  assert "--config.rerun=changed" in msg and "--workdir" in msg
  assert sorted(os.listdir(w)) == listing            # nothing written, nothing deleted


def test_rerun_changed_deletes_the_stale_outputs_only(tmp_path):
  w = str(tmp_path)
  old = tiny_config()
  _finish(w, old, ["data", "train", "cams", "sweep"])
  new = tiny_config(**{"cams.scales": (0.5,), "rerun": "changed"})
  plan = provenance.check(new, w, ["cams", "sweep"])
  assert not os.path.exists(os.path.join(w, "cams"))
  assert not os.path.exists(os.path.join(w, "sweep.json"))
  assert not os.path.exists(os.path.join(w, "sweep.fingerprint.json"))
  assert os.path.exists(os.path.join(w, "train", "fingerprint.json"))
  assert not plan.stale
  assert plan.current("train").record["status"] == "done"
  results = provenance.results(new, w, {"method": "cam"})
  assert set(results["fingerprints"]) == {"data", "train"}  # what is on disk, only
  assert "cams_value" not in results and results["train_value"] == 1.0
  assert results["timings"] == {"data": 2.0, "train": 2.0}


def test_rerun_changed_refuses_to_delete_an_input_it_would_not_remake(tmp_path):
  w = str(tmp_path)
  _finish(w, tiny_config(), ["data", "train", "cams"])
  new = tiny_config(**{"cams.scales": (0.5,), "rerun": "changed"})
  with pytest.raises(registry.ConfigError, match="add 'cams' before 'sweep'"):
    provenance.check(new, w, ["sweep"])
  assert os.path.exists(os.path.join(w, "cams", "fingerprint.json"))  # nothing deleted


def test_outputs_without_records_are_judged_by_config_json(tmp_path):
  w = tmp_path
  (w / "train").mkdir()
  # No record and no config.json: made outside the runner; nothing says otherwise.
  assert not provenance.check(tiny_config(), str(w), ["train"]).stale
  with open(w / "config.json", "w") as f:
    json.dump(tiny_config().to_dict(), f)
  assert not provenance.check(tiny_config(), str(w), ["train"]).stale  # adopted
  with pytest.raises(provenance.StaleWorkdirError, match=r"seed +0 -> 3"):
    provenance.check(tiny_config(**{"seed": 3}), str(w), ["train"])
  with open(w / "config.json", "w") as f:   # a config.json that cannot say: never reused
    json.dump({"data": {"name": "voc", "root": str(w / "gone")}}, f)
  with pytest.raises(provenance.StaleWorkdirError, match="its config.json cannot say"):
    provenance.check(tiny_config(), str(w), ["train"])


def test_both_seg_variants_are_checked(tmp_path):
  w = str(tmp_path)
  c = tiny_config()
  gt = tiny_config(**{"seg.pseudo_source": "gt"})
  _finish(w, c, ["seg"])
  _finish(w, gt, ["seg"])
  assert not provenance.check(gt, w, ["seg"]).stale       # seg/ is judged as 'pseudo'
  with pytest.raises(provenance.StaleWorkdirError) as e:
    provenance.check(tiny_config(**{"seg.pseudo_source": "gt", "seg.num_steps": 3}), w,
                     ["seg"])
  assert os.path.join(w, "seg") + "/" in str(e.value)
  assert os.path.join(w, "seg_gt") + "/" in str(e.value)


def test_preflight_lists_every_problem_of_the_issue_at_once(tmp_path):
  c = tiny_config(**{"stages": "data,trian,train", "method": "nope", "rerun": "always",
                     "data.name": "voc", "data.root": str(tmp_path / "missing")})
  with pytest.raises(preflight.ConfigError) as e:
    preflight.check(c, str(tmp_path / "w"))
  msg = str(e.value)
  for phrase in ("unknown stage(s) ['trian']", "method='nope'", "rerun='always'",
                 f"config.data.root='{tmp_path / 'missing'}' is not a directory",
                 "4 problems"):
    assert phrase in msg, (phrase, msg)
  (tmp_path / "notvoc").mkdir()
  with pytest.raises(preflight.ConfigError, match="JPEGImages: missing"):
    preflight.check(tiny_config(**{"data.name": "voc", "data.root": str(tmp_path / "notvoc")}),
                    str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
