"""Files of a work directory: local paths or object-store URLs (`gs://bucket/dir`).

Every stage reads and writes the work directory through these functions, so a TPU VM can
use a Cloud Storage bucket as `--workdir` (local disks of pod workers are not shared and
vanish with the VM). A path with a `scheme://` goes through `etils.epath`, the layer orbax
and tfds use; for `gs://` it needs `gcsfs` (`pip install -e ".[gcs]"`). Local paths keep
plain `os` calls, so nothing changes for them.

Object stores differ from file systems in two ways that matter here:
- An object appears whole when its upload finishes, so an upload is already atomic;
  `atomic_path` writes a local temporary file and uploads it in one piece.
- Objects cannot be appended to; `append_text` rewrites the object (metrics logs are small).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import tempfile
from typing import IO, Any, Iterator


def is_remote(path: str) -> bool:
  """True for URLs such as `gs://bucket/dir` (anything with a `scheme://` prefix)."""
  return "://" in str(path)


def _epath(path: str):
  try:
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(path)
  except ImportError as e:  # etils comes with orbax; gcsfs is the usual missing piece
    raise ImportError(f"{path}: remote paths need etils[epath] and gcsfs "
                      "(pip install -e '.[gcs]')") from e


def absolute(path: str) -> str:
  """`os.path.abspath` for local paths; URLs are returned unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents (no-op if present)."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries of a folder."""
  if is_remote(path):
    return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def names_in(path: str) -> set[str]:
  """The entry names of a folder, empty if it does not exist.

  Resumable stages test "is this image's file written?" against one listing: a stat per
  image costs a round trip each on a bucket.
  """
  return set(listdir(path)) if isdir(path) else set()


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    _epath(path).rmtree()
  else:
    shutil.rmtree(path)


def open_file(path: str, mode: str = "r") -> IO[Any]:
  """Opens a file for reading (`r`, `rb`) or whole writing (`w`, `wb`).

  Writers that must not leave half a file should use `atomic_path` instead.
  """
  if is_remote(path):
    return _epath(path).open(mode)
  return open(path, mode)  # pylint: disable=unspecified-encoding


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


# Random-name attempts before giving up (as `tempfile`, which also retries on collisions).
_TEMP_ATTEMPTS = 100


def _temp_name(directory: str, prefix: str, suffix: str) -> str:
  return os.path.join(directory, f"{prefix}{secrets.token_hex(4)}{suffix}")


def create_temp_file(directory: str, prefix: str = "", suffix: str = "") -> str:
  """Creates a new empty file with a unique name in `directory`; returns its path.

  Unlike `tempfile.mkstemp` (always 0600), the file gets the mode a plain `open(path, 'w')`
  gives, 0666 & ~umask: files renamed into place from it are readable by whoever the
  umask allows (shared work directories and caches on clusters).
  """
  for _ in range(_TEMP_ATTEMPTS):
    tmp = _temp_name(directory, prefix, suffix)
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      return tmp
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, f"no unused temporary name {prefix}*{suffix} in "
                        f"{directory}")


def create_temp_dir(parent: str, prefix: str = "") -> str:
  """Creates a new empty folder with a unique name in `parent`; returns its path.

  Mode 0777 & ~umask, as `os.mkdir` gives (`tempfile.mkdtemp` makes it 0700, and a
  folder renamed into place from it would stay private to its creator).
  """
  for _ in range(_TEMP_ATTEMPTS):
    tmp = _temp_name(parent, prefix, "")
    try:
      os.mkdir(tmp, 0o777)
      return tmp
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, f"no unused temporary name {prefix}* in {parent}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a local temporary file path; on success it becomes `path` in one piece.

  Locally the temporary file sits beside `path` and is renamed onto it; for a URL it is a
  local temporary file that is uploaded as one object. If the block raises, `path` keeps
  its previous content (or stays absent). A local file ends with the mode a plain `open`
  would give it (0666 & ~umask), not tempfile's 0600.
  """
  remote = is_remote(path)
  directory = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = create_temp_file(directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    yield tmp
    if remote:
      with open(tmp, "rb") as src, _epath(path).open("wb") as dst:
        shutil.copyfileobj(src, dst)
    else:
      os.replace(tmp, path)
  except OSError as e:
    if e.errno == errno.ENOSPC:  # the bare error names no file; say which and what is kept
      raise OSError(errno.ENOSPC, f"No space left on device while writing {path} (the "
                    "previous version, if any, is kept); free space and rerun") from e
    raise
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def append_text(path: str, text: str) -> None:
  """Appends `text` to a file (created if missing).

  Objects in a bucket cannot be appended to, so a URL's object is read and rewritten
  whole; use it for small logs only.
  """
  if not is_remote(path):
    with open(path, "a") as f:  # pylint: disable=unspecified-encoding
      f.write(text)
    return
  before = read_bytes(path).decode() if exists(path) else ""
  with atomic_path(path) as tmp, open(tmp, "w") as f:  # pylint: disable=unspecified-encoding
    f.write(before + text)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically (NaN/Inf become null: strict JSON)."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(_finite(obj), f, indent=2, sort_keys=True, default=_json_default,
              allow_nan=False)
    f.write("\n")


def read_json(path: str) -> Any:
  """Reads a JSON file, naming the file in the error if it is corrupt."""
  try:
    with open_file(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); delete it to recompute") from e


def _finite(obj: Any) -> Any:
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if hasattr(obj, "tolist"):  # numpy arrays and scalars
    return _finite(obj.tolist())
  return obj


def _json_default(obj: Any) -> Any:
  # numpy scalars and arrays appear in metrics; JSON wants plain Python values.
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if hasattr(obj, "item"):
    return obj.item()
  raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")
