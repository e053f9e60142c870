"""File helpers: atomic writes, atomic folder swaps, stale temporaries, content hashes.

:func:`atomic_write` is used for everything jax_gad writes (checkpoints, cached
features, results, tables, plots, benchmark JSON): a reader sees the old file or
the new one, never half of one. :func:`replace_dir` swaps a finished folder in
for an old one (a run's workdir). Temporaries are named
``.tmp-<pid>-<random>-<name>``, so that :func:`remove_stale_temporaries` can
delete those of writers that died (killed mid-write) without touching a live
writer's. :func:`sha256` identifies files by content (checkpoint sources,
checkpoints in feature-cache keys); :func:`arrays_sha256` identifies arrays by
content (checkpoint variables, cached features).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import signal
import tempfile
import time
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
  try:
    fd, tmp = tempfile.mkstemp(
      dir=directory, prefix=temporary_prefix(), suffix="-" + os.path.basename(path)
    )
  except OSError as err:
    raise _named(err, path) from None
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
  except BaseException as err:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(err, OSError) and err.errno is not None:
      raise _named(err, path) from None
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


def _named(err: OSError, path: str) -> OSError:
  """The same error, saying which file could not be written (a full disk, say)."""
  return type(err)(err.errno, f"cannot write {path}: {err.strerror or err}")


def temporary_prefix() -> str:
  """Prefix of this process's temporary files and folders: ``.tmp-<pid>-``."""
  return f".tmp-{os.getpid()}-"


_TEMPORARY = re.compile(r"^\.tmp-(\d+)-")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def remove_stale_temporaries(folder: str | os.PathLike, min_age_s: float = 60.0) -> list[str]:
  """Deletes ``.tmp-<pid>-*`` files and folders of writers that no longer run.

  A temporary is stale when the process whose id it carries no longer runs
  and it was last modified at least ``min_age_s`` ago (the age guards against
  a writer on another machine sharing the folder). A missing folder is fine.

  Returns:
    The paths removed.
  """
  folder = os.fspath(folder)
  try:
    names = os.listdir(folder)
  except (FileNotFoundError, NotADirectoryError):
    return []
  removed, now = [], time.time()
  for name in names:
    m = _TEMPORARY.match(name)
    if not m:
      continue
    path = os.path.join(folder, name)
    try:
      age = now - os.lstat(path).st_mtime
    except FileNotFoundError:
      continue
    pid = int(m.group(1))
    if age < min_age_s or pid == os.getpid() or _alive(pid):
      continue
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.unlink(path)
      except FileNotFoundError:
        pass
    removed.append(path)
  return removed


def remove_stale_temporaries_beside(path: str | os.PathLike) -> list[str]:
  """:func:`remove_stale_temporaries` in the folder a command writes ``path`` into."""
  return remove_stale_temporaries(os.path.dirname(os.path.abspath(os.fspath(path))))


def _real(path) -> str:
  return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_not_an_input(flag: str, output, inputs, *, kept=()) -> None:
  """Refuses an output that would overwrite one of the command's own inputs.

  Paths are compared after resolving symlinks (``os.path.realpath``), so a
  link to an input, or the same file by another name, counts as that input.

  Args:
    flag: the output's flag name, for the message (``output``, ``workdir``).
    output: the path the command will write.
    inputs: ``(what, path)`` pairs: files the command reads, or folders whose
      content it reads (nothing may be written inside those); None paths skipped.
    kept: for an output folder that is replaced whole, ``(what, path)`` pairs
      that must not lie inside it (or be it); ``inputs`` are checked so too.

  Raises:
    ValueError: one line naming the flag, the output and the input.
  """
  out = _real(output)
  for what, path in list(inputs) + [(w, p) for w, p in kept]:
    if path is None or path == "":
      continue
    real = _real(path)
    if out == real:
      raise ValueError(f"--{flag}={output} is {what} {path}: writing it would destroy an input")
    if (what, path) in kept:
      if _inside(real, out):
        raise ValueError(
          f"--{flag}={output} holds {what} {path}; the folder is replaced whole: choose another"
        )
    elif os.path.isdir(real) and _inside(out, real):
      raise ValueError(f"--{flag}={output} lies inside {what} {path}: write it elsewhere")


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd = -100
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(code, f"cannot swap {b} for {a}: {os.strerror(code)}")


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
  """Puts the finished folder ``new`` at ``path``, replacing what was there.

  Where the kernel supports it (Linux), the two folders are exchanged in one
  atomic step, so ``path`` always holds either the old folder or the new one;
  elsewhere the old folder is renamed away and the new one renamed in with
  SIGINT and SIGTERM held back between the two renames. The old content is
  deleted afterwards. ``new`` must be on the same file system (a sibling).
  """
  new, path = os.fspath(new), os.fspath(path)
  if not os.path.lexists(path):
    os.rename(new, path)
    return
  if _exchange(new, path):
    shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
    return
  old = os.path.join(
    os.path.dirname(os.path.abspath(path)), temporary_prefix() + "old-" + os.path.basename(path)
  )
  blocked = {signal.SIGINT, signal.SIGTERM}
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
  try:
    os.rename(path, old)
    os.rename(new, path)
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
  shutil.rmtree(old, ignore_errors=True)


def write_dir(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Builds a folder with ``write(folder)`` and swaps it in at ``path`` whole.

  ``write`` fills a fresh temporary sibling of ``path``; only when it returns
  does :func:`replace_dir` put it in place. An exception (or Ctrl-C) removes
  the temporary folder and leaves ``path`` as it was; a killed process leaves
  a ``.tmp-<pid>-`` folder that :func:`remove_stale_temporaries` deletes later.
  """
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=temporary_prefix() + "run-", dir=parent)
  try:
    write(tmp)
    replace_dir(tmp, path)
  except BaseException as err:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, OSError) and tmp in str(err):  # name the user's folder, not ours
      raise type(err)(err.errno, str(err).replace(tmp, path)) from None
    raise


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
