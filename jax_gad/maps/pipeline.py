"""Anomaly maps of a category: training batches streamed into per-fold fits, test maps, metrics.

The path of an image, as for the pooled features: a worker thread decodes and
resizes it (:func:`jax_gad.data.pipeline.prefetch_batches`);
:class:`jax_gad.features.MapExtractor` runs the backbone on a global batch
(sharded over the devices) and returns the chosen levels' unpooled maps on the
device, where :func:`stream_parts` adds them to per-location statistics at once
(:mod:`jax_gad.maps.fit`). The maps are never cached or stacked: memory is the
statistics plus one batch, whatever the number of training images.
:func:`score_folds` turns each test batch into one combined, blurred map per
fold (:mod:`jax_gad.maps.postprocess`), :func:`evaluate_category` scores them
against the masks (:mod:`jax_gad.maps.metrics`) and :mod:`jax_gad.maps.report`
writes the tables and files.

Folds: every training image belongs to the fitting part of some folds. The
images with the same fold membership form a *part* (for 5-fold KFold, the 5
held-out chunks); statistics are accumulated per part (each image once) and
fold k's statistics are the merge of the parts inside its fitting set, so one
pass over the training images serves every fold.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from jax_gad import features, metrics
from jax_gad.data import pipeline as data_pipeline
from jax_gad.maps import fit as mfit
from jax_gad.maps import metrics as mmetrics
from jax_gad.maps import overlay as moverlay
from jax_gad.maps import postprocess
from jax_gad.models import efficientnet

# Measured on the synthetic set with EfficientNet-Lite0 (docs/maps.md); B4 by analogy
# (the same stages: 1/8 and 1/16 of the input), not measured on MVTec AD.
DEFAULT_MAP_LEVELS = {'efficientnet-lite0': (3, 4, 5), 'efficientnet-b4': (3, 4, 5)}
FALLBACK_MAP_LEVELS = (3, 4, 5)


def default_map_levels(arch: str) -> tuple[int, ...]:
  """The documented default ``--map_levels`` of an architecture."""
  return DEFAULT_MAP_LEVELS.get(arch, FALLBACK_MAP_LEVELS)


class MapSettings(NamedTuple):
  """How maps are fitted and postprocessed.

  Attributes:
    levels: level indices whose maps are modelled.
    channels: per level, kept channel indices (a fixed random subset) or None (all).
    shrinkage: ``'ledoit_wolf'`` or a fixed coefficient.
    ridge: fixed ridge added to every per-location covariance.
    rule: level combination rule (:data:`postprocess.COMBINE_RULES`).
    sigma: blur standard deviation in network-input pixels.
  """

  levels: tuple
  channels: tuple | None = None
  shrinkage: str | float = 'ledoit_wolf'
  ridge: float = 0.0
  rule: str = 'mean'
  sigma: float = postprocess.DEFAULT_SIGMA


@functools.partial(jax.jit, static_argnames='mesh')
def _replicated(x, *, mesh):
  """``x`` replicated on every device, so every process (multi-host) can read it."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def channel_subsets(widths: Sequence[int], k: int | None, seed: int = 0) -> tuple | None:
  """Per level of ``widths`` channels, a fixed random subset of k (None when k is None)."""
  if k is None:
    return None
  return tuple(tuple(mfit.random_channels(c, k, seed + i).tolist()) for i, c in enumerate(widths))


def _batches(extractor, source, preprocess, num_workers):
  return data_pipeline.prefetch_batches(
    source,
    preprocess=preprocess,
    batch_size=extractor.batch_size,
    image_shape=(extractor.image_size, extractor.image_size, 3),
    rows=extractor.local_rows,
    num_workers=num_workers,
  )


def _count(pending, progress) -> None:
  """Waits for a batch's statistics, then reports its images to ``progress`` (if any)."""
  if pending is not None:
    jax.block_until_ready(pending[1])
    if progress is not None:
      progress(pending[0])


def fold_parts(n_train: int, fold_indices: Sequence[np.ndarray]) -> tuple[np.ndarray, list]:
  """(part of each training image, per fold the parts it fits on); part -1 = used by no fold."""
  member = np.zeros((n_train, len(fold_indices)), bool)
  for k, idx in enumerate(fold_indices):
    member[np.asarray(idx, np.int64), k] = True
  keys, part = np.unique(member, axis=0, return_inverse=True)
  part = part.reshape(-1)
  unused = [p for p, key in enumerate(keys) if not key.any()]
  part = np.where(np.isin(part, unused), -1, part)
  per_fold = [[p for p, key in enumerate(keys) if key[k]] for k in range(len(fold_indices))]
  return part, per_fold


def stream_parts(
  extractor: features.MapExtractor,
  source,
  part: np.ndarray,
  *,
  preprocess,
  num_workers: int = 2,
  progress=None,
) -> list[list]:
  """Streams the training images once into per-location statistics of each part.

  Args:
    extractor: a :class:`~jax_gad.features.MapExtractor`.
    source: the training split (sequence of ``{'image': uint8}``).
    part: per training image, its part (:func:`fold_parts`; -1: used by no fold).
    preprocess: ``f(image) -> float32 (S, S, 3)``.
    num_workers: decoding threads.
    progress: optional callable(n_images) once a batch's statistics are computed.

  Returns:
    ``stats[part][level_position]``: streaming statistics (:func:`jax_gad.maps.fit.accumulate`).
  """
  n = len(source)
  shapes = extractor.map_shapes()
  stats = [[None] * len(shapes) for _ in range(int(part.max()) + 1)]
  batch = extractor.batch_size
  batches = _batches(extractor, source, preprocess, num_workers)
  pending = None  # (images, statistics) of the previous batch, counted once computed
  try:
    for b, local in enumerate(batches):
      maps = extractor(extractor.device_batch(local))
      index = b * batch + np.arange(batch)
      owner = np.where(index < n, part[np.minimum(index, n - 1)], -1)
      # Batch b's maps are queued; wait for b - 1's statistics (before they are donated to
      # b's), so that the count follows the devices.
      _count(pending, progress)
      touched = [maps]
      for p in np.unique(owner[owner >= 0]):
        mask = jnp.asarray(owner == p)
        for i, m in enumerate(maps):
          if stats[p][i] is None:
            stats[p][i] = mfit.empty(shapes[i])
          stats[p][i] = mfit.accumulate(stats[p][i], m, mask)
        touched.append(list(stats[p]))
      pending = (int(min(batch, n - b * batch)), touched)
    _count(pending, progress)
  finally:
    batches.close()
  return stats


def finalize_folds(
  stats: Sequence[Sequence], per_fold: Sequence[Sequence[int]], settings: MapSettings, progress=None
) -> list[list[mfit.MapState]]:
  """Per fold, the merge of its parts' statistics, finalized into per-location Gaussians.

  Args:
    stats: from :func:`stream_parts`.
    per_fold: per fold, the parts it fits on (:func:`fold_parts`).
    settings: :class:`MapSettings` (shrinkage, ridge).
    progress: optional callable(1) once a fold's Gaussians are computed.

  Returns:
    ``states[fold][level_position]``: a :class:`~jax_gad.maps.fit.MapState`.
  """
  states = []
  for parts in per_fold:
    fold_states = []
    for i in range(len(stats[parts[0]])):
      total = None
      for p in parts:
        total = stats[p][i] if total is None else mfit.merge(total, stats[p][i])
      fold_states.append(mfit.finalize(total, settings.shrinkage, settings.ridge))
    states.append(fold_states)
    _count((1, fold_states), progress)
  return states


def score_folds(
  extractor: features.MapExtractor,
  source,
  states: Sequence[Sequence[mfit.MapState]],
  *,
  preprocess,
  settings: MapSettings,
  num_workers: int = 2,
  progress=None,
) -> np.ndarray:
  """Anomaly maps of every test image under every fold's fit, at the network input size.

  Returns:
    float32 (n_folds, n_images, S, S): per-level Mahalanobis maps resized to
    S x S, combined and blurred (:func:`jax_gad.maps.postprocess.combine`).
  """
  n = len(source)
  size = extractor.image_size
  widths = [s[2] for s in extractor.map_shapes()]
  out = np.zeros((len(states), n, size, size), np.float32)
  batch = extractor.batch_size
  batches = _batches(extractor, source, preprocess, num_workers)
  try:
    for b, local in enumerate(batches):
      maps = extractor(extractor.device_batch(local))
      start = b * batch
      stop = min(start + batch, n)
      for k, fold_states in enumerate(states):
        dists = [mfit.score(st, m) for st, m in zip(fold_states, maps)]
        combined = postprocess.combine(
          dists, size, rule=settings.rule, widths=widths, sigma=settings.sigma
        )
        combined = _replicated(combined, mesh=extractor.mesh)
        out[k, start:stop] = np.asarray(jax.device_get(combined))[: stop - start]
      if progress is not None:
        progress(stop - start)
  finally:
    batches.close()
  return out


class FoldMaps(NamedTuple):
  """Map metrics of one (category, fold)."""

  category: str
  fold: int
  image_auroc: float  # image score = max of the map
  pixel_auroc: float | None  # None: the category has no masks
  aupro: float | None


def evaluate_category(
  category: str, maps: np.ndarray, folds: Sequence[int], source, image_auroc_fn, progress=None
) -> tuple[list[FoldMaps], list, list]:
  """Metrics of each fold's maps against the test masks, at the original image sizes.

  Args:
    category: name.
    maps: (n_folds, n_test, S, S) from :func:`score_folds`.
    folds: the fold numbers of ``maps``' first axis.
    source: the test split (``image``, ``mask``, ``label`` per item).
    image_auroc_fn: ``f(scores, labels) -> float`` (jax_gad.metrics.auroc).
    progress: optional callable(1) after each fold's metrics.

  Returns:
    (one :class:`FoldMaps` per fold, the test masks, the original sizes).
  """
  masks, sizes, labels = [], [], []
  for i in range(len(source)):
    item = source[i]
    mask = item.get('mask')
    shape = np.asarray(item['image']).shape[:2]
    masks.append(None if mask is None else np.asarray(mask))
    sizes.append(shape)
    labels.append(int(item['label']))
  labels = np.asarray(labels)
  has_masks = all(m is not None for m in masks) and any(m.any() for m in masks if m is not None)
  out = []
  for k, fold in enumerate(folds):
    full = postprocess.to_original(maps[k], sizes)
    scores = postprocess.image_scores(full)
    pix = aupro = None
    if has_masks:
      result = mmetrics.pixel_metrics(full, masks)
      pix, aupro = result.pixel_auroc, result.aupro
    out.append(FoldMaps(category, int(fold), float(image_auroc_fn(scores, labels)), pix, aupro))
    del full
    if progress is not None:
      progress(1)
  return out, masks, sizes


# ---------------------------------------------------------------------------
# One category of a `jax_gad.main --maps` run
# ---------------------------------------------------------------------------


def settings_for(
  arch: str,
  levels: Sequence[int],
  k_channels: int | None,
  rule: str,
  sigma: float,
  ridge: float,
) -> MapSettings:
  """The map settings of a run: default levels for ``arch``, channel subsets drawn once.

  ``ridge`` is added to every per-location covariance after the Ledoit-Wolf
  shrinkage (``--map_ridge``, whose default is PaDiM's 0.01); it bounds the
  distance where the training features barely vary (a flat background).

  Raises:
    ValueError: ``k_channels`` above the width of a map level (refused, not
      silently capped, so results.json never records a number that was not used).
  """
  levels = tuple(levels) or default_map_levels(arch)
  widths = efficientnet.level_widths(arch)
  narrow = min(levels, key=lambda l: widths[l])
  if k_channels is not None and k_channels > widths[narrow]:
    raise ValueError(
      f"--map_channels={k_channels} exceeds the {widths[narrow]} channels of map level {narrow} "
      f"({arch} map levels {list(levels)} have {[widths[l] for l in levels]} channels): give at "
      f"most {widths[narrow]}, or leave it out to keep every channel"
    )
  channels = channel_subsets([widths[l] for l in levels], k_channels)
  ridge = mfit.check_ridge(ridge)
  return MapSettings(levels=levels, channels=channels, ridge=ridge, rule=rule, sigma=sigma)


class MapRun(NamedTuple):
  """How a run computes its maps, the same for every category (:func:`prepare`).

  Attributes:
    extractor: the :class:`~jax_gad.features.MapExtractor` of the settings' levels.
    preprocess: ``f(uint8 image) -> float32 (S, S, 3)`` network input.
    settings: :class:`MapSettings`.
    num_workers: decoding threads.
    keep_all_folds: keep every fold's maps (``--save_maps``), else only the first
      fold's (what the overlays draw).
  """

  extractor: features.MapExtractor
  preprocess: Callable
  settings: MapSettings
  num_workers: int = 2
  keep_all_folds: bool = True


def prepare(
  settings: MapSettings,
  pooled: features.LevelExtractor,
  mean: Sequence[float],
  std: Sequence[float],
  num_workers: int = 2,
  keep_all_folds: bool = True,
) -> MapRun:
  """A :class:`MapRun` on the backbone, mesh, input size and batch of the ``pooled`` extractor."""
  extractor = features.MapExtractor(
    pooled.module,
    pooled.variables,
    image_size=pooled.image_size,
    levels=settings.levels,
    channels=settings.channels,
    mesh=pooled.mesh,
    batch_size=pooled.batch_size,
  )
  preprocess = data_pipeline.image_preprocessor(pooled.image_size, mean, std)
  return MapRun(extractor, preprocess, settings, num_workers, keep_all_folds)


class _Subset:
  """The items ``indices`` of a source, as a source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, [int(i) for i in indices]

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[i]]


def normal_scale(
  extractor, train, fit_indices, fold_states, *, preprocess, settings, num_workers: int = 2
) -> tuple[float, float]:
  """Overlay colour scale of one fold: percentiles of its held-out training images' maps.

  Those images are normal and unseen by the fold's fit, so the scale is that
  of new normal images (:func:`jax_gad.maps.overlay.scaled`).
  """
  held = np.setdiff1d(np.arange(len(train)), np.asarray(fit_indices, np.int64))
  if held.size == 0:
    raise ValueError("the fold fits on every training image: no held-out image sets the scale")
  maps = score_folds(
    extractor,
    _Subset(train, held),
    [fold_states],
    preprocess=preprocess,
    settings=settings,
    num_workers=num_workers,
  )
  return moverlay.color_scale(maps)


class CategoryMaps(NamedTuple):
  """What :func:`run_category` computes for one category."""

  runs: list  # FoldMaps per evaluated fold
  maps: np.ndarray  # (n_folds, n_test, S, S) float32; n_folds = 1 unless all are kept
  test: object  # the test split
  masks: list
  sizes: list
  has_masks: bool
  scale: tuple  # (vmin, vmax) of the first fold's overlays, from its held-out training images


@contextlib.contextmanager
def _progress_bar(total: int, desc: str, unit: str):
  """A :class:`~jax_gad.features.ProgressBar` on process 0 (None elsewhere), closed at the end.

  Like the pooled extraction's bars, it starts its clock after the first step,
  whose compilation would inflate the ETA.
  """
  if jax.process_index() != 0:
    yield None
    return
  bar = features.ProgressBar(total, desc, unit)
  try:
    yield bar
  finally:
    bar.close()


def run_category(
  category: str,
  train,
  test,
  fold_indices: Sequence[np.ndarray],
  folds: Sequence[int],
  run: MapRun,
) -> CategoryMaps:
  """Per-location fits streamed over the training batches, test maps and their metrics.

  Progress bars count the training images streamed (one pass serves every
  fold), the folds whose Gaussians are computed, the test images scored
  (every fold scores each batch) and the folds whose metrics are computed.
  Each starts its clock after its first step (which compiles).

  Args:
    category: name.
    train: the training split (``image`` per item).
    test: the test split (``image``, ``mask``, ``label`` per item).
    fold_indices: per evaluated fold, the training indices it fits on.
    folds: the fold numbers of ``fold_indices``.
    run: the run's :class:`MapRun`.
  """
  ex, settings = run.extractor, run.settings
  ex.compile()
  part, per_fold = fold_parts(len(train), fold_indices)
  with _progress_bar(len(train), f'{category}/maps fit ({len(folds)} folds)', 'img') as bar:
    stats = stream_parts(
      ex,
      train,
      part,
      preprocess=run.preprocess,
      num_workers=run.num_workers,
      progress=bar and bar.update,
    )
  with _progress_bar(len(folds), f'{category}/maps Gaussians', 'fold') as bar:
    states = finalize_folds(stats, per_fold, settings, progress=bar and bar.update)
  del stats
  with _progress_bar(len(test), f'{category}/maps test', 'img') as bar:
    maps = score_folds(
      ex,
      test,
      states,
      preprocess=run.preprocess,
      settings=settings,
      num_workers=run.num_workers,
      progress=bar and bar.update,
    )
  scale = normal_scale(
    ex, train, fold_indices[0], states[0], preprocess=run.preprocess, settings=settings
  )
  del states
  with _progress_bar(len(folds), f'{category}/maps metrics', 'fold') as bar:
    runs, masks, sizes = evaluate_category(
      category, maps, folds, test, metrics.auroc, progress=bar and bar.update
    )
  has_masks = runs[0].pixel_auroc is not None
  if not has_masks:
    logging.warning("category %s has no defect masks: map metrics are image-level only.", category)
  if not run.keep_all_folds:
    maps = maps[:1].copy()  # a copy, so that the other folds' memory is freed
  return CategoryMaps(runs, maps, test, masks, sizes, has_masks, scale)
