"""Bad data on real MSRC files: handled correctly or a clear error naming the file (#12).

`test_bad_input.py` covers each bad-input rule on generated images. Here real MSRC photos
and masks are damaged: named faults with a fixed expected outcome, then random ones
(truncation anywhere, byte flips, bytes inserted: `WSSS_FUZZ_CASES`, default 6) where the
invariant is: either the build succeeds and every record is exactly what PIL decodes from
the damaged file, or it fails with `BadInputError` naming that file; with
`on_bad_input=skip` the other examples survive bit-exact and the skips are counted in the
`data` stage's printed statistics.
"""
from __future__ import annotations

import os
import random
import shutil
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from test_bad_input import _data_config
from wsss_jax.data import pipeline
from wsss_jax.data import sources
from wsss_jax.stages import data as data_stage

NUM_FUZZ = int(os.environ.get("WSSS_FUZZ_CASES", "6"))
TRAIN = 4  # the first TRAIN ids are train, the rest val


@pytest.fixture(scope="module")
def msrc_ids(msrc_root):
  with open(os.path.join(msrc_root, "ImageSets", "Segmentation", "train.txt")) as f:
    return [line.strip() for line in f if line.strip()][:TRAIN + 2]


@pytest.fixture
def tree(tmp_path, msrc_root, msrc_ids):
  """A VOC-layout copy of six real MSRC examples (4 train, 2 val)."""
  root = tmp_path / "msrc"
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (root / sub).mkdir(parents=True)
  for i in msrc_ids:
    shutil.copy(os.path.join(msrc_root, "JPEGImages", f"{i}.jpg"), root / "JPEGImages")
    shutil.copy(os.path.join(msrc_root, "SegmentationClass", f"{i}.png"),
                root / "SegmentationClass")
  shutil.copy(os.path.join(msrc_root, "classes.txt"), root / "classes.txt")
  (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(msrc_ids[:TRAIN]) + "\n")
  (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(msrc_ids[TRAIN:]) + "\n")
  return root


def _cfg(root, tmp_path, mode):
  return _data_config(root=str(root), cache_dir=str(tmp_path / f"cache-{mode}"),
                      on_bad_input=mode)


def _image(root, i):
  return root / "JPEGImages" / f"{i}.jpg"


def _mask(root, i):
  return root / "SegmentationClass" / f"{i}.png"


def _expected(root, i):
  """What a correct build holds for id i: PIL's RGB decode and the palette indices."""
  with Image.open(_image(root, i)) as im:
    image = np.asarray(im.convert("RGB"))
  with Image.open(_mask(root, i)) as m:
    mask = np.asarray(m, np.uint8)
  return image, mask


def _records(cfg, split):
  src = sources.get_source(cfg, split)
  return {r["id"]: r for r in (src[k] for k in range(len(src)))}


def _assert_built_exactly(cfg, root, ids):
  got = {**_records(cfg, "train"), **_records(cfg, "val")}
  assert sorted(got) == sorted(ids)
  for i in ids:
    image, mask = _expected(root, i)
    np.testing.assert_array_equal(got[i]["image"], image, err_msg=i)
    np.testing.assert_array_equal(got[i]["mask"], mask, err_msg=i)
    fg = set(np.unique(mask)) - {0, 255}
    assert set(np.flatnonzero(got[i]["labels"]) + 1) == fg, i


def _huge_png_header(path):
  """A valid 1x1 PNG whose header claims 30000x30000 (a decompression bomb)."""
  Image.new("L", (1, 1)).save(path, format="PNG")
  data = bytearray(path.read_bytes())
  ihdr = data.index(b"IHDR")
  data[ihdr + 4:ihdr + 12] = struct.pack(">II", 30000, 30000)
  crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
  data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
  path.write_bytes(bytes(data))


def _resize_pair(root, i, size):
  with Image.open(_image(root, i)) as im:
    im.convert("RGB").resize(size).save(_image(root, i), quality=95)
  with Image.open(_mask(root, i)) as m:
    m.resize(size, Image.NEAREST).save(_mask(root, i))


def _set_mask(root, i, fn):
  with Image.open(_mask(root, i)) as m:
    pal = m.getpalette()
    arr = fn(np.asarray(m, np.uint8).copy())
  out = Image.fromarray(arr, "P")
  out.putpalette(pal)
  out.save(_mask(root, i))


# name -> (damage(root, id), None if the example must build, else a phrase of the error)
NAMED = {
    "grayscale_jpeg": (lambda r, i: Image.open(_image(r, i)).convert("L").save(_image(r, i)),
                       None),
    "rgba_png_named_jpg": (lambda r, i: Image.open(_image(r, i)).convert("RGBA").save(
        _image(r, i), format="PNG"), None),
    "cmyk_jpeg": (lambda r, i: Image.open(_image(r, i)).convert("CMYK").save(_image(r, i)),
                  None),
    "no_labels": (lambda r, i: _set_mask(r, i, lambda a: np.where(a == 255, 255, 0)
                                          .astype(np.uint8)), None),
    "tiny_2x3": (lambda r, i: _resize_pair(r, i, (3, 2)), None),
    "large_2400x1600": (lambda r, i: _resize_pair(r, i, (2400, 1600)), None),
    "truncated_jpeg": (lambda r, i: _image(r, i).write_bytes(
        _image(r, i).read_bytes()[:2000]), "cannot read image"),
    "empty_jpeg": (lambda r, i: _image(r, i).write_bytes(b""), "cannot read image"),
    "truncated_png": (lambda r, i: _mask(r, i).write_bytes(_mask(r, i).read_bytes()[:300]),
                      "cannot read mask"),
    "decompression_bomb": (lambda r, i: _huge_png_header(_image(r, i)), "cannot read image"),
    "mask_size_mismatch": (lambda r, i: _set_mask(r, i, lambda a: a[:-1]),
                           "but its image"),
    "mask_class_out_of_range": (lambda r, i: _set_mask(r, i, lambda a: np.where(
        a == 0, 77, a).astype(np.uint8)), "are >= num_classes"),
    "id_without_files": (lambda r, i: (_image(r, i).unlink(), _mask(r, i).unlink()),
                         "image missing"),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_fault(tree, tmp_path, msrc_ids, name, capsys):
  damage, phrase = NAMED[name]
  victim = msrc_ids[1]
  damage(tree, victim)
  if phrase is None:
    for mode in ("error", "skip"):
      sources.prepare(_cfg(tree, tmp_path, mode))
      _assert_built_exactly(_cfg(tree, tmp_path, mode), tree, msrc_ids)
    return
  with pytest.raises(sources.BadInputError) as e:
    sources.prepare(_cfg(tree, tmp_path, "error"))
  assert phrase in str(e.value) and victim in str(e.value), str(e.value)
  assert str(tree) in str(e.value)  # the full path of the file
  cfg = _cfg(tree, tmp_path, "skip")
  data_stage.run(_config_with_data(cfg), str(tmp_path / "work"))
  assert "[train] images=3  skipped=1" in capsys.readouterr().out
  _assert_built_exactly(cfg, tree, [i for i in msrc_ids if i != victim])


def _config_with_data(data_cfg):
  from tiny_model import tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config()
  c.data = data_cfg
  return c


def _fuzz(path, rng):
  data = bytearray(path.read_bytes())
  kind = rng.choice(["truncate", "flip", "insert", "zero_block"])
  if kind == "truncate":
    data = data[:rng.randrange(len(data))]
  elif kind == "flip":
    for _ in range(rng.randint(1, 8)):
      data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
  elif kind == "insert":
    at = rng.randrange(len(data))
    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
  else:
    at = rng.randrange(len(data))
    data[at:at + rng.randint(1, 256)] = b"\0" * min(256, len(data) - at)
  path.write_bytes(bytes(data))
  return kind


@pytest.mark.parametrize("seed", range(NUM_FUZZ))
def test_random_corruption(tree, tmp_path, msrc_ids, seed):
  rng = random.Random(seed)
  victim = rng.choice(msrc_ids)
  path = rng.choice([_image(tree, victim), _mask(tree, victim)])
  kind = _fuzz(path, rng)
  try:
    sources.prepare(_cfg(tree, tmp_path, "error"))
  except sources.BadInputError as e:
    print(f"fuzz {seed}: {kind} {path.suffix} -> error naming the file")  # for the report
    assert str(path) in str(e), (kind, str(e))
    cfg = _cfg(tree, tmp_path, "skip")
    sources.prepare(cfg)
    _assert_built_exactly(cfg, tree, [i for i in msrc_ids if i != victim])
  else:  # the damage left a decodable file: the records are what PIL decodes from it
    print(f"fuzz {seed}: {kind} {path.suffix} -> decodes, built as PIL reads it")
    _assert_built_exactly(_cfg(tree, tmp_path, "error"), tree, msrc_ids)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 300), (600, 40)])
def test_extreme_sizes_flow_through_the_pipelines(shape):
  """Tiny and elongated images make fixed-shape train and eval batches."""
  cfg = _data_config(crop_size=32, batch_size=2, eval_batch_size=2)
  rng = np.random.default_rng(0)
  records = [{"id": f"r{k}", "image": rng.integers(0, 256, shape + (3,), np.uint8),
              "mask": np.full(shape, k % 3, np.uint8),
              "labels": np.eye(4, dtype=np.uint8)[k % 4]} for k in range(2)]
  batch = next(iter(pipeline.train_dataset(records, cfg, seed=0, process_count=1,
                                           process_index=0)))
  assert batch["image"].shape == (2, 32, 32, 3) and np.isfinite(batch["image"]).all()
  pad = pipeline.eval_pad_size(records, cfg)
  batch = next(iter(pipeline.eval_dataset(records, cfg, pad_size=pad, process_count=1,
                                          process_index=0)))
  assert batch["image"].shape[1:3] == (pad, pad) and pad % 32 == 0
  assert batch["valid"][0].sum() == shape[0] * shape[1]
