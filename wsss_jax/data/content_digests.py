"""Content digests of a dataset folder's files, memoised by each file's (size, mtime).

A prepared dataset's key (and so the `data` stage's fingerprint and every cached baseline
trained on it) must name the files' bytes, not their timestamps: a copy of the same folder
(`cp -r`, a fresh sync of a data bucket) has new mtimes and the same content, and must
reuse what was built from it. Hashing every file on every scan would cost seconds on VOC +
SBD (~2.5 GB), so a memo keeps each file's digest with the (size, mtime_ns) it was
computed at and a scan rehashes only the files whose stat changed (rsync's quick check:
a file rewritten with the same size and mtime keeps its old digest).

The memo is one JSON file per folder, under the data cache; a memo that cannot be read
is recomputed, one that cannot be written only costs the next scan the hashing.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

from absl import logging

from wsss_jax import fs

MEMO_VERSION = 1
_CHUNK = 1 << 20


def file_digest(path: str) -> str:
  """BLAKE2b-128 hex digest of a file's bytes."""
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def memo_path(memo_dir: str, folder: str) -> str:
  """The memo file of `folder` (an absolute path) under `memo_dir`."""
  return os.path.join(memo_dir, hashlib.sha256(folder.encode()).hexdigest()[:16] + ".json")


def _read_memo(path: str, folder: str) -> dict[str, list]:
  try:
    memo = fs.read_json(path) if fs.exists(path) else {}
  except (OSError, ValueError) as e:
    logging.warning("Ignoring the digest memo %s (%s); rehashing %s", path, e, folder)
    return {}
  if memo.get("version") != MEMO_VERSION or memo.get("folder") != folder:
    return {}
  return memo.get("files", {})


def digests(folder: str, stats: Sequence[tuple[str, int, int]],
            memo_dir: str | None) -> list[tuple[str, int, str]]:
  """(name, size, content digest) of each listed file of `folder`, in the order given.

  Args:
    folder: absolute path of the folder the names are in.
    stats: (name, size, mtime_ns) of its files (`voc_builder._listing`).
    memo_dir: where the memo lives (None: hash every file, keep nothing).
  """
  path = memo_path(memo_dir, folder) if memo_dir else None
  known = _read_memo(path, folder) if path else {}
  memoised = {name: e[2] for name, e in known.items() if len(e) == 3}
  todo = [name for name, size, mtime in stats
          if known.get(name, [None, None])[:2] != [size, mtime] or name not in memoised]
  if len(todo) > 100:
    logging.info("Hashing %d files of %s (memoised in %s)", len(todo), folder, path)
  fresh = {name: file_digest(os.path.join(folder, name)) for name in todo}
  files, out = {}, []
  for name, size, mtime in stats:
    digest = fresh.get(name) or memoised[name]
    files[name] = [size, mtime, digest]
    out.append((name, size, digest))
  if path and (todo or len(files) != len(known)):
    try:
      fs.makedirs(memo_dir)
      fs.write_json(path, {"version": MEMO_VERSION, "folder": folder, "files": files})
    except OSError as e:
      logging.warning("Cannot write the digest memo %s (%s); the next scan rehashes %s",
                      path, e, folder)
  return out
