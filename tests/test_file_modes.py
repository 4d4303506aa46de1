"""Files and folders the package writes get the modes a plain `open`/`mkdir` would give
under the umask (issue #32: pods and clusters share work directories and caches), not the
0600/0700 of `tempfile.mkstemp`/`mkdtemp`. The whole-pipeline check (a real work directory,
checkpoints and the prepared-dataset cache under umask 022) is in test_predict.py."""
import os
import stat

import numpy as np
import pytest

from wsss_jax import fs
from wsss_jax.data import builders


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["022", "027", "077"])
def umask(request):
  old = os.umask(request.param)
  try:
    yield request.param
  finally:
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
  path = tmp_path / "out.json"
  with fs.atomic_path(str(path)) as tmp, open(tmp, "w") as f:
    f.write("{}")
  plain = tmp_path / "plain.json"
  plain.write_text("{}")
  assert _mode(path) == _mode(plain) == 0o666 & ~umask
  # Rewriting an existing file keeps the rule (the temporary file is new each time).
  with fs.atomic_path(str(path)) as tmp, open(tmp, "w") as f:
    f.write("[]")
  assert _mode(path) == 0o666 & ~umask and path.read_text() == "[]"
  assert sorted(os.listdir(tmp_path)) == ["out.json", "plain.json"]  # no temporary left


def test_prepared_folder_follows_the_umask(tmp_path, umask):
  final = tmp_path / "cache" / "prepared"

  def build(tmp):
    os.makedirs(os.path.join(tmp, "inner"))
    with open(os.path.join(tmp, "inner", "data.bin"), "wb") as f:
      f.write(b"x")
    return {"name": "test"}, {"a": np.zeros(2)}

  builders.build_atomically(str(final), build)
  assert _mode(final) == _mode(final / "inner") == 0o777 & ~umask
  for name in ("meta.json", "arrays.npz", "inner/data.bin"):
    assert _mode(final / name) == 0o666 & ~umask, name


def test_temporary_names_are_unique(tmp_path):
  files = {fs.create_temp_file(str(tmp_path), prefix=".x.", suffix=".tmp") for _ in range(50)}
  dirs = {fs.create_temp_dir(str(tmp_path), prefix=".d-") for _ in range(50)}
  assert len(files) == 50 and len(dirs) == 50
  assert all(os.path.basename(p).startswith(".x.") and p.endswith(".tmp") for p in files)
  assert all(os.path.isdir(d) for d in dirs)
