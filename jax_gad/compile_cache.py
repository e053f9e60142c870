"""JAX's persistent compilation cache for the commands: compile once per machine, not per call.

Every command (``main``, ``fit``, ``predict``) calls :func:`enable` once,
before its first JAX computation, with the value of ``--compile_cache``
(default: the ``compile_cache`` option of :class:`jax_gad.config.Backbone`;
``''`` turns the cache off). Compiled XLA
programs are then written to that folder, keyed by JAX on the program, the
backend and the compile options, and a later process that needs the same
program loads it instead of compiling it again: the extractor of a backbone
compiles once per (architecture, input size, batch size, levels, machine).

Concurrent processes: JAX writes an entry with a plain ``write_bytes`` (not a
temporary file + rename), so without a lock a process could read an entry
another one is still writing. :func:`enable` therefore bounds the cache
(:data:`MAX_BYTES`, least recently used entries evicted), which makes JAX take
its ``filelock`` lock (``<folder>/.lockfile``, released by the kernel if its
holder dies) around every read and write of an entry: a reader never sees a
half-written entry, and two processes that compile the same program store it
once. An entry cut short by a killed process fails to decompress when read;
JAX then warns and compiles (results are unaffected); delete the folder to
clear it. The folder is trusted as code: never point it at a folder others can
write to.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

# Bound of the folder's size; least recently used entries are evicted beyond it (and the
# bound is what makes JAX lock each entry's read and write: see the module docstring).
MAX_BYTES = 2 * 1024**3
# Store every program that took at least this long to compile. Measured on a 2-core CPU VM:
# the Gaussian's small programs compile in 0.01-0.03 s and load from the cache in the same
# time (storing them gains nothing); the extractor and the larger fits take 0.5-8 s. JAX's
# default (1 s) would leave out those between 0.1 and 1 s.
MIN_COMPILE_SECONDS = 0.1

_EVENTS = {
  "/jax/compilation_cache/compile_requests_use_cache": "requests",
  "/jax/compilation_cache/cache_hits": "hits",
  "/jax/compilation_cache/cache_misses": "writes",
}


class Stats:
  """Counts of this process's compilations since :func:`enable`: loaded, compiled, stored.

  A listener of ``jax.monitoring`` events: ``requests`` (programs JAX looked
  up in the cache), ``hits`` (loaded from it) and ``writes`` (compiled and
  stored). ``folder`` is the cache folder, or None when the cache is off.
  """

  def __init__(self, folder: str | None):
    self.folder = folder
    self.requests = self.hits = self.writes = 0

  def __call__(self, event: str, **kwargs) -> None:
    name = _EVENTS.get(event)
    if name is not None and self.folder is not None:
      setattr(self, name, getattr(self, name) + 1)

  def summary(self) -> str:
    """One console line: where the cache is and what this process loaded and compiled."""
    if self.folder is None:
      return "compile cache off (--compile_cache=''): every program was compiled"
    return (
      f"compile cache {self.folder}: {self.hits} programs loaded, "
      f"{self.requests - self.hits} compiled ({self.writes} stored)"
    )


def enable(folder: str | None) -> Stats:
  """Turns JAX's persistent compilation cache on at ``folder``, or off for '' / None.

  Call it once per process, before the first JAX computation (programs
  compiled earlier are not stored). ``~`` is expanded; the folder is created.

  Returns:
    the :class:`Stats` that count this process's cache hits and writes from now on.

  Raises:
    ValueError: ``folder`` is a file or cannot be created (one line naming it).
  """
  if folder:
    folder = _checked_folder(folder)
  compilation_cache.reset_cache()  # a later call takes effect even after a compilation
  if not folder:
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    return Stats(None)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  stats = Stats(folder)
  jax.monitoring.register_event_listener(stats)
  return stats


def _checked_folder(folder) -> str:
  """The absolute folder, created if missing; ValueError naming it if it cannot be used."""
  folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise ValueError(f"--compile_cache={folder} is a file; give a folder, or '' to disable")
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as err:
    raise ValueError(
      f"--compile_cache={folder} cannot be created ({err.strerror}); give a folder you can "
      "write to, or '' to disable"
    ) from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f"--compile_cache={folder} is not writable; give another, or '' to disable")
  return folder
