"""The real `wsss` command with a tiny backbone, for the subprocesses of test_preemption
and test_predict.

  python preempt_worker.py --config=... --workdir=... [--config.KEY=VALUE ...]

Everything is `wsss_jax.main` (signal handling, stages, checkpoints, exit codes) except
`models.registry.build_backbone`, which returns a two-convolution network with the same
outputs (`stride4`, `out` at output stride 16) so the compiles that dominate a CPU run of
EfficientNet take a second instead of a minute.
"""
from __future__ import annotations

from tiny_backbone import tiny_backbone
from wsss_jax import main
from wsss_jax.models import registry

if __name__ == "__main__":
  registry.build_backbone = tiny_backbone
  main.run()
