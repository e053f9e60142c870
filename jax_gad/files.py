"""File helpers: atomic writes and content hashes.

:func:`atomic_write` is used for everything jax_gad writes (checkpoints, cached
features, results, tables, plots, benchmark JSON): a reader sees the old file or
the new one, never half of one. :func:`sha256` identifies files by content
(checkpoint sources, checkpoints in feature-cache keys); :func:`arrays_sha256`
identifies arrays by content (checkpoint variables, cached features).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import BinaryIO, Callable, Sequence

import numpy as np


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> None:
  """Writes ``data`` to ``path`` atomically.

  The content goes to a temporary file in the same folder, is flushed and
  fsync'ed, and is renamed over ``path`` (``os.replace``); the folder is then
  fsync'ed so the rename survives a crash where the platform allows it. On any
  error the temporary file is removed and ``path`` is left as it was.

  Args:
    path: destination; its folder must exist.
    data: bytes, str (written as UTF-8), or a callable that writes into the
      binary file object it is given (e.g. ``lambda f: np.savez(f, ...)``).
  """
  path = os.path.abspath(os.fspath(path))
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      umask = os.umask(0)
      os.umask(umask)
      os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode
      if callable(data):
        data(f)
      else:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  try:
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(dir_fd)
  except OSError:
    pass
  finally:
    os.close(dir_fd)


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """sha256 hex digest of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def arrays_sha256(arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> str:
  """sha256 hex over (name,) dtype, shape and bytes of each array, in order.

  Args:
    arrays: the arrays; their order matters.
    names: optional names, one per array, hashed before each array (so that
      equal arrays under swapped names hash differently).
  """
  if names is not None and len(names) != len(arrays):
    raise ValueError(f'names has {len(names)} entries for {len(arrays)} arrays.')
  digest = hashlib.sha256()
  for i, array in enumerate(arrays):
    array = np.ascontiguousarray(array)
    if names is not None:
      digest.update(f'{names[i]}:'.encode('utf-8'))
    digest.update(f'{array.dtype.str}{array.shape};'.encode('ascii'))
    digest.update(array.tobytes())
  return digest.hexdigest()
