"""A cache of finished CAM baselines, shared by every work directory on the machine.

The evaluation protocol (README, "Comparing methods") warm-starts every method and the
control from one trained baseline per seed, so a matrix of methods x seeds trains one
baseline per seed, not one per cell. The `baseline` stage looks here first and stores what
it trained.

An entry is keyed by everything that decides the baseline's weights: the baseline stage's
fingerprint (`stages.registry`: seed, dataset content, model, optimizer, steps,
augmentation, CAM loss options), the pretrained weights file's sha256 and
`CACHE_VERSION` (bumped when the training code changes what a config produces). A
changed key is a different entry, never a stale hit. (The reported mAP is recomputed when
the work directory scores another split, `training.classification_scores`.)

Layout: `<root>/<key>/` with `final_variables.msgpack`, `classification.json` and
`entry.json` (the settings that made the key; written last, so an entry without it is
partial and never used). Entries are written to a temporary folder and renamed into place,
so two runs storing the same key at once leave one complete entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any


from wsss_jax import fs

CACHE_VERSION = 1
ENTRY_FILE = "entry.json"
FILES = ("final_variables.msgpack", "classification.json")


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with fs.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def cache_key(fingerprint: str, weights_sha256: str) -> str:
  """Hex key of an entry: the baseline stage's fingerprint (`registry.fingerprint`), the
  pretrained weights file's sha256 and `CACHE_VERSION`."""
  blob = json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint,
                     "weights": weights_sha256}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry_dir(root: str, key: str) -> str:
  return os.path.join(root, key)


def lookup(root: str, key: str) -> str | None:
  """The complete entry's folder for `key`, or None (missing or partial)."""
  folder = entry_dir(root, key)
  if not os.path.exists(os.path.join(folder, ENTRY_FILE)):
    return None
  if not all(os.path.exists(os.path.join(folder, f)) for f in FILES):
    return None  # damaged by hand: treat as missing
  return folder


def restore(folder: str, stage_dir: str) -> None:
  """Copies an entry's files into a work directory's baseline folder (atomically)."""
  fs.makedirs(stage_dir)
  for name in FILES:
    with fs.atomic_path(os.path.join(stage_dir, name)) as tmp:
      shutil.copyfile(os.path.join(folder, name), tmp)


def store(root: str, key: str, stage_dir: str, entry: dict[str, Any]) -> str:
  """Copies a finished baseline folder's files into the cache under `key`.

  Returns the entry's folder. Another process storing the same key first wins; this
  copy is then dropped (both trained the same thing).
  """
  folder = entry_dir(root, key)
  if lookup(root, key):
    return folder
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
  try:
    for name in FILES:
      with fs.open_file(os.path.join(stage_dir, name), "rb") as src, \
          open(os.path.join(tmp, name), "wb") as dst:
        shutil.copyfileobj(src, dst)
    with open(os.path.join(tmp, ENTRY_FILE), "w") as f:
      json.dump(entry, f, indent=2, sort_keys=True)
    if os.path.exists(folder) and not lookup(root, key):
      shutil.rmtree(folder, ignore_errors=True)  # a partial entry of a killed run
    try:
      os.rename(tmp, folder)
    except OSError:  # another process completed the entry in the meantime
      if not lookup(root, key):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder
