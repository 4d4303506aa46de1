"""Test setup: 8 fake CPU devices (before JAX initialises) and parsed absl flags."""
import importlib.util
import os
import sys

# Must happen before jax creates its backend. `jax_num_cpu_devices` is the supported switch;
# the XLA flag covers subprocesses started by tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

# grain and other absl users read flags; pytest's argv is not theirs (JAX_NOTES P8).
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSRC_ROOT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "msrc21")


def load_config_file(path: str, arg: str):
  """`get_config(arg)` of the config file at `path` (relative to the repository root)."""
  spec = importlib.util.spec_from_file_location("cfg_" + path.replace("/", "_"),
                                                os.path.join(REPO_ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="session")
def msrc_root() -> str:
  """Path of the real MSRC-21 photos in VOC layout (../shared/data/msrc21)."""
  if not os.path.isdir(MSRC_ROOT):
    pytest.skip(f"MSRC data not found at {MSRC_ROOT}")
  return MSRC_ROOT
