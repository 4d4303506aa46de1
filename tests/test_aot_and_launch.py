"""The AOT compile check (wsss_jax/train/aot.py) on the 8 fake CPU devices, and the
launchers' commands (launch/, DRY_RUN=1).

What needs a TPU runtime library is skipped here: the compile against a real TPU topology
runs only where libtpu is importable (`pip install "jax[tpu]==0.10.2"`).
"""
import importlib.util
import os
import subprocess

import pytest

from tiny_model import TinyCAM, fast_compile, tiny_config  # noqa: F401
from wsss_jax import methods
from wsss_jax.methods.cam import make_cam_method
from wsss_jax.train import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_method(monkeypatch):
  monkeypatch.setitem(methods.FACTORIES, "tiny_cam",
                      lambda cfg, n: make_cam_method(cfg, n, model=TinyCAM(n - 1)))
  return tiny_config(method="tiny_cam", **{"mesh.fsdp_min_size": 1})


@pytest.mark.usefixtures("fast_compile")
def test_aot_compiles_fsdp_mesh_and_reports_memory(tiny_method, monkeypatch):
  cfg = tiny_method
  cfg.mesh.fsdp = 2
  devices = aot.topology_devices("", 8)
  report = aot.compile_train_step(cfg, devices, 5)
  assert report["ok"], report
  assert report["mesh"] == {"data": 4, "fsdp": 2}
  assert report["total_bytes"] > 0 and report["argument_bytes"] > 0

  # A batch that does not split over the mesh is a sharding error, found before any run.
  cfg.data.batch_size = 12
  report = aot.compile_train_step(cfg, devices, 5)
  assert not report["ok"] and "does not divide" in report["error"]

  # Out of memory against the device's HBM (pretend the CPU device has 1 KiB).
  cfg.data.batch_size = 16
  monkeypatch.setattr(aot, "hbm_bytes", lambda device: 1024)
  report = aot.compile_train_step(cfg, devices, 5)
  assert not report["ok"] and report["error"].startswith("out of memory")


def test_aot_mesh_errors():
  devices = aot.topology_devices("", 8)
  with pytest.raises(ValueError, match="fsdp=3"):
    aot.mesh_for({"data": -1, "fsdp": 3}, devices)
  with pytest.raises(ValueError, match="whole topology"):
    aot.mesh_for({"data": 2, "fsdp": 2}, devices)
  assert aot.hbm_bytes(type("D", (), {"device_kind": "TPU v5 lite"})()) == 16 << 30


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed: TPU topologies cannot be built")
@pytest.mark.usefixtures("fast_compile")
def test_aot_tpu_topology(tiny_method):
  devices = aot.topology_devices("v5e:2x2")
  assert len(devices) == 4 and "TPU" in devices[0].device_kind
  report = aot.compile_train_step(tiny_method, devices, 5)
  assert report["ok"], report
  assert report["hbm_bytes"] == 16 << 30


def _dry(cmd, **env):
  out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "DRY_RUN": "1", **env},
                       capture_output=True, text=True, check=True)
  return out.stdout


def test_launchers_print_the_right_commands():
  out = _dry(["bash", "launch/tpu_pod.sh", "run", "my-tpu", "us-central2-b", "--",
              "--config=configs/coco/cam.py", "--workdir=/mnt/w"])
  assert "gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all" in out
  assert "wsss --distributed=on --config=configs/coco/cam.py --workdir=/mnt/w" in out
  out = _dry(["bash", "launch/tpu_pod.sh", "setup", "my-tpu", "z", "proj"])
  assert "scp" in out and "--project proj" in out and "jax[tpu]==0.10.2" in out
  out = _dry(["bash", "launch/slurm.sbatch", "--config=c.py", "--workdir=w"])
  assert "srun --ntasks-per-node=1" in out and "wsss --distributed=auto --config=c.py" in out
  out = _dry(["bash", "launch/local.sh", "-n", "2", "--", "--config=c.py"], PORT="1234")
  lines = out.strip().splitlines()
  assert len(lines) == 2 and all("--coordinator_address=localhost:1234" in x for x in lines)
  assert any("--num_processes=2 --process_id=1 --config=c.py" in x for x in lines)
