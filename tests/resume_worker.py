"""Subprocess for test_checkpoint_resume: trains the tiny CAM with the real loop.

  python resume_worker.py WORKDIR NUM_STEPS KILL_AFTER

KILL_AFTER > 0: once checkpoint KILL_AFTER is on disk, the process SIGKILLs itself during
the next step's hook (no clean-up runs, like a pre-empted job). Otherwise it trains to
NUM_STEPS (resuming from WORKDIR) and writes WORKDIR/final.npz.
"""
import os
import signal
import sys
import time

from absl import flags

flags.FLAGS(sys.argv[:1])  # grain reads absl flags (JAX_NOTES P8)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tiny_model import TinyCAM, grain_train_iter, make_records, tiny_config  # noqa: E402
from wsss_jax.methods.cam import make_cam_method  # noqa: E402
from wsss_jax.runtime import mesh as mesh_lib  # noqa: E402
from wsss_jax.train import loop, optim  # noqa: E402


def resume_config(num_steps: int):
  return tiny_config(**{"train.num_steps": num_steps, "train.ckpt_every": 3,
                        "train.log_every": 2, "train.keep_checkpoints": 2})


def flat_state(state) -> dict:
  out = {}
  for name in ("params", "batch_stats", "opt_state"):
    for path, x in jax.tree_util.tree_flatten_with_path(getattr(state, name))[0]:
      out[name + "/" + optim.path_str(path)] = np.asarray(x)
  out["step"] = np.asarray(state.step)
  return out


def run(workdir: str, num_steps: int, kill_after: int = 0):
  cfg = resume_config(num_steps)
  method = make_cam_method(cfg, 5, model=TinyCAM(4))
  records = make_records()
  eval_fn = None
  if kill_after:
    cfg.train.eval_every = kill_after + 1

    def eval_fn(state, step):  # runs at step kill_after + 1, after checkpoint kill_after
      del state
      target = os.path.join(workdir, "checkpoints", str(kill_after))
      deadline = time.time() + 60
      while not os.path.isdir(target) and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)
      return {"step": step}

  mesh = mesh_lib.make_mesh(cfg.mesh)
  return loop.train(method, cfg, workdir, lambda: grain_train_iter(records), mesh,
                    eval_fn=eval_fn)


if __name__ == "__main__":
  wd, n, kill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  final = run(wd, n, kill)
  np.savez(os.path.join(wd, "final.npz"), **flat_state(final))
