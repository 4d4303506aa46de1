"""Multi-host for real, on one machine: 2 and 4 JAX processes on localhost (CPU devices,
gloo collectives) run the pipeline (train with a checkpoint restore, CAMs, sweep,
pseudo-labels) and must give what one process with the same devices and global batch
gives. Two processes also run it with the work directory in a bucket (`gs://`, a Cloud
Storage server on localhost: tests/gcs_emulator.py), as the workers of a TPU pod do.

Each run uses 4 CPU devices in total (1 x 4, 2 x 2, 4 x 1), global train batch 8, eval
batch 4. Workers: tests/multihost_worker.py.
"""
import json
import os
import socket
import subprocess
import sys

import flax.serialization
from flax import traverse_util
import numpy as np
import pytest

from wsss_jax.runtime import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
TOTAL_DEVICES = 4
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(num_processes: int, workdir: str, cache_dir: str, resume_at: int = 0,
         logs_dir: str = "", env_extra: dict | None = None) -> None:
  """Starts the worker processes and waits for all; fails with their logs."""
  env = {**os.environ, **(env_extra or {})}
  env.update({
      "XLA_FLAGS": f"--xla_force_host_platform_device_count="
                   f"{TOTAL_DEVICES // num_processes}",
      "JAX_PLATFORMS": "cpu", "WSSS_JAX_XLA_CACHE": "0",
      "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE),
                                     env.get("PYTHONPATH", "")])})
  port = _free_port()
  logs_dir = logs_dir or workdir + "_logs"
  logs = [os.path.join(logs_dir, f"p{i}.log") for i in range(num_processes)]
  os.makedirs(logs_dir, exist_ok=True)
  procs = []
  for i in range(num_processes):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, f"--process_id={i}", f"--num_processes={num_processes}",
           f"--port={port}", f"--workdir={workdir}", f"--cache_dir={cache_dir}",
           f"--resume_at={resume_at}"],
          env=env, stdout=log, stderr=subprocess.STDOUT))
  codes = []
  try:
    for p in procs:
      codes.append(p.wait(timeout=TIMEOUT_S))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if any(codes):
    tails = "\n".join(f"--- process {i} (exit {c}) ---\n" + open(logs[i]).read()[-3000:]
                      for i, c in enumerate(codes))
    pytest.fail(f"{num_processes}-process run failed:\n{tails}")


def _outputs(workdir: str) -> dict:
  """The run's weights, CAMs, pseudo-labels, results and losses (local folder or gs://)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from wsss_jax import fs  # pylint: disable=import-outside-toplevel
  variables = flax.serialization.msgpack_restore(
      fs.read_bytes(os.path.join(workdir, "train", "final_variables.msgpack")))
  cams = {}
  cam_dir = os.path.join(workdir, "cams", "train")
  for name in sorted(n for n in fs.names_in(cam_dir) if n.endswith(".npz")):
    with fs.open_file(os.path.join(cam_dir, name), "rb") as f, np.load(f) as z:
      cams[name] = {k: z[k].astype(np.float32) for k in z.files}
  pseudo = {}
  pseudo_dir = os.path.join(workdir, "pseudo")
  for name in sorted(n for n in fs.names_in(pseudo_dir) if n.endswith(".png")):
    with fs.open_file(os.path.join(pseudo_dir, name), "rb") as f:
      pseudo[name] = np.asarray(Image.open(f))
  results = json.loads(fs.read_bytes(os.path.join(workdir, "results.json")))
  log = fs.read_bytes(os.path.join(workdir, "train", "metrics.jsonl")).decode()
  losses = [r["loss"] for r in map(json.loads, log.splitlines()) if "loss" in r]
  return {"variables": variables, "cams": cams, "pseudo": pseudo, "results": results,
          "losses": losses}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("mh_cache"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir) -> dict:
  """The reference: one process, 4 devices, training uninterrupted."""
  workdir = str(tmp_path_factory.mktemp("mh_single") / "w")
  _run(1, workdir, cache_dir)
  return _outputs(workdir)


def _assert_same(multi: dict, single: dict) -> None:
  flat_m = traverse_util.flatten_dict(multi["variables"], sep="/")
  flat_s = traverse_util.flatten_dict(single["variables"], sep="/")
  assert flat_m.keys() == flat_s.keys()
  for k in flat_s:
    np.testing.assert_allclose(flat_m[k], flat_s[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
  assert multi["cams"].keys() == single["cams"].keys() and len(single["cams"]) == 16
  for name, ref in single["cams"].items():
    np.testing.assert_array_equal(multi["cams"][name]["keys"], ref["keys"])
    for key in ("cam", "high_res"):  # float16 on disk
      np.testing.assert_allclose(multi["cams"][name][key], ref[key], atol=2e-3,
                                 err_msg=f"{name}:{key}")
  assert multi["pseudo"].keys() == single["pseudo"].keys() and len(single["pseudo"]) == 16
  agree = np.mean([np.mean(multi["pseudo"][k] == v) for k, v in single["pseudo"].items()])
  assert agree > 0.999, agree
  for key in ("train_map", "cam_miou", "cam_threshold", "pseudo_miou"):
    np.testing.assert_allclose(multi["results"][key], single["results"][key], atol=1e-4,
                               err_msg=key)
  assert multi["results"]["cam_images"] == single["results"]["cam_images"]


@pytest.mark.parametrize("num_processes", [2, 4])
def test_processes_equal_single_process(num_processes, single, cache_dir, tmp_path):
  workdir = str(tmp_path / "w")
  _run(num_processes, workdir, cache_dir, resume_at=2)
  multi = _outputs(workdir)
  _assert_same(multi, single)
  # Process 0 alone wrote the summaries: one header + 2 log lines, not one per process.
  assert len(multi["losses"]) == 2


def test_processes_share_a_bucket_workdir(single, cache_dir, tmp_path):
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  server, url = gcs_emulator.start(str(tmp_path / "store"))
  env = gcs_emulator.client_env(url)
  try:
    workdir = f"gs://{gcs_emulator.BUCKET}/mh"
    # Both processes checkpoint into the bucket at step 2 and restore from it.
    _run(2, workdir, cache_dir, resume_at=2, logs_dir=str(tmp_path / "logs"),
         env_extra=env)
    with pytest.MonkeyPatch.context() as mp:
      for key, value in env.items():
        mp.setenv(key, value)
      multi = _outputs(workdir)
  finally:
    server.stop()
  _assert_same(multi, single)
  assert len(multi["losses"]) == 2
  # Each process wrote its own orbax shard of the checkpoint into the one bucket folder.
  state = tmp_path / "store" / ".cloudstorage" / gcs_emulator.BUCKET / "mh" / "train" / \
      "checkpoints" / "4" / "state"
  assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                             "ocdbt.process_1"}


def test_gather_helpers_single_process():
  """The host-side merges degrade to plain numpy in one process (exact int64)."""
  big = np.array([[2**40 + 1, -3]], np.int64)
  np.testing.assert_array_equal(distributed.sum_over_processes(big), big)
  assert distributed.allgather(big).dtype == np.int64
  out = distributed.gather_indexed(np.array([2, 0, 1]), {"v": np.array([[20], [0], [10]])},
                                   3, slots=4)
  np.testing.assert_array_equal(out["v"][:, 0], [0, 10, 20])
  with pytest.raises(ValueError, match="computed"):
    distributed.gather_indexed(np.array([0, 0]), {"v": np.zeros((2, 1))}, 2, slots=2)
  assert distributed.all_processes_agree(True) and not distributed.all_processes_agree(False)


def test_initialize_errors():
  with pytest.raises(ValueError, match="missing"):
    distributed.initialize("auto", coordinator_address="localhost:1")
  with pytest.raises(ValueError, match="not in"):
    distributed.initialize("auto", coordinator_address="localhost:1", num_processes=2,
                           process_id=2)
  with pytest.raises(ValueError, match="--distributed"):
    distributed.initialize("maybe")
  assert distributed.initialize("off") is False
