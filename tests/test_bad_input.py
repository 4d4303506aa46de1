"""Bad input: a clear error naming the file and problem, or (skip mode) warnings + a count.

Every case is checked in both modes: 'error' raises BadInputError (a ValueError) and leaves
no prepared folder behind; 'skip' drops exactly the bad examples, logs them, and keeps the
good ones bit-exact.
"""
import importlib.util
import logging
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from wsss_jax.data import palette
from wsss_jax.data import builders
from wsss_jax.data import sources
from wsss_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = ("a1", "a2", "a3", "a4")
CLASSES = ("background", "cat", "dog", "cow")  # ids 0..3, 255 = ignore


def _data_config(**overrides):
  spec = importlib.util.spec_from_file_location(
      "_wsss_configs_common", os.path.join(REPO, "configs", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  cfg = common.data_config("voc", runlocal=True)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture
def tree(tmp_path):
  """A good 4-image VOC-layout folder; returns (root, cache, {id: (image, mask)})."""
  root = tmp_path / "data"
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (root / d).mkdir(parents=True)
  rng = np.random.default_rng(0)
  truth = {}
  for n, id_ in enumerate(IDS):
    img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = root / "JPEGImages" / f"{id_}.jpg"
    Image.fromarray(img).save(path, quality=95)
    mask = np.zeros((12, 16), np.uint8)
    mask[2:8, 3:9] = 1 + n % 3
    mask[0] = 255
    palette.save_palette_png(str(root / "SegmentationClass" / f"{id_}.png"), mask)
    truth[id_] = (np.asarray(Image.open(path).convert("RGB")), mask)
  (root / "ImageSets/Segmentation/train.txt").write_text("a1\na2\na3\n")
  (root / "ImageSets/Segmentation/val.txt").write_text("a4\n")
  (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
  return root, tmp_path / "cache", truth


def _cfg(root, cache, mode, **kw):
  return _data_config(root=str(root), cache_dir=str(cache), on_bad_input=mode, **kw)


def _assert_nothing_prepared(cache):
  """A failed build leaves neither a complete folder nor a temporary one."""
  voc = cache / "voc"
  assert not voc.exists() or os.listdir(voc) == [], os.listdir(voc)


def _assert_good_intact(cfg, truth, split, expected_ids):
  src = sources.get_source(cfg, split)
  got = [src[i] for i in range(len(src))]
  assert [r["id"] for r in got] == list(expected_ids)
  for r in got:
    np.testing.assert_array_equal(r["image"], truth[r["id"]][0])
    np.testing.assert_array_equal(r["mask"], truth[r["id"]][1])


def _garbage(path):
  path.write_bytes(b"this is not an image file at all" * 3)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _write_mask(path, mask):
  palette.save_palette_png(str(path), mask)


# (name, mutate(root), phrase expected in the message, file named in the message)
CASES = [
    ("missing_image", lambda r: (r / "JPEGImages/a2.jpg").unlink(),
     "image missing for id 'a2'", "JPEGImages/a2.jpg"),
    ("missing_mask", lambda r: (r / "SegmentationClass/a2.png").unlink(),
     "mask missing for id 'a2'", "SegmentationClass/a2.png"),
    ("mask_size", lambda r: _write_mask(r / "SegmentationClass/a2.png",
                                        np.zeros((12, 15), np.uint8)),
     "mask is 12x15 (HxW) but its image", "SegmentationClass/a2.png"),
    ("label_out_of_range", lambda r: _write_mask(r / "SegmentationClass/a2.png",
                                                 np.full((12, 16), 7, np.uint8)),
     "class ids [7] are >= num_classes=4", "SegmentationClass/a2.png"),
    ("corrupt_image", lambda r: _garbage(r / "JPEGImages/a2.jpg"),
     "cannot read image", "JPEGImages/a2.jpg"),
    ("truncated_image", lambda r: _truncate(r / "JPEGImages/a2.jpg"),
     "cannot read image", "JPEGImages/a2.jpg"),
    ("corrupt_mask", lambda r: _garbage(r / "SegmentationClass/a2.png"),
     "cannot read mask", "SegmentationClass/a2.png"),
    ("duplicate_id", lambda r: (r / "ImageSets/Segmentation/train.txt").write_text(
        "a1\na2\na3\na2\n"), "id 'a2' is listed again", "ImageSets/Segmentation/train.txt:4"),
    # One bad line costs that line (its id), not the whole split file.
    ("non_utf8_split_line", lambda r: (r / "ImageSets/Segmentation/train.txt").write_bytes(
        b"a1\n\xff\xfea2\na3\n"), "line is not valid UTF-8",
     "ImageSets/Segmentation/train.txt:2"),
]


@pytest.mark.parametrize("name,mutate,phrase,file", CASES, ids=[c[0] for c in CASES])
def test_error_mode(tree, name, mutate, phrase, file):
  root, cache, _ = tree
  mutate(root)
  with pytest.raises(sources.BadInputError) as e:
    sources.prepare(_cfg(root, cache, "error"))
  msg = str(e.value)
  assert phrase in msg and os.path.join(str(root), file) in msg, msg
  assert msg.endswith("rerun with --config.data.on_bad_input=skip"), msg
  assert isinstance(e.value, ValueError)
  _assert_nothing_prepared(cache)


@pytest.mark.parametrize("name,mutate,phrase,file", CASES, ids=[c[0] for c in CASES])
def test_skip_mode(tree, caplog, name, mutate, phrase, file):
  root, cache, truth = tree
  mutate(root)
  cfg = _cfg(root, cache, "skip")
  with caplog.at_level(logging.WARNING):
    meta = sources.prepare(cfg)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any(phrase in w and file in w for w in warnings), warnings
  assert any("skipped 1 bad inputs" in w for w in warnings), warnings
  expected_train = ("a1", "a3") if name != "duplicate_id" else ("a1", "a2", "a3")
  assert meta.splits == {"train": len(expected_train), "val": 1}
  _assert_good_intact(cfg, truth, "train", expected_train)
  _assert_good_intact(cfg, truth, "val", ("a4",))
  st = sources.split_statistics(cfg, "train")
  assert st["skipped"] == 1 and st["images"] == len(expected_train)
  assert len(builders.read_meta(meta.path)["skipped"]) == 1
  # The same prepared folder is an error under on_bad_input='error' (never silently used).
  with pytest.raises(sources.BadInputError, match="skipped 1 bad inputs"):
    sources.prepare(_cfg(root, cache, "error"))


def test_bad_file_on_the_command_line_is_one_line(tree, tmp_path):
  """`wsss` in error mode: one line naming the file and the problem and pointing at
  on_bad_input=skip; no traceback through tfds' builder."""
  root, cache, _ = tree
  _truncate(root / "JPEGImages" / "a2.jpg")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "wsss_jax.main",
       f"--config={os.path.join(REPO, 'configs', 'voc', 'cam.py')}:runlocal",
       f"--config.data.root={root}", f"--config.data.cache_dir={cache}",
       "--config.stages=data", f"--workdir={tmp_path / 'work'}"],
      capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert fatal == [f"FATAL: {root / 'JPEGImages' / 'a2.jpg'}: cannot read image "
                   "(OSError: Truncated File Read); to skip bad inputs like this one and "
                   "count them, rerun with --config.data.on_bad_input=skip"], proc.stderr
  _assert_nothing_prepared(cache)


def test_split_ids_may_contain_spaces(tree):
  """An id is the whole line (a space does not cut it), also in the DeepLab list format;
  a missing one is named in full."""
  root, cache, truth = tree
  for folder, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
    (root / folder / f"a1.{ext}").rename(root / folder / f"a 1.{ext}")
  split = root / "ImageSets/Segmentation/train.txt"
  split.write_text("a 1\n/JPEGImages/a2.jpg /SegmentationClass/a2.png\n"
                   "/JPEGImages/a 1.jpg /SegmentationClass/a 1.png\n")
  cfg = _cfg(root, cache, "skip")
  truth["a 1"] = truth["a1"]
  meta = sources.prepare(cfg)
  assert builders.read_meta(meta.path)["skipped"] == [
      f"{split}:3: id 'a 1' is listed again (first at line 1)"]
  _assert_good_intact(cfg, truth, "train", ("a 1", "a2"))
  split.write_text("a 1\nb 2\n")
  with pytest.raises(sources.BadInputError,
                     match=r"JPEGImages/b 2\.jpg: image missing for id 'b 2'"):
    sources.prepare(_cfg(root, cache, "error"))


def test_ignore_value_and_good_tree_pass(tree):
  root, cache, truth = tree
  cfg = _cfg(root, cache, "error")
  meta = sources.prepare(cfg)
  assert meta.class_names == CLASSES and meta.splits == {"train": 3, "val": 1}
  _assert_good_intact(cfg, truth, "train", ("a1", "a2", "a3"))


def test_missing_split_file(tree):
  root, cache, _ = tree
  (root / "ImageSets/Segmentation/val.txt").unlink()
  for mode in ("error", "skip"):
    with pytest.raises(ValueError, match=r"data.val_split='val': no such split \(missing split "
                       r"file .*/ImageSets/Segmentation/val.txt\); available: \['train'\]"):
      sources.prepare(_cfg(root, cache, mode))
  cfg = _cfg(root, cache, "error", val_split="train", sweep_split="train")
  assert sources.prepare(cfg).splits == {"train": 3}
  with pytest.raises(ValueError, match=r"Unknown split 'val'.*available splits: \['train'\]"):
    sources.get_source(cfg, "val")


def test_empty_split(tree, caplog):
  root, cache, truth = tree
  (root / "ImageSets/Segmentation/val.txt").write_text("\n\n")
  cfg = _cfg(root, cache, "error", val_split="train")
  with pytest.raises(sources.BadInputError, match=r"val.txt: split file lists no ids"):
    sources.prepare(cfg)
  _assert_nothing_prepared(cache)
  cfg.on_bad_input = "skip"
  with caplog.at_level(logging.WARNING):
    meta = sources.prepare(cfg)
  assert meta.splits == {"train": 3}
  assert any("lists no ids" in r.getMessage() for r in caplog.records)
  _assert_good_intact(cfg, truth, "train", ("a1", "a2", "a3"))


def test_split_with_only_bad_examples_and_all_bad(tree):
  root, cache, truth = tree
  _garbage(root / "JPEGImages/a4.jpg")  # val's only image
  cfg = _cfg(root, cache, "skip", val_split="train")
  meta = sources.prepare(cfg)
  assert meta.splits == {"train": 3}  # val dropped, logged, recorded
  assert any("split 'val' dropped" in m for m in builders.read_meta(meta.path)["skipped"])
  _assert_good_intact(cfg, truth, "train", ("a1", "a2", "a3"))
  for id_ in IDS:
    _garbage(root / "JPEGImages" / f"{id_}.jpg")
  with pytest.raises(sources.BadInputError, match="no usable examples|every split is empty"):
    sources.prepare(cfg)


def test_bad_layouts(tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(sources.BadInputError, match="data.root is empty"):
    sources.prepare(_data_config(root="", cache_dir=str(cache)))
  with pytest.raises(sources.BadInputError, match="is not a directory"):
    sources.prepare(_data_config(root=str(tmp_path / "nope"), cache_dir=str(cache)))
  root = tmp_path / "r"
  root.mkdir()
  with pytest.raises(sources.BadInputError, match="JPEGImages: missing"):
    sources.prepare(_data_config(root=str(root), cache_dir=str(cache)))
  (root / "JPEGImages").mkdir()
  with pytest.raises(sources.BadInputError, match="no mask folder"):
    sources.prepare(_data_config(root=str(root), cache_dir=str(cache)))
  (root / "SegmentationClassAug").mkdir()
  with pytest.raises(sources.BadInputError, match="ImageSets/Segmentation: missing"):
    sources.prepare(_data_config(root=str(root), cache_dir=str(cache)))
  (root / "ImageSets/Segmentation").mkdir(parents=True)
  with pytest.raises(sources.BadInputError, match="no split files"):
    sources.prepare(_data_config(root=str(root), cache_dir=str(cache)))
  (root / "classes.txt").write_text("background\n")
  (root / "ImageSets/Segmentation/train.txt").write_text("x\n")
  with pytest.raises(sources.BadInputError, match="classes.txt: need 2..255 class names"):
    sources.prepare(_data_config(root=str(root), cache_dir=str(cache)))


def test_bad_config_values(tree):
  root, cache, _ = tree
  # A VOC-layout folder is not a COCO root: the error names what is missing.
  with pytest.raises(sources.BadInputError, match="annotations: missing"):
    sources.prepare(_data_config(name="coco", root=str(root), cache_dir=str(cache)))
  with pytest.raises(ValueError, match="instances_<split>.json"):
    sources.get_source(_data_config(name="coco", root=str(root), cache_dir=str(cache)), "train")
  with pytest.raises(ValueError, match=r"Unknown data.name='imagenet'"):
    sources.prepare(_data_config(name="imagenet", cache_dir=str(cache)))
  with pytest.raises(ValueError, match="on_bad_input must be 'error' or 'skip'"):
    sources.prepare(_cfg(root, cache, "ignore"))
