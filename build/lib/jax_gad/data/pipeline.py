"""From a split on disk to batches of network inputs, decoded ahead of the device.

:func:`prefetch_batches` decodes and resizes images in a thread pool while the
device computes, and yields this process's rows of each global batch, the last
one zero-padded. :func:`pooled_features` joins it to a
:class:`jax_gad.features.LevelExtractor`: the path every command takes from a
:class:`jax_gad.data.Split` (or any sequence of ``{'image': uint8 (H, W, 3)}``)
to pooled level features.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from jax_gad.data import preprocess as _preprocess

Preprocess = Callable[[np.ndarray], np.ndarray]


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')


def image_preprocessor(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Preprocess:
  """``f(uint8 (H, W, 3)) -> float32 (image_size, image_size, 3)``: resize, then normalise.

  The protocol's preprocessing (docs/method.md, "Preprocessing"), bound to one
  input size and one checkpoint's mean / std.
  """
  _check_positive_int('image_size', image_size)
  return functools.partial(_preprocess.prepare_image, size=image_size, mean=mean, std=std)


def _num_items(source) -> int:
  try:
    return len(source)
  except TypeError:
    raise ValueError(
      f'source must be sequence-like (len and [i]), got {type(source).__name__}'
    ) from None


def prefetch_batches(
  source,
  *,
  preprocess: Preprocess,
  batch_size: int,
  image_shape: tuple[int, int, int],
  rows: Sequence[int] | np.ndarray | None = None,
  num_workers: int = 2,
  prefetch: int = 2,
) -> Iterator[np.ndarray]:
  """Yields float32 batches of preprocessed images, decoded ahead in threads.

  Args:
    source: sequence-like; ``source[i]['image']`` a uint8 ``(H, W, 3)`` array
      (``source[i]['file_name']``, when present, names the image in errors).
    preprocess: ``f(image) -> float32 (S, S, 3)``, e.g. :func:`image_preprocessor`.
    batch_size: global batch size.
    image_shape: ``(S, S, 3)``, the shape ``preprocess`` must return.
    rows: the rows of each global batch this process feeds (a multi-host
      run's :attr:`LevelExtractor.local_rows`); default all rows.
    num_workers: decoding / resizing threads.
    prefetch: batches prepared ahead of the one being consumed.

  Yields:
    ``ceil(len(source) / batch_size)`` arrays ``(len(rows), S, S, 3)``; rows
    past the end of ``source`` are zeros.
  """
  for name, value in (
    ('batch_size', batch_size),
    ('num_workers', num_workers),
    ('prefetch', prefetch),
  ):
    _check_positive_int(name, value)
  n_images = _num_items(source)
  rows = np.arange(batch_size) if rows is None else np.asarray(rows, dtype=np.int64)
  n_batches = math.ceil(n_images / batch_size)
  shape = tuple(image_shape)

  def load(index):
    item = source[index]
    if not isinstance(item, Mapping) or 'image' not in item:
      raise ValueError(
        f"source[{index}] must be a dict with an 'image' key, got {type(item).__name__}"
      )
    where = f"source[{index}]" + (f" ({item['file_name']})" if 'file_name' in item else '')
    image = np.asarray(item['image'])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"{where}: 'image' must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    out = np.asarray(preprocess(image), dtype=np.float32)
    if out.shape != shape:
      raise ValueError(f'preprocess returned shape {out.shape} for {where}, expected {shape}')
    return out

  pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=num_workers, thread_name_prefix='jax_gad-decode'
  )

  def submit(b):
    indices = b * batch_size + rows
    return [pool.submit(load, int(i)) if i < n_images else None for i in indices]

  queue = collections.deque()
  try:
    for b in range(min(prefetch, n_batches)):
      queue.append(submit(b))
    for b in range(n_batches):
      futures = queue.popleft()
      if b + prefetch < n_batches:
        queue.append(submit(b + prefetch))
      batch = np.zeros((len(rows),) + shape, np.float32)
      for row, future in enumerate(futures):
        if future is not None:
          batch[row] = future.result()
      yield batch
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def pooled_features(
  extractor,
  source,
  *,
  image_size: int,
  mean: Sequence[float],
  std: Sequence[float],
  num_workers: int = 2,
  prefetch: int = 2,
  progress: bool = True,
  desc: str = 'features',
  preprocess: Preprocess | None = None,
) -> list[np.ndarray]:
  """Pooled level features of every image in ``source``, in source order.

  Args:
    extractor: a :class:`jax_gad.features.LevelExtractor`.
    source: sequence-like, ``source[i]['image']`` uint8 ``(H, W, 3)``. In a
      multi-host run every process must see the same source; each decodes
      only its own rows.
    image_size: square side the images are resized to (the extractor's).
    mean, std: the checkpoint's per-channel normalisation.
    num_workers: decoding threads.
    prefetch: batches decoded ahead.
    progress: show a progress bar.
    desc: its description.
    preprocess: replaces :func:`image_preprocessor` (``f(image) -> float32``).

  Returns:
    One float32 ``(len(source), C_l)`` array per level of the extractor.
  """
  n_images = _num_items(source)
  if n_images == 0:
    raise ValueError('source is empty: nothing to extract')
  if image_size != extractor.image_size:
    raise ValueError(
      f'image_size={image_size} differs from the extractor\'s {extractor.image_size}'
    )
  fn = preprocess or image_preprocessor(image_size, mean, std)
  batches = prefetch_batches(
    source,
    preprocess=fn,
    batch_size=extractor.batch_size,
    image_shape=(image_size, image_size, 3),
    rows=extractor.local_rows,
    num_workers=num_workers,
    prefetch=prefetch,
  )
  try:
    return extractor.extract(batches, n_images, progress=progress, desc=desc)
  finally:
    batches.close()
