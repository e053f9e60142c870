"""Data-parallel level-feature extraction and an on-disk feature cache.

The backbone runs under ``jax.jit`` on a one-axis device :class:`~jax.sharding.Mesh`:
parameters are replicated (``NamedSharding(mesh, P())``) and the image batch is
split over the ``'batch'`` axis (``NamedSharding(mesh, P('batch'))``), the
sharding-based successor of ``pmap``. Each requested level map is
global-average-pooled on the device, in float32 even for a bfloat16 backbone,
and only the pooled ``(batch, C_l)`` rows travel back to the host.

The program is compiled ahead of time for one global batch shape. The last
partial batch is padded with zero images and the padded rows are dropped on the
host, so an image count that does not divide into batches neither loses images
nor triggers a second compilation (the compiled executable rejects any other
shape). Images are decoded and resized by a thread pool that works on the next
batches while the device computes the current one.

Multi-host: call :func:`initialize_distributed` first (before any other JAX
call); :func:`make_mesh` then spans the devices of every process, each process
decodes only the rows of each global batch that live on its own devices, and
the pooled output is replicated, so every process returns the full arrays.

:class:`FeatureCache` stores extracted features on disk keyed by a hash of all
the fields that change them (see :func:`cache_key`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_gad import files

logger = logging.getLogger(__name__)

# Bump whenever a change in this package changes the feature values (model
# code, preprocessing, pooling); it is part of every cache key.
FEATURE_CODE_VERSION = 1

NUM_LEVELS = 9
DEFAULT_LEVELS = tuple(range(NUM_LEVELS))


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int) -> tuple[int, int]:
  """Joins a multi-process JAX job (wrapper over ``jax.distributed.initialize``).

  Must run before any other JAX computation in the process. On the CPU backend
  the cross-process collectives use gloo (JAX's default in 0.10).

  Args:
    coordinator_address: ``'host:port'`` of process 0, the same on every process.
    num_processes: total number of processes, >= 1.
    process_id: this process's index in ``[0, num_processes)``.

  Returns:
    ``(jax.process_index(), jax.process_count())`` after joining.
  """
  if not isinstance(coordinator_address, str) or ':' not in coordinator_address:
    raise ValueError("coordinator_address must be a 'host:port' string, got "
                     f'{coordinator_address!r}')
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError("coordinator_address must be a 'host:port' string, got "
                     f'{coordinator_address!r}')
  if isinstance(num_processes, bool) or not isinstance(
      num_processes, (int, np.integer)) or num_processes < 1:
    raise ValueError(f'num_processes must be an integer >= 1, got {num_processes!r}')
  if isinstance(process_id, bool) or not isinstance(
      process_id, (int, np.integer)) or not 0 <= process_id < num_processes:
    raise ValueError(f'process_id must be an integer in [0, {num_processes}), '
                     f'got {process_id!r}')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=int(num_processes),
                             process_id=int(process_id))
  logger.info('joined distributed job: process %d of %d, %d global devices',
              jax.process_index(), jax.process_count(), jax.device_count())
  return jax.process_index(), jax.process_count()


def make_mesh(devices: Sequence[jax.Device] | None = None,
              axis_name: str = 'batch') -> Mesh:
  """Builds a one-axis mesh for data parallelism.

  Args:
    devices: devices to span; default ``jax.devices()``, i.e. every local device
      in a single-process run and every device of every process after
      :func:`initialize_distributed`.
    axis_name: name of the mesh axis the batch is split over.

  Returns:
    A ``Mesh`` of shape ``(len(devices),)`` with axis ``axis_name``.
  """
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  if not devices:
    raise ValueError('devices must hold at least one device, got an empty sequence')
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f'axis_name must be a non-empty string, got {axis_name!r}')
  return Mesh(np.asarray(devices, dtype=object), (axis_name,))


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
  try:
    levels = tuple(levels)
  except TypeError:
    raise ValueError(f'levels must be a sequence of ints, got {levels!r}') from None
  if not levels:
    raise ValueError('levels must name at least one level, got an empty sequence')
  for level in levels:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
      raise ValueError(f'levels must hold non-negative ints, got {levels!r}')
  if len(set(levels)) != len(levels):
    raise ValueError(f'levels must not repeat a level, got {levels!r}')
  return tuple(int(level) for level in levels)


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Places a pytree of host arrays on every device of ``sharding`` (multi-host safe)."""

  def put(leaf):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

  return jax.tree_util.tree_map(put, tree)


@functools.partial(jax.jit, static_argnames=('module', 'levels', 'mesh'))
def _pooled_levels(variables, images, *, module, levels, mesh):
  """Backbone + float32 global average pool of ``levels``, replicated output."""
  maps = module.apply(variables, images)
  if not isinstance(maps, (tuple, list)):
    raise ValueError('module.apply must return a tuple of level maps, got '
                     f'{type(maps).__name__}')
  for level in levels:
    if level >= len(maps):
      raise ValueError(f'levels {levels} asks for level {level} but the module '
                       f'returns {len(maps)} levels')
  # Pool in float32 even when the backbone computes in bfloat16.
  pooled = tuple(jnp.mean(maps[level].astype(jnp.float32), axis=(1, 2))
                 for level in levels)
  # Replicated result: every process (multi-host) gets every row.
  return jax.lax.with_sharding_constraint(pooled, NamedSharding(mesh, P()))


class LevelExtractor:
  """A backbone compiled once for a fixed global batch, returning pooled levels.

  Attributes:
    mesh: the device mesh (one axis).
    levels: the level indices returned, in this order.
    batch_size: global batch size, the requested size rounded up to a multiple
      of the mesh size.
    image_size: square input side in pixels.
    compile_seconds: wall time of lowering + compiling, or ``None`` before.
  """

  def __init__(self, module, variables, *, image_size: int,
               mesh: Mesh | None = None,
               levels: Sequence[int] = DEFAULT_LEVELS,
               batch_size: int = 8):
    """Prepares (does not yet compile) the extractor.

    Args:
      module: a Flax module whose ``apply(variables, x)`` maps float32 NHWC
        images ``(B, H, W, 3)`` to a tuple of level maps ``(B, h, w, C_l)``.
      variables: its variables (host or device arrays); replicated on the mesh.
      image_size: the square input size ``H == W``.
      mesh: a one-axis mesh from :func:`make_mesh`; default all devices.
      levels: indices into the module's level tuple to pool and return.
      batch_size: requested global batch; rounded up to a multiple of the
        number of devices.
    """
    _check_positive_int('image_size', image_size)
    _check_positive_int('batch_size', batch_size)
    self.mesh = make_mesh() if mesh is None else mesh
    if len(self.mesh.axis_names) != 1:
      raise ValueError('mesh must have exactly one axis, got axes '
                       f'{self.mesh.axis_names!r}')
    self.levels = _check_levels(levels)
    self.image_size = int(image_size)
    n_dev = self.mesh.size
    self.batch_size = int(math.ceil(batch_size / n_dev) * n_dev)
    self.module = module
    axis = self.mesh.axis_names[0]
    self._replicated = NamedSharding(self.mesh, P())
    self._batch_sharding = NamedSharding(self.mesh, P(axis))
    self.variables = _replicate(variables, self._replicated)
    self.compile_seconds: float | None = None
    self._compiled = None
    # Rows of each global batch that this process feeds: one (device, start,
    # stop) per addressable device, sorted by start.
    index_map = self._batch_sharding.addressable_devices_indices_map(self.input_shape)
    self._device_rows = sorted(
        ((dev, idx[0].start or 0, idx[0].stop if idx[0].stop is not None
          else self.batch_size) for dev, idx in index_map.items()),
        key=lambda item: item[1])
    self.local_rows = np.concatenate(
        [np.arange(start, stop) for _, start, stop in self._device_rows])

  @property
  def input_shape(self) -> tuple[int, int, int, int]:
    """The one global input shape ``(batch_size, image_size, image_size, 3)``."""
    return (self.batch_size, self.image_size, self.image_size, 3)

  def compile(self) -> float:
    """Lowers and compiles for :attr:`input_shape`; returns the seconds it took.

    Compiled executables are cached by JAX per (module, levels, mesh, shapes),
    so a second extractor for the same configuration compiles in milliseconds.
    """
    if self._compiled is None:
      start = time.perf_counter()
      spec = jax.ShapeDtypeStruct(self.input_shape, jnp.float32,
                                  sharding=self._batch_sharding)
      self._compiled = _pooled_levels.lower(
          self.variables, spec, module=self.module, levels=self.levels,
          mesh=self.mesh).compile()
      self.compile_seconds = time.perf_counter() - start
      logger.info('compiled level extractor for %s on %d device(s) in %.2f s',
                  self.input_shape, self.mesh.size, self.compile_seconds)
    return self.compile_seconds

  @property
  def compiled(self):
    """The compiled executable (compiles on first access)."""
    self.compile()
    return self._compiled

  def device_batch(self, local_images: np.ndarray) -> jax.Array:
    """Assembles a global batch array from this process's rows.

    Args:
      local_images: float32 ``(len(local_rows), S, S, 3)``: the rows
        :attr:`local_rows` of the global batch, in that order (all rows in a
        single-process run).

    Returns:
      A global ``(batch_size, S, S, 3)`` array sharded over the batch axis.
    """
    expected = (len(self.local_rows),) + self.input_shape[1:]
    if local_images.shape != expected:
      raise ValueError(f'local_images must have shape {expected}, got '
                       f'{local_images.shape}')
    local_images = np.asarray(local_images, dtype=np.float32)
    shards = []
    offset = 0
    for device, start, stop in self._device_rows:
      n = stop - start
      shards.append(jax.device_put(local_images[offset:offset + n], device))
      offset += n
    return jax.make_array_from_single_device_arrays(
        self.input_shape, self._batch_sharding, shards)

  def __call__(self, images) -> tuple[jax.Array, ...]:
    """Runs one global batch (asynchronously).

    Args:
      images: a global ``(batch_size, S, S, 3)`` float32 ``jax.Array`` from
        :meth:`device_batch`, or (single process only) a host array.

    Returns:
      A tuple of replicated float32 ``(batch_size, C_l)`` arrays, one per level.
    """
    if not isinstance(images, jax.Array):
      images = np.asarray(images, dtype=np.float32)
      if images.shape != self.input_shape:
        raise ValueError(f'images must have shape {self.input_shape}, got '
                         f'{images.shape}; pad the last batch')
      images = self.device_batch(images[self.local_rows])
    return self.compiled(self.variables, images)

  def extract(self, source, *, mean, std, num_workers: int = 2,
              prefetch: int = 2, progress: bool = True,
              desc: str = 'features',
              preprocess: Callable[..., np.ndarray] | None = None
              ) -> list[np.ndarray]:
    """Pooled level features of every image in ``source``, in source order.

    Args:
      source: sequence-like; ``len(source)`` images, ``source[i]['image']`` a
        uint8 ``(H, W, 3)`` array. In a multi-host run every process must see
        the same source; each decodes only its own rows.
      mean: per-channel mean passed to ``preprocess``.
      std: per-channel std passed to ``preprocess``.
      num_workers: decoding / resizing threads.
      prefetch: batches prepared ahead of the one on the device.
      progress: show a tqdm progress bar.
      desc: progress bar description.
      preprocess: ``f(image_uint8, size, mean, std) -> float32 (size, size, 3)``;
        default ``jax_gad.data.preprocess.prepare_image``.

    Returns:
      One float32 ``(len(source), C_l)`` array per requested level.
    """
    _check_positive_int('num_workers', num_workers)
    _check_positive_int('prefetch', prefetch)
    try:
      n_images = len(source)
    except TypeError:
      raise ValueError('source must be sequence-like (len and [i]), got '
                       f'{type(source).__name__}') from None
    if n_images == 0:
      raise ValueError('source is empty: nothing to extract')
    if preprocess is None:
      from jax_gad.data.preprocess import prepare_image as preprocess  # pylint: disable=g-import-not-at-top
    self.compile()
    n_batches = math.ceil(n_images / self.batch_size)
    outputs: list[list[np.ndarray]] = [[] for _ in self.levels]

    def fetch(pending):
      host = jax.device_get(pending)
      for out, level_rows in zip(outputs, host):
        out.append(np.asarray(level_rows, dtype=np.float32))

    bar = None
    if progress and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=n_images, desc=desc, unit='img')
    try:
      pending = None
      batches = _prefetch_batches(source, n_images, n_batches, self.batch_size,
                                  self.local_rows, self.image_size, mean, std,
                                  preprocess, num_workers, prefetch)
      try:
        for b, local_images in enumerate(batches):
          # Dispatch batch b, then bring back batch b - 1 while b computes.
          result = self(self.device_batch(local_images))
          if pending is not None:
            fetch(pending)
          pending = result
          if bar is not None:
            bar.update(min(self.batch_size, n_images - b * self.batch_size))
      finally:
        batches.close()
      if pending is not None:
        fetch(pending)
    finally:
      if bar is not None:
        bar.close()
    return [np.concatenate(out, axis=0)[:n_images] for out in outputs]


def _prefetch_batches(source, n_images, n_batches, batch_size, local_rows,
                      image_size, mean, std, preprocess, num_workers,
                      prefetch) -> Iterator[np.ndarray]:
  """Yields this process's float32 rows of each global batch, zero-padded."""
  shape = (image_size, image_size, 3)

  def load(index):
    item = source[index]
    if not isinstance(item, Mapping) or 'image' not in item:
      raise ValueError(f"source[{index}] must be a dict with an 'image' key, got "
                       f'{type(item).__name__}')
    where = f"source[{index}]" + (f" ({item['file_name']})" if 'file_name' in item else '')
    image = np.asarray(item['image'])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"{where}: 'image' must be uint8 (H, W, 3), got "
                       f'{image.dtype} {image.shape}')
    out = np.asarray(preprocess(image, image_size, mean, std), dtype=np.float32)
    if out.shape != shape:
      raise ValueError(f'preprocess returned shape {out.shape} for {where}, '
                       f'expected {shape}')
    return out

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers,
                                               thread_name_prefix='jax_gad-decode')

  def submit(b):
    indices = b * batch_size + local_rows
    return [pool.submit(load, int(i)) if i < n_images else None for i in indices]

  queue = collections.deque()
  try:
    for b in range(min(prefetch, n_batches)):
      queue.append(submit(b))
    for b in range(n_batches):
      futures = queue.popleft()
      if b + prefetch < n_batches:
        queue.append(submit(b + prefetch))
      batch = np.zeros((len(local_rows),) + shape, np.float32)
      for row, future in enumerate(futures):
        if future is not None:
          batch[row] = future.result()
      yield batch
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def make_extractor(module, variables, *, image_size: int, mesh: Mesh | None = None,
                   levels: Sequence[int] = DEFAULT_LEVELS,
                   batch_size: int = 8) -> LevelExtractor:
  """Functional alias of :class:`LevelExtractor` (same arguments)."""
  return LevelExtractor(module, variables, image_size=image_size, mesh=mesh,
                        levels=levels, batch_size=batch_size)


def extract_features(module, variables, source, *, image_size: int, mean, std,
                     batch_size: int = 8, mesh: Mesh | None = None,
                     levels: Sequence[int] = DEFAULT_LEVELS,
                     num_workers: int = 2, progress: bool = True,
                     desc: str = 'features',
                     preprocess: Callable[..., np.ndarray] | None = None
                     ) -> list[np.ndarray]:
  """Extracts global-average-pooled level features of every image in ``source``.

  Builds a :class:`LevelExtractor` (one compilation) and runs it over the
  source; to reuse one compilation for several sources, build the extractor
  once and call :meth:`LevelExtractor.extract`.

  Args:
    module: Flax module, ``apply(variables, x float32 NHWC) -> tuple of maps``.
    variables: its variables.
    source: sequence-like, ``source[i]['image']`` uint8 ``(H, W, 3)``.
    image_size: square side the images are resized to.
    mean: per-channel normalisation mean (of the checkpoint).
    std: per-channel normalisation std.
    batch_size: global batch (rounded up to a multiple of the device count).
    mesh: one-axis mesh; default every device.
    levels: level indices to return.
    num_workers: decoding threads.
    progress: show a progress bar.
    desc: its description.
    preprocess: optional replacement for ``jax_gad.data.preprocess.prepare_image``.

  Returns:
    One float32 ``(len(source), C_l)`` array per level in ``levels``, rows in
    source order.
  """
  extractor = LevelExtractor(module, variables, image_size=image_size, mesh=mesh,
                             levels=levels, batch_size=batch_size)
  return extractor.extract(source, mean=mean, std=std, num_workers=num_workers,
                           progress=progress, desc=desc, preprocess=preprocess)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


class CacheWarning(UserWarning):
  """A cache entry was stale or corrupt and is being recomputed."""


def _canonical_json(fields: Mapping[str, Any]) -> str:
  try:
    return json.dumps(fields, sort_keys=True, separators=(',', ':'),
                      ensure_ascii=True, allow_nan=False)
  except (TypeError, ValueError) as err:
    raise ValueError('key_fields must hold only JSON values (str, int, float, '
                     f'bool, None, lists, dicts with str keys): {err}') from None


def _normalise_fields(key_fields: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(key_fields, Mapping) or not key_fields:
    raise ValueError('key_fields must be a non-empty dict, got '
                     f'{type(key_fields).__name__}')
  for name in key_fields:
    if not isinstance(name, str):
      raise ValueError(f'key_fields keys must be str, got {name!r}')
  fields = dict(key_fields)
  fields.setdefault('feature_code_version', FEATURE_CODE_VERSION)
  # Round trip so tuples become lists and the stored manifest compares equal.
  return json.loads(_canonical_json(fields))


def cache_key(key_fields: Mapping[str, Any]) -> str:
  """sha256 hex of the canonical JSON of ``key_fields`` (+ feature code version)."""
  return hashlib.sha256(
      _canonical_json(_normalise_fields(key_fields)).encode('ascii')).hexdigest()


def arrays_checksum(arrays: Sequence[np.ndarray]) -> str:
  """sha256 over dtype, shape and bytes of each array, in order."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f'{array.dtype.str}{array.shape};'.encode('ascii'))
    digest.update(array.tobytes())
  return digest.hexdigest()


class FeatureCache:
  """Directory of extracted features keyed by the fields that determine them.

  Each entry ``<root>/<key>.npz`` (arrays ``level_0 .. level_{k-1}``) has a
  manifest ``<root>/<key>.json`` with the full key fields, the array shapes and
  dtypes and a checksum of the array contents. A manifest whose fields differ
  from the request (stale) or an entry that cannot be read, fails its checksum
  or has other shapes (corrupt) triggers a :class:`CacheWarning` naming the
  file, and the features are recomputed and rewritten. Files are written to a
  temporary name and moved into place with ``os.replace``.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.hits = 0
    self.misses = 0

  def paths(self, key_fields: Mapping[str, Any]) -> tuple[str, str]:
    """``(arrays_path, manifest_path)`` of the entry for ``key_fields``."""
    key = cache_key(key_fields)
    base = os.path.join(self.root, key)
    return base + '.npz', base + '.json'

  def _load(self, fields, arrays_path, manifest_path) -> list[np.ndarray] | None:
    if not os.path.exists(manifest_path) and not os.path.exists(arrays_path):
      return None
    try:
      with open(manifest_path, 'r', encoding='utf-8') as f:
        manifest = json.load(f)
      if not isinstance(manifest, dict):
        raise ValueError('manifest is not a JSON object')
    except (OSError, ValueError) as err:
      warnings.warn(f'feature cache manifest {manifest_path} is unreadable '
                    f'({err}); recomputing', CacheWarning, stacklevel=3)
      return None
    if manifest.get('key_fields') != fields:
      warnings.warn(f'feature cache entry {manifest_path} is stale: its key fields '
                    f'{manifest.get("key_fields")!r} differ from {fields!r}; '
                    'recomputing', CacheWarning, stacklevel=3)
      return None
    try:
      shapes = [tuple(s) for s in manifest['shapes']]
      dtypes = list(manifest['dtypes'])
      with np.load(arrays_path, allow_pickle=False) as npz:
        names = [f'level_{i}' for i in range(len(shapes))]
        if sorted(npz.files) != sorted(names):
          raise ValueError(f'holds arrays {sorted(npz.files)}, manifest expects {names}')
        arrays = [npz[name] for name in names]
      got_shapes = [a.shape for a in arrays]
      got_dtypes = [a.dtype.str for a in arrays]
      if got_shapes != shapes or got_dtypes != dtypes:
        raise ValueError(f'arrays have shapes {got_shapes} dtypes {got_dtypes}, '
                         f'manifest says {shapes} {dtypes}')
      if arrays_checksum(arrays) != manifest['checksum']:
        raise ValueError('checksum mismatch')
    except Exception as err:  # pylint: disable=broad-except
      warnings.warn(f'feature cache entry {arrays_path} is corrupt ({err}); '
                    'recomputing', CacheWarning, stacklevel=3)
      return None
    return arrays

  def get_or_compute(self, key_fields: Mapping[str, Any],
                     compute_fn: Callable[[], Sequence[np.ndarray]]
                     ) -> list[np.ndarray]:
    """Returns the cached arrays for ``key_fields`` or computes and stores them.

    Args:
      key_fields: JSON-able dict of everything that changes the features
        (dataset, category, split, data fingerprint, checkpoint identity, arch,
        image size, dtype, depthwise implementation, levels, ...);
        ``feature_code_version`` is added when absent.
      compute_fn: ``() -> sequence of arrays`` (one per level), called on a miss.

    Returns:
      The list of arrays (as computed, or as loaded from disk).
    """
    fields = _normalise_fields(key_fields)
    arrays_path, manifest_path = self.paths(fields)
    arrays = self._load(fields, arrays_path, manifest_path)
    if arrays is not None:
      self.hits += 1
      logger.info('feature cache hit: %s', arrays_path)
      return arrays
    self.misses += 1
    logger.info('feature cache miss: %s', arrays_path)
    computed = compute_fn()
    if isinstance(computed, np.ndarray) or not isinstance(computed, (list, tuple)):
      raise ValueError('compute_fn must return a list of arrays, got '
                       f'{type(computed).__name__}')
    arrays = [np.asarray(a) for a in computed]
    for i, array in enumerate(arrays):
      if array.dtype == object:
        raise ValueError(f'compute_fn returned an object array at position {i}')
    manifest = {
        'key_fields': fields,
        'key': os.path.basename(arrays_path)[:-4],
        'shapes': [list(a.shape) for a in arrays],
        'dtypes': [a.dtype.str for a in arrays],
        'checksum': arrays_checksum(arrays),
        'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }
    files.atomic_write(arrays_path, lambda f: np.savez(
        f, **{f'level_{i}': a for i, a in enumerate(arrays)}))
    files.atomic_write(manifest_path, lambda f: f.write(
        json.dumps(manifest, indent=1, sort_keys=True).encode('utf-8')))
    return arrays
