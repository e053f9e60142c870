"""Data-parallel extraction of pooled level features on a device mesh.

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
shape). This module knows no dataset: the batches come from
:func:`jax_gad.data.pipeline.prefetch_batches` (decoding and resizing in a
thread pool while the device computes), and
:func:`jax_gad.data.pipeline.pooled_features` joins the two.

Multi-host: call :func:`initialize_distributed` first (before any other JAX
call); :func:`make_mesh` then spans the devices of every process, each process
feeds only the rows of each global batch that live on its own devices
(:attr:`LevelExtractor.local_rows`), and the pooled output is replicated, so
every process returns the full arrays.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def initialize_distributed(
  coordinator_address: str, num_processes: int, process_id: int
) -> tuple[int, int]:
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
    raise ValueError(
      f"coordinator_address must be a 'host:port' string, got {coordinator_address!r}"
    )
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(
      f"coordinator_address must be a 'host:port' string, got {coordinator_address!r}"
    )
  if (
    isinstance(num_processes, bool)
    or not isinstance(num_processes, (int, np.integer))
    or num_processes < 1
  ):
    raise ValueError(f'num_processes must be an integer >= 1, got {num_processes!r}')
  if (
    isinstance(process_id, bool)
    or not isinstance(process_id, (int, np.integer))
    or not 0 <= process_id < num_processes
  ):
    raise ValueError(f'process_id must be an integer in [0, {num_processes}), got {process_id!r}')
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=int(num_processes),
    process_id=int(process_id),
  )
  logger.info(
    'joined distributed job: process %d of %d, %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
  )
  return jax.process_index(), jax.process_count()


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = 'batch') -> Mesh:
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


# XLA:CPU vectorises loops 256 bits wide by default; 512 made the EfficientNet
# extractor 8-12 % faster on an AVX-512 CPU (docs/performance.md). It is a
# preference, so CPUs without 512-bit vectors use their widest.
CPU_COMPILER_OPTIONS = {'xla_cpu_prefer_vector_width': 512}


def pools_inside(module) -> bool:
  """Whether ``module.__call__`` takes ``pool`` (returns pooled float32 levels when True).

  jax_gad's EfficientNet does: it pools each level where it is produced, so a
  batch that it runs one image at a time never materialises whole-batch level
  maps (8 % faster for B4 at batch 8 on CPU, docs/performance.md). Other
  modules' maps are pooled after ``apply``.
  """
  try:
    return 'pool' in inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return False


@functools.partial(jax.jit, static_argnames=('module', 'levels', 'mesh'))
def _pooled_levels(variables, images, *, module, levels, mesh):
  """Backbone + float32 global average pool of ``levels``, replicated output."""
  inside = pools_inside(module)
  maps = module.apply(variables, images, pool=True) if inside else module.apply(variables, images)
  if not isinstance(maps, (tuple, list)):
    raise ValueError(f'module.apply must return a tuple of level maps, got {type(maps).__name__}')
  for level in levels:
    if level >= len(maps):
      raise ValueError(
        f'levels {levels} asks for level {level} but the module returns {len(maps)} levels'
      )
  # Pool in float32 even when the backbone computes in bfloat16.
  if inside:
    pooled = tuple(maps[level] for level in levels)
  else:
    pooled = tuple(jnp.mean(maps[level].astype(jnp.float32), axis=(1, 2)) for level in levels)
  # Replicated result: every process (multi-host) gets every row.
  return jax.lax.with_sharding_constraint(pooled, NamedSharding(mesh, P()))


class ProgressBar:
  """A tqdm bar that appears, and starts its clock, when the first batch is back.

  The first batch carries one-off costs (the first run of the compiled
  program, the decoding pipeline starting up) that would inflate the rate's
  ETA many times over, so it is counted as done before the clock starts
  (tqdm's rate is ``(n - initial) / elapsed``).
  """

  def __init__(self, total: int, desc: str, unit: str = 'img'):
    self.total = total
    self.desc = desc
    self.unit = unit
    self.bar = None

  def update(self, n: int) -> None:
    if self.bar is None:
      self.bar = tqdm(total=self.total, initial=n, desc=self.desc, unit=self.unit)
    else:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


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

  def __init__(
    self,
    module,
    variables,
    *,
    image_size: int,
    levels: Sequence[int],
    mesh: Mesh | None = None,
    batch_size: int = 8,
  ):
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
      raise ValueError(f'mesh must have exactly one axis, got axes {self.mesh.axis_names!r}')
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
      (
        (dev, idx[0].start or 0, idx[0].stop if idx[0].stop is not None else self.batch_size)
        for dev, idx in index_map.items()
      ),
      key=lambda item: item[1],
    )
    self.local_rows = np.concatenate(
      [np.arange(start, stop) for _, start, stop in self._device_rows]
    )

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
      spec = jax.ShapeDtypeStruct(self.input_shape, jnp.float32, sharding=self._batch_sharding)
      cpu = self.mesh.devices.flat[0].platform == 'cpu'
      self._compiled = self._lower(spec).compile(
        compiler_options=CPU_COMPILER_OPTIONS if cpu else None
      )
      self.compile_seconds = time.perf_counter() - start
      logger.info(
        'compiled %s for %s on %d device(s) in %.2f s',
        type(self).__name__,
        self.input_shape,
        self.mesh.size,
        self.compile_seconds,
      )
    return self.compile_seconds

  def _lower(self, spec: jax.ShapeDtypeStruct):
    """The lowered program for input ``spec``; subclasses return other outputs."""
    return _pooled_levels.lower(
      self.variables, spec, module=self.module, levels=self.levels, mesh=self.mesh
    )

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
      raise ValueError(f'local_images must have shape {expected}, got {local_images.shape}')
    local_images = np.asarray(local_images, dtype=np.float32)
    shards = []
    offset = 0
    for device, start, stop in self._device_rows:
      n = stop - start
      shards.append(jax.device_put(local_images[offset : offset + n], device))
      offset += n
    return jax.make_array_from_single_device_arrays(self.input_shape, self._batch_sharding, shards)

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
        raise ValueError(
          f'images must have shape {self.input_shape}, got {images.shape}; pad the last batch'
        )
      images = self.device_batch(images[self.local_rows])
    return self.compiled(self.variables, images)

  def extract(
    self,
    batches: Iterable[np.ndarray],
    n_images: int,
    *,
    progress: bool = True,
    desc: str = 'features',
  ) -> list[np.ndarray]:
    """Pooled level features of ``n_images`` images arriving in global batches.

    Batch ``b`` is dispatched to the devices while batch ``b - 1``'s pooled
    rows are brought back, so the host-side work that produces ``batches``
    (decoding, resizing: :func:`jax_gad.data.pipeline.prefetch_batches`)
    overlaps the device work.

    Args:
      batches: iterable of this process's rows of each global batch, float32
        ``(len(local_rows), S, S, 3)`` (:attr:`local_rows`; all rows in a
        single-process run), the last one zero-padded; ``ceil(n_images /
        batch_size)`` of them.
      n_images: number of real images; padded rows beyond it are dropped.
      progress: show a tqdm progress bar (process 0 only).
      desc: progress bar description.

    Returns:
      One float32 ``(n_images, C_l)`` array per requested level.
    """
    _check_positive_int('n_images', n_images)
    self.compile()
    outputs: list[list[np.ndarray]] = [[] for _ in self.levels]
    bar = ProgressBar(n_images, desc) if progress and jax.process_index() == 0 else None

    def fetch(pending, b):
      host = jax.device_get(pending)
      for out, level_rows in zip(outputs, host):
        out.append(np.asarray(level_rows, dtype=np.float32))
      if bar is not None:
        bar.update(max(0, min(self.batch_size, n_images - b * self.batch_size)))

    try:
      pending = None
      for b, local_images in enumerate(batches):
        # Dispatch batch b, then bring back batch b - 1 while b computes.
        result = self(self.device_batch(local_images))
        if pending is not None:
          fetch(pending, b - 1)
        pending = result
      if pending is not None:
        fetch(pending, b)
    finally:
      if bar is not None:
        bar.close()
    got = sum(part.shape[0] for part in outputs[0])
    if got < n_images:
      raise ValueError(f'batches held {got} rows, fewer than n_images={n_images}.')
    return [np.concatenate(out, axis=0)[:n_images] for out in outputs]


# ---------------------------------------------------------------------------
# Unpooled level maps (anomaly maps)
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('module', 'levels', 'channels', 'mesh'))
def _level_maps(variables, images, *, module, levels, channels, mesh):
  """Backbone + the float32 maps of ``levels`` (kept ``channels``), sharded over the batch."""
  maps = module.apply(variables, images)
  out = []
  for i, level in enumerate(levels):
    m = maps[level].astype(jnp.float32)
    if channels is not None and channels[i] is not None:
      m = m[..., jnp.asarray(channels[i])]
    out.append(m)
  # Stay sharded over the batch: the per-location statistics are reduced on the devices.
  return jax.lax.with_sharding_constraint(tuple(out), NamedSharding(mesh, P(mesh.axis_names[0])))


class MapExtractor(LevelExtractor):
  """A :class:`LevelExtractor` returning unpooled float32 level maps.

  Calling it on a global batch returns one ``(batch_size, h_l, w_l, C_l)``
  array per level, left sharded over the batch axis on the devices, where
  :func:`jax_gad.maps.pipeline.stream_parts` adds them to per-location statistics.
  """

  def __init__(
    self,
    module,
    variables,
    *,
    image_size: int,
    levels: Sequence[int],
    channels: Sequence | None = None,
    mesh: Mesh | None = None,
    batch_size: int = 8,
  ):
    """As :class:`LevelExtractor`; ``channels``: per level, kept channel indices or None (all)."""
    super().__init__(
      module, variables, image_size=image_size, levels=levels, mesh=mesh, batch_size=batch_size
    )
    if channels is not None:
      if len(channels) != len(self.levels):
        raise ValueError(
          f'channels must give one entry per level ({len(self.levels)}), got {len(channels)}.'
        )
      channels = tuple(None if c is None else tuple(int(i) for i in c) for c in channels)
    self.channels = channels

  def _lower(self, spec: jax.ShapeDtypeStruct):
    return _level_maps.lower(
      self.variables,
      spec,
      module=self.module,
      levels=self.levels,
      channels=self.channels,
      mesh=self.mesh,
    )

  def map_shapes(self) -> list[tuple[int, int, int]]:
    """(h, w, C) of each returned level map (compiles on first use)."""
    return [tuple(int(s) for s in o.shape[1:]) for o in self.compiled.out_info]
