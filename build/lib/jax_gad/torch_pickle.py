"""Reads PyTorch ``.pth`` state dicts into numpy arrays, without importing torch.

Both serialisations of ``torch.save`` are understood: the legacy one (a
sequence of pickles followed by raw storages; PyTorch < 1.6 and
``_use_new_zipfile_serialization=False``) and the zip archive. Unpickling goes
through an allowlist that knows only the handful of globals a state dict needs
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, the typed
storage classes...), each replaced by a local stand-in; every other global is
refused with :class:`UnsafeCheckpointError` before anything is called, so a
checkpoint cannot run code. Storages are bounds-checked against the tensors
that view them, and zip members are size-checked before they are inflated.

:func:`read_torch_checkpoint` is the entry point (re-exported as
``jax_gad.convert.read_torch_checkpoint``).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
from typing import Any, Mapping, NamedTuple
import zipfile
import zlib

import numpy as np

__all__ = ["UnsafeCheckpointError", "read_torch_checkpoint"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(ValueError):
  """A checkpoint's pickle references a global outside the state-dict allowlist."""


try:  # ml_dtypes ships with jax; bfloat16 storages need it.
  import ml_dtypes as _ml_dtypes

  BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - jax always installs it
  BFLOAT16 = None


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co.: only carries the dtype."""

  name: str
  dtype: np.dtype | None


_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": BFLOAT16,
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
}


class _Storage:
  """A storage named in the pickle; its bytes are attached after unpickling."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.array: np.ndarray | None = None


class _TensorRef(NamedTuple):
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor(storage, storage_offset, size, stride):
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
  if not (
    _is_int(storage_offset)
    and isinstance(size, tuple)
    and isinstance(stride, tuple)
    and len(size) == len(stride)
    and all(map(_is_int, size + stride))
  ):
    raise pickle.UnpicklingError(
      f"malformed tensor layout: offset={storage_offset!r} size={size!r} stride={stride!r}"
    )
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad  # irrelevant for arrays
  if backward_hooks:
    raise pickle.UnpicklingError("tensor carries backward hooks; not a plain state dict")
  if metadata:
    raise pickle.UnpicklingError(
      f"tensor carries metadata {metadata!r} (conj/neg views are not supported)"
    )
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad
  if not isinstance(data, _TensorRef):
    raise pickle.UnpicklingError("Parameter rebuilt from something that is not a tensor")
  if backward_hooks or state:
    raise pickle.UnpicklingError("Parameter carries hooks or state; not a plain state dict")
  return data


# module -> name -> local stand-in. Nothing else may be named by a checkpoint.
_ALLOWED_GLOBALS: Mapping[str, Mapping[str, Any]] = {
  "collections": {"OrderedDict": collections.OrderedDict},
  "torch._utils": {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
  },
  "torch": {name: _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allowlisted globals, to local stand-ins."""

  def __init__(self, file, path: str, storages: dict[str, _Storage] | None = None):
    super().__init__(file, encoding="utf-8")
    self._path = path
    self._storages = storages

  def find_class(self, module, name):
    target = _ALLOWED_GLOBALS.get(module, {}).get(name)
    if target is None:
      raise UnsafeCheckpointError(
        f"{self._path}: refusing to load: the pickle references the global "
        f"'{module}.{name}', which a state dict never needs (allowed: "
        f"{', '.join(f'{m}.{n}' for m, ns in _ALLOWED_GLOBALS.items() for n in ns)})"
      )
    if isinstance(target, _StorageType) and target.dtype is None:
      raise ValueError(f"{self._path}: {module}.{name} needs the ml_dtypes package")
    return target

  def persistent_load(self, pid):
    if self._storages is None:
      raise pickle.UnpicklingError("unexpected persistent id in a header record")
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"malformed persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module":
      raise UnsafeCheckpointError(
        f"{self._path}: the file pickles a whole torch.nn.Module, not a state dict; "
        "save model.state_dict() instead"
      )
    if kind != "storage" or len(pid) not in (5, 6):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
    if not isinstance(key, str) or not _is_int(numel) or numel < 0:
      raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
    if view is not None:
      raise pickle.UnpicklingError("storage views (pre-1.0 PyTorch files) are not supported")
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = _Storage(key, storage_type.dtype, numel)
    elif storage.dtype != storage_type.dtype or storage.numel != numel:
      raise pickle.UnpicklingError(f"storage {key!r} declared twice with different types")
    return storage


def _unpickle(data, path: str, storages=None):
  """Unpickles one record from a file object or bytes through the allowlist."""
  file = io.BytesIO(data) if isinstance(data, bytes) else data
  return _RestrictedUnpickler(file, path, storages).load()


def _materialise(ref: _TensorRef, key: str, path: str) -> np.ndarray:
  storage = ref.storage
  if storage.array is None:
    raise ValueError(f"{path}: storage {storage.key!r} of tensor {key!r} has no data")
  if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
    raise ValueError(f"{path}: tensor {key!r} has a negative size, stride or offset")
  if 0 in ref.size:
    return np.zeros(ref.size, storage.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if last >= storage.numel:
    raise ValueError(
      f"{path}: tensor {key!r} (size {ref.size}, stride {ref.stride}, offset "
      f"{ref.offset}) reaches element {last} of a storage of {storage.numel}"
    )
  base = storage.array[ref.offset :]
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    base, shape=ref.size, strides=[s * item for s in ref.stride], writeable=False
  )
  # copy out, converting from the file's byte order to the native one
  return np.array(view, dtype=storage.dtype, copy=True, order="C")


def _collect(obj, storages, path: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict):
    raise ValueError(
      f"{path}: expected a state dict (a dict of tensors), found {type(obj).__name__}"
    )
  out = {}
  for key, value in obj.items():
    if not isinstance(key, str):
      raise ValueError(f"{path}: state dict key {key!r} is not a string")
    if not isinstance(value, _TensorRef):
      hint = (
        " (a training checkpoint? pass its 'state_dict'/'model' entry, saved on its own)"
        if isinstance(value, dict)
        else ""
      )
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor{hint}")
    out[key] = _materialise(value, key, path)
  return out


def _read_legacy(f, path: str):
  try:
    magic = _unpickle(f, path)
  except UnsafeCheckpointError:
    raise
  except Exception as e:
    raise ValueError(
      f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy "
      f"torch.save pickle): {type(e).__name__}: {e}"
    ) from None
  if magic != _LEGACY_MAGIC:
    raise ValueError(
      f"{path}: not a PyTorch checkpoint (the first pickle is not torch's legacy magic number)"
    )
  try:
    protocol = _unpickle(f, path)
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = _unpickle(f, path)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    obj = _unpickle(f, path, storages)
    keys = _unpickle(f, path)
  except UnsafeCheckpointError:
    raise
  except Exception as e:
    raise ValueError(
      f"{path}: truncated or corrupt legacy PyTorch checkpoint: {type(e).__name__}: {e}"
    ) from None
  if not isinstance(keys, list) or set(keys) != set(storages):
    raise ValueError(
      f"{path}: corrupt legacy checkpoint: storage key list does not "
      "match the storages the pickle uses"
    )
  order = "<" if little else ">"
  for key in keys:
    storage = storages[key]
    header = f.read(8)
    if len(header) != 8:
      raise ValueError(f"{path}: truncated: storage {key!r} is missing")
    (numel,) = struct.unpack(order + "q", header)
    if numel != storage.numel:
      raise ValueError(
        f"{path}: corrupt: storage {key!r} holds {numel} elements, the pickle says {storage.numel}"
      )
    nbytes = numel * storage.dtype.itemsize
    data = f.read(nbytes)
    if len(data) != nbytes:
      raise ValueError(
        f"{path}: truncated: storage {key!r} needs {nbytes} bytes, only {len(data)} remain"
      )
    storage.array = np.frombuffer(data, storage.dtype.newbyteorder(order), numel)
  return obj, storages


def _read_zip(zf: zipfile.ZipFile, path: str):
  pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
  if len(pickles) != 1:
    raise ValueError(
      f"{path}: zip archive without exactly one data.pkl: not a torch.save checkpoint"
    )
  prefix = pickles[0][: -len("data.pkl")]
  names = set(zf.namelist())
  order = "<"
  if prefix + "byteorder" in names:
    byteorder = zf.read(prefix + "byteorder")
    if byteorder not in (b"little", b"big"):
      raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
    order = "<" if byteorder == b"little" else ">"
  storages: dict[str, _Storage] = {}
  try:
    obj = _unpickle(zf.read(pickles[0]), path, storages)
  except UnsafeCheckpointError:
    raise
  except Exception as e:
    raise ValueError(f"{path}: corrupt data.pkl: {type(e).__name__}: {e}") from None
  for key, storage in storages.items():
    name = f"{prefix}data/{key}"
    if name not in names:
      raise ValueError(f"{path}: storage record {name!r} is missing")
    nbytes = storage.numel * storage.dtype.itemsize
    if zf.getinfo(name).file_size != nbytes:  # checked before inflating anything
      raise ValueError(
        f"{path}: storage {name!r} has {zf.getinfo(name).file_size} bytes, expected {nbytes}"
      )
    data = zf.read(name)
    if len(data) != nbytes:
      raise ValueError(f"{path}: storage {name!r} has {len(data)} bytes, expected {nbytes}")
    storage.array = np.frombuffer(data, storage.dtype.newbyteorder(order), storage.numel)
  return obj, storages


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict ``.pth`` file into numpy arrays, without torch.

  Both serialisations of ``torch.save`` are understood: the legacy one
  (a sequence of pickles followed by raw storages; PyTorch < 1.6 and
  ``_use_new_zipfile_serialization=False``) and the zip archive.

  Args:
    path: the ``.pth`` file.

  Returns:
    ``{key: array}`` in file order; arrays are C-contiguous copies in the
    stored dtype (``float32`` for usual weights, ``int64`` for
    ``num_batches_tracked``), native byte order.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allowlist
      (for example ``os.system``); nothing was called.
    ValueError: the file is not a checkpoint, is truncated or corrupt, or
      does not hold a flat dict of tensors. Messages name ``path``.
    FileNotFoundError: ``path`` does not exist.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(0)
    if zipfile.is_zipfile(f):
      f.seek(0)
      try:
        zf = zipfile.ZipFile(f)
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable zip archive: {e}") from None
      with zf:
        try:
          obj, storages = _read_zip(zf, path)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
          raise ValueError(f"{path}: truncated or corrupt zip checkpoint: {e}") from None
    elif head.startswith(b"PK\x03\x04"):
      raise ValueError(
        f"{path}: starts like a zip archive but its directory is "
        "missing: truncated or corrupt checkpoint"
      )
    else:
      f.seek(0)
      obj, storages = _read_legacy(f, path)
  return _collect(obj, storages, path)
