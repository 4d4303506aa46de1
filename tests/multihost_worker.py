"""One process of the multi-process test (tests/test_multihost.py).

  python multihost_worker.py --process_id=I --num_processes=N --port=P \
      --workdir=DIR --cache_dir=DIR [--resume_at=K]

The parent sets XLA_FLAGS (CPU devices per process) and JAX_PLATFORMS=cpu before this
starts. Every process runs the real pipeline (`runner.run_stages`: data, train, cams, sweep,
pseudo) on a tiny synthetic dataset with the TinyCAM model, through `jax.distributed` on
localhost with the gloo CPU collectives. With `--resume_at=K > 0` training first stops
after K steps (checkpoint written by every process) and the train stage then resumes from
it (restored by every process).
"""
import argparse
import os
import sys

from absl import flags

flags.FLAGS(sys.argv[:1])  # grain reads absl flags (JAX_NOTES P8)

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_model import TinyCAM, tiny_config  # noqa: E402

from wsss_jax.runtime import distributed  # noqa: E402


def worker_config(cache_dir: str):
  """Small enough for a 2-core machine running up to 4 of these at once."""
  c = tiny_config(**{
      "stages": "data,train,cams,sweep,pseudo", "method": "tiny_cam",
      "data.cache_dir": cache_dir, "data.synthetic.num_train": 16,
      "data.synthetic.num_val": 8, "data.synthetic.image_size": 32,
      "data.crop_size": 32, "data.batch_size": 8, "data.eval_batch_size": 4,
      "data.num_threads": 1, "data.sweep_split": "train",
      "optim.schedule": "constant",  # a run stopped at K steps has the same LRs
      "train.num_steps": 4, "train.ckpt_every": 2, "train.log_every": 2,
      "cams.scales": (1.0, 0.5), "pseudo.mode": "double",  # the CRF costs 20 s of compile here
      "model.pretrained": False})
  c.data.synthetic.seed = 3
  return c


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--cache_dir", required=True)
  parser.add_argument("--resume_at", type=int, default=0)
  args = parser.parse_args()
  if args.num_processes > 1:
    distributed.initialize(coordinator_address=f"localhost:{args.port}",
                           num_processes=args.num_processes, process_id=args.process_id)
  # Tiny programs: codegen quality does not matter, compile time does (2-core CI).
  jax.config.update("jax_disable_most_optimizations", True)

  from wsss_jax import methods  # pylint: disable=import-outside-toplevel
  from wsss_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from wsss_jax.methods.cam import make_cam_method  # pylint: disable=import-outside-toplevel
  from wsss_jax.stages import runner  # pylint: disable=import-outside-toplevel
  from wsss_jax.runtime import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from wsss_jax.train import loop  # pylint: disable=import-outside-toplevel

  # TinyCAM behind the ordinary method registry, so every stage uses it.
  methods.FACTORIES["tiny_cam"] = lambda cfg, n: make_cam_method(cfg, n,
                                                                 model=TinyCAM(n - 1))
  config = worker_config(args.cache_dir)
  if args.resume_at:
    # Train K steps only (the loop checkpoints at its last step), then let the train
    # stage resume from that checkpoint to train.num_steps.
    if distributed.is_chief():
      sources.prepare(config.data)
    distributed.barrier("prepared")
    short = type(config)(config.to_dict())
    short.train.num_steps = args.resume_at
    meta = sources.prepare(short.data)
    method = methods.make_method(short, meta.num_classes)
    mesh = mesh_lib.make_mesh(short.mesh)
    source = sources.get_source(short.data, short.data.train_split)
    loop.train(method, short, os.path.join(args.workdir, "train"),
               lambda: pipeline.train_dataset(source, short.data, seed=short.seed,
                                              mesh=mesh), mesh)
  runner.run_stages(config, args.workdir)
  print(f"process {jax.process_index()}/{jax.process_count()} devices "
        f"{jax.local_device_count()}/{jax.device_count()} done", flush=True)


if __name__ == "__main__":
  main()
