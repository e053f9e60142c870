"""Converted EfficientNet weights on disk: the checkpoint file format, saving and loading.

A converted checkpoint is one msgpack file (``flax.serialization``) holding
``{"format": "jax_gad.efficientnet", "metadata": {...}, "variables": {...}}``.
The metadata names the architecture, the source of the weights (file name
and sha256), the native resolution, the normalisation mean / std and the
format version, and (from format version 2 on) a sha256 of the variables'
contents: :func:`load_checkpoint` recomputes it and refuses a file whose
weights changed after conversion. See docs/checkpoints.md.

The variables must have exactly the shapes of the architecture's module
(``jax_gad.models.efficientnet.variable_shapes``, its init traced with
``jax.eval_shape``). Writing checkpoints from PyTorch weights is
:mod:`jax_gad.convert`; finding (and on first use converting) the default
checkpoint of an architecture is :mod:`jax_gad.backbone`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.serialization
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
  expected = effnet.variable_shapes(arch)
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
