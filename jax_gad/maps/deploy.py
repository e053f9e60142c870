"""Anomaly maps for a saved detector: fit with a calibrated pixel threshold, score new images.

``python -m jax_gad.fit --maps`` calls :func:`calibrate`: one pass over the
training images accumulates the per-location statistics of every calibration
fold and of all images together (:func:`fit_states`:
constant memory in the number of images); a second pass scores every training
image with the fold that did not see it. From those out-of-fold maps of
normal images come

* the **pixel threshold**: the out-of-fold pixel quantile at the detector's
  target false-positive rate, by the rule of the image threshold (the
  ``ceil(m (1 - a))``-th smallest of the ``m`` pixels), so at most a fraction
  ``a`` of normal pixels lies above it;
* the **colour scale** of the overlays: the 1st and 99.9th percentiles of the
  same pixels (:func:`jax_gad.maps.overlay.color_scale`). It never depends on the image being
  drawn, so a defect shows as the top of the scale (saturating above it) and
  a normal image looks normal.

The out-of-fold maps are kept at the network input size until the quantiles
are taken: ``n S^2`` float32 (40 MB for 200 images at 224 px).

``python -m jax_gad.predict --maps_dir`` calls :class:`MapScorer` per batch
(the same per-location Mahalanobis distances, resizing, level combination and
blur as ``main --maps``: :func:`jax_gad.maps.postprocess.combine`) and
:func:`write_image_maps` per image (the map at the image's own size as
``.npy``, and the overlay ``.png``).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

import jax
import numpy as np

from jax_gad import features, files
from jax_gad.maps import fit as mfit
from jax_gad.maps import overlay as moverlay
from jax_gad.maps import pipeline as mp
from jax_gad.maps import postprocess


class MapModel(NamedTuple):
  """Fitted per-location Gaussians of a detector, with their calibration.

  Attributes:
    states: one :class:`jax_gad.maps.fit.MapState` per map level, fitted on all
      training images.
    threshold: pixel threshold at the target false-positive rate (out of fold).
    scale: (vmin, vmax) colour scale of the overlays, from the out-of-fold maps.
  """

  states: tuple
  threshold: float
  scale: tuple


def pixel_threshold(maps: np.ndarray, target_fpr: float) -> float:
  """The ``ceil(m (1 - a))``-th smallest of the ``m`` pixels of ``maps`` (inverted-CDF quantile)."""
  values = np.asarray(maps, np.float32).ravel()
  k = max(math.ceil(values.size * (1.0 - float(target_fpr)) - 1e-12), 1) - 1
  return float(np.partition(values, k)[k])


def held_out_fold(n: int, fold_indices: Sequence[np.ndarray]) -> np.ndarray:
  """(n,) the fold that does not fit on each image; ValueError unless there is exactly one."""
  member = np.zeros((n, len(fold_indices)), bool)
  for k, idx in enumerate(fold_indices):
    member[np.asarray(idx, np.int64), k] = True
  held = ~member
  counts = held.sum(axis=1)
  if not np.all(counts == 1):
    bad = int(np.flatnonzero(counts != 1)[0])
    raise ValueError(
      f"training image {bad} is held out by {int(counts[bad])} folds; "
      "out-of-fold maps need exactly one"
    )
  return np.argmax(held, axis=1)


def batch_maps(extractor, states: Sequence[mfit.MapState], settings, level_maps) -> np.ndarray:
  """(batch_size, S, S) float32 anomaly maps of one batch's level maps under ``states``."""
  widths = [s[2] for s in extractor.map_shapes()]
  dists = [mfit.score(st, m) for st, m in zip(states, level_maps)]
  combined = postprocess.combine(
    dists, extractor.image_size, rule=settings.rule, widths=widths, sigma=settings.sigma
  )
  combined = mp._replicated(combined, mesh=extractor.mesh)
  return np.asarray(jax.device_get(combined), np.float32)


def out_of_fold_maps(
  extractor, source, fold_indices, fold_states, *, preprocess, settings, num_workers=2
) -> np.ndarray:
  """(n, S, S) float32: each training image's map under the fold that did not fit on it."""
  n = len(source)
  held = held_out_fold(n, fold_indices)
  size = extractor.image_size
  out = np.zeros((n, size, size), np.float32)
  batch = extractor.batch_size
  batches = mp._batches(extractor, source, preprocess, num_workers)
  try:
    for b, local in enumerate(batches):
      level_maps = extractor(extractor.device_batch(local))
      start, stop = b * batch, min(b * batch + batch, n)
      rows = held[start:stop]
      for k in np.unique(rows):
        maps = batch_maps(extractor, fold_states[k], settings, level_maps)
        sel = np.flatnonzero(rows == k)
        out[start + sel] = maps[sel]
  finally:
    batches.close()
  return out


def fit_states(
  extractor, source, fold_indices, *, preprocess, settings, num_workers=2, progress=None
) -> list[list[mfit.MapState]]:
  """Per fold of ``fold_indices``, its per-location Gaussians (one pass over ``source``)."""
  part, per_fold = mp.fold_parts(len(source), fold_indices)
  stats = mp.stream_parts(
    extractor, source, part, preprocess=preprocess, num_workers=num_workers, progress=progress
  )
  return mp.finalize_folds(stats, per_fold, settings)


def calibrate(
  extractor,
  source,
  fold_indices: Sequence[np.ndarray],
  *,
  preprocess,
  settings,
  target_fpr: float,
  num_workers: int = 2,
  progress=None,
) -> MapModel:
  """Per-location Gaussians on all of ``source``, pixel threshold and colour scale out of fold.

  Args:
    extractor: a :class:`jax_gad.features.MapExtractor` of ``settings``' levels.
    source: the training split (normal images).
    fold_indices: per calibration fold, the training indices it fits on (each
      image held out by exactly one fold, as KFold's).
    preprocess: ``f(image) -> float32 (S, S, 3)``.
    settings: :class:`jax_gad.maps.pipeline.MapSettings`.
    target_fpr: false-positive rate of the pixel threshold, in (0, 1).
    num_workers: decoding threads.
    progress: optional callable(n_images) after each training batch.

  Returns:
    :class:`MapModel`.
  """
  n = len(source)
  fold_indices = [np.asarray(f, np.int64) for f in fold_indices]
  held_out_fold(n, fold_indices)  # checked before any work
  states = fit_states(
    extractor,
    source,
    fold_indices + [np.arange(n)],
    preprocess=preprocess,
    settings=settings,
    num_workers=num_workers,
    progress=progress,
  )
  oof = out_of_fold_maps(
    extractor,
    source,
    fold_indices,
    states[:-1],
    preprocess=preprocess,
    settings=settings,
    num_workers=num_workers,
  )
  return MapModel(tuple(states[-1]), pixel_threshold(oof, target_fpr), moverlay.color_scale(oof))


# ---------------------------------------------------------------------------
# Settings <-> the detector file's JSON header
# ---------------------------------------------------------------------------


def settings_to_json(settings) -> dict:
  """A :class:`~jax_gad.maps.pipeline.MapSettings` as plain JSON values."""
  return {
    "levels": [int(l) for l in settings.levels],
    "channels": None
    if settings.channels is None
    else [None if c is None else [int(i) for i in c] for c in settings.channels],
    "shrinkage": settings.shrinkage,
    "ridge": float(settings.ridge),
    "combine": settings.rule,
    "sigma": float(settings.sigma),
  }


def settings_from_json(doc: dict):
  """The inverse of :func:`settings_to_json`."""
  channels = doc["channels"]
  return mp.MapSettings(
    levels=tuple(int(l) for l in doc["levels"]),
    channels=None
    if channels is None
    else tuple(None if c is None else tuple(int(i) for i in c) for c in channels),
    shrinkage=doc["shrinkage"],
    ridge=float(doc["ridge"]),
    rule=str(doc["combine"]),
    sigma=float(doc["sigma"]),
  )


# ---------------------------------------------------------------------------
# Scoring new images
# ---------------------------------------------------------------------------


class MapScorer:
  """Anomaly maps of new images: one global batch of preprocessed images at a time."""

  def __init__(self, module, variables, *, image_size, states, settings, batch_size, mesh=None):
    self.settings = settings
    self.states = tuple(states)
    self.extractor = features.MapExtractor(
      module,
      variables,
      image_size=image_size,
      levels=settings.levels,
      channels=settings.channels,
      mesh=mesh,
      batch_size=batch_size,
    )

  def __call__(self, local_images: np.ndarray) -> np.ndarray:
    """(batch_size, S, S) float32 maps of one batch (this process's rows, padded)."""
    ex = self.extractor
    return batch_maps(ex, self.states, self.settings, ex(ex.device_batch(local_images)))


def output_stem(maps_dir: str, path: str, root: str) -> str:
  """``maps_dir/<path relative to root>``: the name the ``.npy`` and ``.png`` extend."""
  rel = os.path.relpath(path, root)
  if rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
    raise ValueError(f"{path} is not under the input folder {root}")
  return os.path.join(maps_dir, rel)


def write_image_maps(
  stem: str, image: np.ndarray, amap: np.ndarray, *, threshold: float, scale: tuple, title: str
) -> str:
  """Writes ``stem.npy`` (the map) and ``stem.png`` (the overlay) atomically; returns the .npy path.

  The overlay's heat map uses the fixed colour ``scale`` and outlines the
  predicted mask ``amap > threshold``.
  """
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  amap = np.asarray(amap, np.float32)
  npy = stem + ".npy"
  files.atomic_write(npy, lambda f: np.save(f, amap))
  moverlay.write_overlay(
    stem + ".png",
    image,
    amap,
    None,
    vmin=scale[0],
    vmax=scale[1],
    title=title,
    predicted=amap > threshold,
  )
  return npy


def original_maps(maps: np.ndarray, images: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Each (S, S) map resized to its image's own (height, width)."""
  return postprocess.to_original(maps, [np.asarray(im).shape[:2] for im in images])


class PredictMaps:
  """``predict --maps_dir``: maps of the batches the pooled extractor sees, written per image.

  :meth:`tee` passes the decoded batches through unchanged and scores each
  with :class:`MapScorer` on the way; :meth:`take` returns the maps of the
  next ``count`` images; :meth:`cells` writes one image's files (the image
  read again with ``read_image``, for its own size and the overlay) and gives
  its CSV cells.
  """

  def __init__(self, detector, maps_dir: str, root: str, batch_size: int, read_image):
    self.scorer = detector.map_scorer(batch_size)
    self.scorer.extractor.compile()  # now, not inside the caller's progress bar
    self.read_image = read_image
    self.maps_dir, self.root = maps_dir, root
    self.threshold, self.scale = float(detector.map_threshold), tuple(detector.map_scale)
    self._pending: list[np.ndarray] = []

  def tee(self, batches):
    for local_images in batches:
      self._pending.append(self.scorer(local_images))
      yield local_images

  def take(self, count: int) -> np.ndarray:
    """(count, S, S) maps of the next ``count`` images (the padding rows after them are dropped)."""
    maps = np.concatenate(self._pending)
    self._pending = []
    if maps.shape[0] < count:
      raise ValueError(f"scored {maps.shape[0]} maps, fewer than the {count} images of the chunk")
    return maps[:count]

  columns = ("map_max", "map_file")

  def blank(self) -> list:
    """The CSV cells of an image that could not be read."""
    return [""] * len(self.columns)

  def cells(self, path: str, maps: np.ndarray, i: int) -> list:
    """Writes the files of image ``path`` (``maps[i]``, from :meth:`take`); its CSV cells."""
    map_max, npy = self.write(path, self.read_image(path), maps[i])
    return [repr(map_max), npy]

  def write(self, path: str, image: np.ndarray, amap: np.ndarray) -> tuple[float, str]:
    """Writes the files of image ``path`` (``amap`` at the network size); (map max, .npy path)."""
    full = original_maps(amap[None], [image])[0]
    title = f"{os.path.relpath(path, self.root)}: max {float(full.max()):.2f}"
    title += f", predicted mask above {self.threshold:.2f}"
    stem = output_stem(self.maps_dir, path, self.root)
    npy = write_image_maps(
      stem, image, full, threshold=self.threshold, scale=self.scale, title=title
    )
    return float(full.max()), npy


class NoMaps:
  """:class:`PredictMaps`' interface for a run without ``--maps_dir``: no columns, no files."""

  columns = ()

  def tee(self, batches):
    return batches

  def take(self, count: int) -> None:
    del count

  def blank(self) -> list:
    return []

  def cells(self, path, maps, i) -> list:
    del path, maps, i
    return []


def map_writer(detector, maps_dir: str | None, root: str, batch_size: int, read_image):
  """:class:`PredictMaps` for ``maps_dir``, or :class:`NoMaps` when it is None."""
  if maps_dir is None:
    return NoMaps()
  return PredictMaps(detector, maps_dir, root, batch_size, read_image)
