"""The shared baseline cache: one trained baseline per setting, never a stale or partial one.

Key-level: every setting that decides the baseline (its fingerprint in the stage
registry, the weights file, the cache version) changes the key; what does not (the
method, its steps and optimizer, later stages, logging, the work directory) keeps it.
Stage-level (in process, a tiny synthetic baseline): a second work directory with the same
settings copies the first one's checkpoint instead of training; a changed seed trains
anew; an entry without its completion file is ignored and replaced.
"""
import os

import ml_collections as mlc
import numpy as np
import pytest

from conftest import load_config_file
from wsss_jax.stages import baseline as baseline_stage
from wsss_jax.stages import baseline_cache
from wsss_jax.stages import runner

CONFIG = "configs/synthetic/cam.py"
TINY = {"data.synthetic.num_train": 16, "data.synthetic.num_val": 8,
        "data.synthetic.image_size": 64, "data.crop_size": 64, "data.batch_size": 8,
        "data.eval_batch_size": 8, "train.progress": False, "train.log_every": 1,
        "train.ckpt_every": 2}


def _config(cache_dir: str = "", **overrides) -> mlc.ConfigDict:
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import common  # pylint: disable=import-outside-toplevel
  c = load_config_file(CONFIG, "runlocal")
  for k, v in TINY.items():
    _assign(c, k, v)
  common.plug_in(c, baseline_steps=2, method_steps=1)
  c.stages = "data,baseline"
  c.data.cache_dir = cache_dir
  for k, v in overrides.items():
    _assign(c, k, v)
  return c


def _assign(c, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


def _key(config) -> str:
  return baseline_stage.cache_entry(config)[0]


@pytest.mark.parametrize("key,value", [
    ("seed", 1), ("baseline.num_steps", 3), ("baseline.optim.lr", 0.5),
    ("baseline.optim.name", "nesterov"), ("model.frozen_stride", 4), ("model.frozen_bn", "toggle"),
    ("model.backbone", "efficientnet_lite2"), ("model.pool", "tap"), ("data.crop_size", 32),
    ("data.scale_range", (0.5, 1.0)), ("data.batch_size", 4), ("data.color_jitter", 0.1),
    ("data.synthetic.cooccurrence", 0.5),
    ("cam_train.ignore_bg_images", "toggle"), ("mesh.step_impl", "shard_map"),
])
def test_every_deciding_setting_changes_the_key(key, value):
  base = _config()
  if value == "toggle":
    value = not base[key.split(".")[0]][key.split(".")[1]]
  assert _key(_config(**{key: value})) != _key(base)


@pytest.mark.parametrize("key,value", [
    ("method", "fbr"), ("train.num_steps", 7), ("optim.lr", 0.5), ("optim.name", "nesterov"),
    ("train.log_every", 5), ("train.ckpt_every", 9), ("data.eval_batch_size", 16),
    ("data.num_workers", 2), ("cams.scales", (1.0, 2.0)), ("pseudo.mode", "crf"),
    ("seg.num_steps", 99), ("data.cache_dir", "/elsewhere"), ("stages", "data,baseline,train"),
    # Scored on another split, a restored baseline's mAP is recomputed, not its weights.
    ("data.val_split", "train"),
])
def test_method_and_later_settings_keep_the_key(key, value):
  assert _key(_config(**{key: value})) == _key(_config())


def test_weights_and_cache_version_are_part_of_the_key(monkeypatch):
  keys = {baseline_cache.cache_key(f, w) for f in ("a", "b") for w in ("x", "y")}
  assert len(keys) == 4
  before = baseline_cache.cache_key("a", "x")
  monkeypatch.setattr(baseline_cache, "CACHE_VERSION", baseline_cache.CACHE_VERSION + 1)
  assert baseline_cache.cache_key("a", "x") != before


def _variables_bytes(workdir) -> bytes:
  with open(os.path.join(workdir, "baseline", "final_variables.msgpack"), "rb") as f:
    return f.read()


def test_second_workdir_reuses_the_baseline_and_a_partial_entry_is_ignored(tmp_path):
  cache = str(tmp_path / "cache")
  first = runner.run_stages(_config(cache), str(tmp_path / "a"))
  assert first["baseline_cached"] is False
  root = baseline_stage.cache_root(_config(cache))
  entries = os.listdir(root)
  assert len(entries) == 1
  # Same settings, another work directory (and another method phase): copied, not trained
  # (no checkpoints folder appears), byte-identical weights.
  second = runner.run_stages(_config(cache, **{"train.num_steps": 5}), str(tmp_path / "b"))
  assert second["baseline_cached"] is True
  assert _variables_bytes(tmp_path / "b") == _variables_bytes(tmp_path / "a")
  assert not os.path.exists(tmp_path / "b" / "baseline" / "checkpoints")
  assert second["baseline_map"] == first["baseline_map"]
  # Another seed: another entry, trained.
  third = runner.run_stages(_config(cache, seed=1), str(tmp_path / "c"))
  assert third["baseline_cached"] is False
  assert len(os.listdir(root)) == 2
  assert _variables_bytes(tmp_path / "c") != _variables_bytes(tmp_path / "a")
  # A partial entry (as a run killed while storing leaves it): never used, replaced.
  entry = os.path.join(root, entries[0])
  os.remove(os.path.join(entry, baseline_cache.ENTRY_FILE))
  fourth = runner.run_stages(_config(cache), str(tmp_path / "d"))
  assert fourth["baseline_cached"] is False
  assert os.path.exists(os.path.join(entry, baseline_cache.ENTRY_FILE))
  np.testing.assert_equal(_variables_bytes(tmp_path / "d"), _variables_bytes(tmp_path / "a"))
