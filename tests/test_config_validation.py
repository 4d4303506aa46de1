"""Config and environment problems fail before any expensive work, naming the key (#12)."""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from tiny_model import tiny_config
from wsss_jax.stages import preflight
from wsss_jax.stages import runner
from wsss_jax.stages import workdir as wd


def _config(**overrides):
  # conftest gives 8 CPU devices: batch sizes of 8 divide evenly.
  return tiny_config(**{"data.batch_size": 8, "data.eval_batch_size": 8,
                        "seg.batch_size": 8, **overrides})


def _problems(config, workdir) -> str:
  with pytest.raises(preflight.ConfigError) as e:
    preflight.check(config, str(workdir))
  return str(e.value)


def test_default_config_passes(tmp_path):
  preflight.check(_config(), str(tmp_path / "w"))


def test_bad_enumerations_are_all_listed(tmp_path):
  msg = _problems(_config(**{"method": "foo", "pseudo.mode": "fancy", "optim.name": "adam",
                             "optim.schedule": "step", "model.dtype": "int8",
                             "seg.pseudo_source": "oracle", "model.backbone": "vgg",
                             "model.pointwise_impl": "matmul"}),
                  tmp_path)
  for phrase in ("method='foo'", "pseudo.mode='fancy'", "optim.name='adam'",
                 "optim.schedule='step'", "model.dtype", "seg.pseudo_source='oracle'",
                 "model.backbone='vgg'", "model.pointwise_impl='matmul'", "8 problems"):
    assert phrase in msg, (phrase, msg)


def test_batch_not_divisible_by_devices(tmp_path):
  msg = _problems(_config(**{"data.batch_size": 6, "mesh.data": 4}), tmp_path)
  assert "data.batch_size=6 must be divisible by the mesh's 'data' axis size (4)" in msg
  msg = _problems(_config(**{"mesh.data": 16}), tmp_path)
  assert "config.mesh: mesh.data=16 but only 8 devices" in msg


def test_stage_inputs_missing(tmp_path):
  w = tmp_path / "w"
  msg = _problems(_config(**{"stages": "data,train", "train.init_from": "baseline"}), w)
  assert "stage 'train' needs" in msg and "baseline/final_variables.msgpack" in msg
  assert "add 'baseline' before 'train'" in msg
  preflight.check(_config(**{"stages": "data,baseline,train",
                             "train.init_from": "baseline"}), str(w))
  (w / "baseline").mkdir(parents=True)
  (w / "baseline" / "final_variables.msgpack").write_bytes(b"x")
  preflight.check(_config(**{"stages": "train", "train.init_from": "baseline"}), str(w))

  msg = _problems(_config(**{"stages": "sweep,pseudo,seg,evaluate"}), w)
  assert "stage 'sweep' needs" in msg and "cams/train/complete.json" in msg
  assert "add 'cams' before 'sweep'" in msg
  assert "stage 'seg' needs" not in msg  # pseudo is listed before seg
  msg = _problems(_config(**{"stages": "cams", "cams.variables": "baseline",
                             "train.init_from": str(tmp_path / "nope")}), tmp_path / "v")
  assert "baseline/final_variables.msgpack (cams.variables='baseline')" in msg
  msg = _problems(_config(**{"stages": "train", "train.init_from": str(tmp_path / "nope")}),
                  w)
  assert f"train.init_from='{tmp_path / 'nope'}'" in msg


def test_step_counts(tmp_path):
  msg = _problems(_config(**{"stages": "data,baseline,train", "baseline.num_steps": 0}),
                  tmp_path)
  assert "baseline.num_steps=0: the baseline stage needs a positive number" in msg


def test_low_disk_space_and_unwritable(tmp_path, monkeypatch):
  free = shutil.disk_usage(tmp_path).free / 2**20
  msg = _problems_env(tmp_path, monkeypatch, str(free * 2))
  assert "MiB free on its disk" in msg and "WSSS_JAX_MIN_FREE_MB" in msg
  monkeypatch.setenv("WSSS_JAX_MIN_FREE_MB", "0")
  preflight.check(_config(), str(tmp_path / "new" / "deeper"))
  if os.geteuid() != 0:  # root writes anywhere
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert "is not writable" in _problems(_config(), ro / "w")


def _problems_env(tmp_path, monkeypatch, min_free_mb: str) -> str:
  monkeypatch.setenv("WSSS_JAX_MIN_FREE_MB", min_free_mb)
  return _problems(_config(), tmp_path / "w")


def test_run_stages_fails_before_creating_anything(tmp_path):
  w = tmp_path / "never"
  with pytest.raises(preflight.ConfigError, match="pseudo.mode='x'"):
    runner.run_stages(_config(**{"pseudo.mode": "x"}), str(w))
  with pytest.raises(ValueError, match=r"config.data.root='/no/such/dir' is not a directory"):
    runner.run_stages(_config(**{"data.name": "voc", "data.root": "/no/such/dir"}), str(w))
  assert not w.exists()


def test_disk_full_while_writing_keeps_the_old_file(tmp_path):
  path = tmp_path / "results.json"
  wd.write_json(str(path), {"a": 1})
  with pytest.raises(OSError, match=f"No space left on device while writing {path}") as e:
    with wd.atomic_path(str(path)) as tmp:
      with open(tmp, "w") as f:
        f.write("partial")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert e.value.errno == errno.ENOSPC
  assert wd.read_json(str(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_misspelt_key_on_the_command_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "wsss_jax.main",
       f"--config={os.path.join(REPO_ROOT, 'configs', 'synthetic', 'cam.py')}:runlocal",
       f"--workdir={tmp_path / 'w'}", "--config.optim.lrr=0.1"],
      capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 1
  assert ("FATAL: --config.optim.lrr=0.1: the config has no key 'lrr'; did you mean 'lr'?"
          in proc.stderr), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_results_record_the_git_revision():
  rev = runner.git_revision()
  assert rev == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rev), rev
  assert runner.software_versions()["git"] == rev


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "wsss_jax.main", *args],
                        capture_output=True, text=True, timeout=300, env=env)


def test_unknown_config_arg_or_file_is_one_line(tmp_path):
  cam = os.path.join(REPO_ROOT, "configs", "synthetic", "cam.py")
  for config, phrase in ((f"{cam}:runlocal,bogus=1", "Unknown config argument 'bogus'"),
                         (cam.replace("cam.py", "nope.py"), "No such file or directory")):
    proc = _cli(f"--config={config}", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 1
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and phrase in fatal[0] and f"--config={config}" in fatal[0], (
        proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_help_lists_stages_configs_and_keys():
  from wsss_jax.stages import registry  # pylint: disable=import-outside-toplevel
  proc = _cli("--help")   # absl exits with 1 after printing the help
  for stage in registry.STAGES:
    assert f"  {stage.name}  " in proc.stdout and stage.summary in proc.stdout, stage.name
  assert "configs/voc/: cam.py csrm.py" in proc.stdout
  for key in ("stages", "data.root", "model.backbone", "rerun"):
    assert key in proc.stdout.split("Most used keys")[1], key
  assert "--workdir" in proc.stdout
