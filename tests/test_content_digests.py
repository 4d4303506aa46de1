"""data/content_digests.py: content digests of dataset files, memoised by (size, mtime)."""
import hashlib
import os

import pytest

from wsss_jax.data import builders
from wsss_jax.data import content_digests
from wsss_jax.data import voc_builder


def _stats(folder):
  return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder))


def _blake(data: bytes) -> str:
  return hashlib.blake2b(data, digest_size=16).hexdigest()


def test_digests_name_the_bytes_and_the_memo_skips_unchanged_files(tmp_path):
  folder, memo = str(tmp_path / "images"), str(tmp_path / "cache" / ".digests")
  os.makedirs(folder)
  for name, data in (("a.jpg", b"alpha"), ("b.jpg", b"bravo!")):
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  want = [("a.jpg", 5, _blake(b"alpha")), ("b.jpg", 6, _blake(b"bravo!"))]
  assert content_digests.digests(folder, _stats(folder), None) == want
  assert not os.path.exists(memo)
  assert content_digests.digests(folder, _stats(folder), memo) == want
  assert os.path.isfile(content_digests.memo_path(memo, folder))

  # Same size and mtime: the memoised digest is reused (the file is not read again).
  a = os.path.join(folder, "a.jpg")
  st = os.stat(a)
  with open(a, "wb") as f:
    f.write(b"ALPHA")
  os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert content_digests.digests(folder, _stats(folder), memo)[0][2] == _blake(b"alpha")
  # A new mtime makes it rehash; new mtimes with the same bytes keep the digest.
  os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  os.utime(os.path.join(folder, "b.jpg"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert content_digests.digests(folder, _stats(folder), memo) == [
      ("a.jpg", 5, _blake(b"ALPHA")), ("b.jpg", 6, _blake(b"bravo!"))]


def test_a_corrupt_memo_is_recomputed(tmp_path):
  folder, memo = str(tmp_path / "masks"), str(tmp_path / ".digests")
  os.makedirs(folder)
  with open(os.path.join(folder, "m.png"), "wb") as f:
    f.write(b"mask")
  content_digests.digests(folder, _stats(folder), memo)
  with open(content_digests.memo_path(memo, folder), "w") as f:
    f.write("{not json")
  assert content_digests.digests(folder, _stats(folder), memo) == [("m.png", 4, _blake(b"mask"))]
  assert content_digests.digests(folder, _stats(folder), memo) == [("m.png", 4, _blake(b"mask"))]


def test_an_unreadable_file_is_a_bad_input_naming_it(tmp_path, monkeypatch):
  root = tmp_path / "voc"
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(root / d)
  (root / "JPEGImages" / "a.jpg").write_bytes(b"jpeg")
  (root / "SegmentationClass" / "a.png").write_bytes(b"png")
  (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
  bad = str(root / "JPEGImages" / "a.jpg")

  def refuse(path):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(content_digests, "file_digest", refuse)
  with pytest.raises(builders.BadInputError, match=f"{bad}: cannot read \\(Permission denied\\)"):
    voc_builder.scan(str(root))
