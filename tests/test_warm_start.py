"""Warm start (`config.train.init_from`) and the baseline stage's config."""
import os

import jax
import numpy as np
import pytest

from tiny_model import TinyCAM, tiny_config
from wsss_jax.methods.base import Method
from wsss_jax.stages import baseline as baseline_stage
from wsss_jax.stages import inference
from wsss_jax.stages import training
from wsss_jax.train import warm_start


def _variables(seed, num_fg=4, width=8):
  v = TinyCAM(num_fg, width=width).init(jax.random.key(seed), np.zeros((1, 8, 8, 3)),
                                        train=False)
  return jax.device_get({"params": v["params"], "batch_stats": v["batch_stats"]})


def test_merge_copies_shared_leaves_and_keeps_new_ones():
  saved = _variables(0)
  fresh = _variables(1)
  fresh["params"]["new_head"] = {"kernel": np.full((3, 2), 7.0, np.float32)}
  merged, copied, new = warm_start.merge_matching(fresh, saved, "saved.msgpack")
  np.testing.assert_array_equal(merged["params"]["backbone"]["conv"]["kernel"],
                                saved["params"]["backbone"]["conv"]["kernel"])
  np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["bn"]["mean"],
                                saved["batch_stats"]["backbone"]["bn"]["mean"])
  np.testing.assert_array_equal(merged["params"]["new_head"]["kernel"], 7.0)
  assert new == ["params/new_head/kernel"]
  assert "params/head/kernel" in copied and len(copied) == len(jax.tree.leaves(saved))
  # The input tree is not modified in place.
  assert not np.array_equal(fresh["params"]["backbone"]["conv"]["kernel"],
                            saved["params"]["backbone"]["conv"]["kernel"])


def test_merge_rejects_shape_mismatch_and_unrelated_files():
  with pytest.raises(ValueError, match=r"other.msgpack: warm-start leaf params/head/(bias|kernel) has shape"):
    warm_start.merge_matching(_variables(0, num_fg=5), _variables(1, num_fg=4),
                              "other.msgpack")
  with pytest.raises(ValueError, match="no parameter in common"):
    warm_start.merge_matching(_variables(0), {"params": {"x": np.zeros(2)}}, "x.msgpack")


def test_init_from_path_and_with_warm_start(tmp_path):
  cfg = tiny_config()
  assert training.init_from_path(cfg, str(tmp_path)) == ""
  cfg.train.init_from = "baseline"
  with pytest.raises(FileNotFoundError, match="add the 'baseline' stage"):
    training.init_from_path(cfg, str(tmp_path))
  saved = _variables(0)
  os.makedirs(tmp_path / "baseline")
  path = str(tmp_path / "baseline" / inference.VARIABLES_FILE)
  inference.save_variables(path, saved["params"], saved["batch_stats"])
  assert training.init_from_path(cfg, str(tmp_path)) == path
  cfg.train.init_from = str(tmp_path / "baseline")  # a directory holding the file
  assert training.init_from_path(cfg, str(tmp_path)) == path

  calls = []
  method = Method(name="cam", model=TinyCAM(4), loss=None,
                  load_pretrained=lambda v: calls.append(1) or v)
  loaded = training.with_warm_start(method, path).load_pretrained(_variables(1))
  assert calls == [1]  # the method's own (ImageNet) loader still runs first
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(loaded), jax.tree.leaves(saved))) == 0.0
  assert training.with_warm_start(method, "") is method


def test_baseline_config_trains_cam_for_its_own_steps():
  cfg = tiny_config()
  cfg.method = "csrm"
  cfg.train.num_steps = 30
  cfg.train.init_from = "baseline"
  cfg.baseline.num_steps = 12
  cfg.baseline.lr = 0.5
  b = baseline_stage.baseline_config(cfg)
  assert (b.method, b.train.num_steps, b.train.init_from, b.optim.lr) == ("cam", 12, "", 0.5)
  assert (cfg.method, cfg.train.num_steps) == ("csrm", 30)  # the input is not modified
