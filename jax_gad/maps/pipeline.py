"""Anomaly maps for a category: stream training batches into per-fold fits, score the test split.

The unpooled level maps are never cached or stacked: :class:`MapExtractor`
runs the backbone on a global batch (sharded over the devices, as
:class:`jax_gad.features.LevelExtractor`) and returns the chosen levels'
maps on the device, where :func:`fit_folds` adds them to per-location
statistics at once. Memory is therefore the statistics plus one batch,
whatever the number of training images.

Folds: every training image belongs to the fitting part of some folds. The
images with the same fold membership form a *part* (for 5-fold KFold, the 5
held-out chunks); statistics are accumulated per part (each image once) and
fold k's statistics are the merge of the parts inside its fitting set, so one
pass over the training images serves every fold.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from jax_gad import features, files, metrics, report
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
# Added to every per-location covariance after Ledoit-Wolf shrinkage (PaDiM: 0.01 I); bounds the
# distance where the training features barely vary (a flat background). docs/maps.md.
DEFAULT_RIDGE = 0.01


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


@functools.partial(jax.jit, static_argnames=('module', 'levels', 'channels', 'mesh'))
def _level_maps(variables, images, *, module, levels, channels, mesh):
  maps = module.apply(variables, images)
  out = []
  for i, level in enumerate(levels):
    m = maps[level].astype(jnp.float32)
    if channels is not None and channels[i] is not None:
      m = m[..., jnp.asarray(channels[i])]
    out.append(m)
  # Stay sharded over the batch: the statistics are reduced on the devices.
  return jax.lax.with_sharding_constraint(tuple(out), NamedSharding(mesh, P(mesh.axis_names[0])))


@functools.partial(jax.jit, static_argnames='mesh')
def _replicated(x, *, mesh):
  """``x`` replicated on every device, so every process (multi-host) can read it."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


class MapExtractor(features.LevelExtractor):
  """A :class:`~jax_gad.features.LevelExtractor` returning unpooled float32 level maps.

  Calling it on a global batch returns one ``(batch_size, h_l, w_l, C_l)``
  array per level, left sharded over the batch axis on the devices.
  """

  def __init__(
    self,
    module,
    variables,
    *,
    image_size: int,
    levels: Sequence[int],
    channels: Sequence | None = None,
    mesh=None,
    batch_size: int = 8,
  ):
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

  def _lower(self, spec):
    return _level_maps.lower(
      self.variables,
      spec,
      module=self.module,
      levels=self.levels,
      channels=self.channels,
      mesh=self.mesh,
    )

  def map_shapes(self) -> list[tuple[int, int, int]]:
    """(h, w, C) of each returned level map."""
    return [tuple(int(s) for s in o.shape[1:]) for o in self.compiled.out_info]


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


def fit_folds(
  extractor: MapExtractor,
  source,
  fold_indices: Sequence[np.ndarray],
  *,
  preprocess,
  settings: MapSettings,
  num_workers: int = 2,
  progress=None,
) -> list[list[mfit.MapState]]:
  """Streams the training images once and fits per-location Gaussians for every fold.

  Args:
    extractor: a :class:`MapExtractor`.
    source: the training split (sequence of ``{'image': uint8}``).
    fold_indices: per fold, the training indices it fits on.
    preprocess: ``f(image) -> float32 (S, S, 3)``.
    settings: :class:`MapSettings`.
    num_workers: decoding threads.
    progress: optional callable(n_images) after each batch.

  Returns:
    ``states[fold][level_position]``: a :class:`~jax_gad.maps.fit.MapState`.
  """
  n = len(source)
  part, per_fold = fold_parts(n, fold_indices)
  shapes = extractor.map_shapes()
  n_parts = int(part.max()) + 1
  stats = [[None] * len(shapes) for _ in range(n_parts)]
  batch = extractor.batch_size
  batches = _batches(extractor, source, preprocess, num_workers)
  try:
    for b, local in enumerate(batches):
      maps = extractor(extractor.device_batch(local))
      index = b * batch + np.arange(batch)
      owner = np.where(index < n, part[np.minimum(index, n - 1)], -1)
      for p in np.unique(owner[owner >= 0]):
        mask = jnp.asarray(owner == p)
        for i, m in enumerate(maps):
          if stats[p][i] is None:
            stats[p][i] = mfit.empty(shapes[i])
          stats[p][i] = mfit.accumulate(stats[p][i], m, mask)
      if progress is not None:
        progress(int(min(batch, n - b * batch)))
  finally:
    batches.close()
  states = []
  for parts in per_fold:
    fold_states = []
    for i in range(len(shapes)):
      total = None
      for p in parts:
        total = stats[p][i] if total is None else mfit.merge(total, stats[p][i])
      fold_states.append(mfit.finalize(total, settings.shrinkage, settings.ridge))
    states.append(fold_states)
  return states


def score_folds(
  extractor: MapExtractor,
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
  category: str, maps: np.ndarray, folds: Sequence[int], source, image_auroc_fn
) -> tuple[list[FoldMaps], list, list]:
  """Metrics of each fold's maps against the test masks, at the original image sizes.

  Args:
    category: name.
    maps: (n_folds, n_test, S, S) from :func:`score_folds`.
    folds: the fold numbers of ``maps``' first axis.
    source: the test split (``image``, ``mask``, ``label`` per item).
    image_auroc_fn: ``f(scores, labels) -> float`` (jax_gad.metrics.auroc).

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
  return out, masks, sizes


def overlay_paths(category: str, source, per_type: int = 2) -> list[str]:
  """Workdir-relative paths of the overlays :func:`write_overlays` writes for ``source``."""
  chosen = moverlay.select(list(source.defect_types), per_type)
  return [
    os.path.join('overlays', category, moverlay.file_name(i, source.file_names[i])) for i in chosen
  ]


def write_overlays(
  folder: str,
  category: str,
  source,
  maps_fold: np.ndarray,
  sizes,
  masks,
  fold: int,
  scale: tuple,
  per_type: int = 2,
) -> None:
  """Overlay PNGs of the documented subset (:func:`jax_gad.maps.overlay.select`) for one fold.

  ``scale``: (vmin, vmax) of the heat maps, from normal images (:func:`normal_scale`).
  """
  chosen = moverlay.select(list(source.defect_types), per_type)
  if not chosen:
    return
  vmin, vmax = scale
  sub = os.path.join(folder, 'overlays', category)
  os.makedirs(sub, exist_ok=True)
  full = postprocess.to_original(maps_fold[chosen], [sizes[i] for i in chosen])
  for j, i in enumerate(chosen):
    name = moverlay.file_name(i, source.file_names[i])
    title = f'{category} / {source.defect_types[i]} (fold {fold}), max {float(full[j].max()):.2f}'
    moverlay.write_overlay(
      os.path.join(sub, name),
      source[i]['image'],
      full[j],
      masks[i],
      vmin=vmin,
      vmax=vmax,
      title=title,
    )


def save_maps(folder: str, category: str, maps: np.ndarray, folds: Sequence[int], source) -> str:
  """Writes ``maps_<category>.npz``: one (n_test, S, S) float32 array per fold + names, labels."""
  path = os.path.join(folder, f'maps_{category}.npz')
  arrays = {f'fold_{f}': maps[k] for k, f in enumerate(folds)}
  arrays['file_names'] = np.asarray(source.file_names)
  arrays['labels'] = np.asarray(source.labels)
  files.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
  return path


def summarize(runs: Sequence[FoldMaps]) -> list[dict]:
  """Per category and overall: mean ± SEM (x100) over folds of the three map metrics."""
  rows = []
  categories = sorted({r.category for r in runs})
  for name, sel in [(c, [r for r in runs if r.category == c]) for c in categories] + [
    ('mean', list(runs))
  ]:
    row = {'category': name}
    for field in ('image_auroc', 'pixel_auroc', 'aupro'):
      values = [100 * getattr(r, field) for r in sel if getattr(r, field) is not None]
      if values:
        row[f'{field}_mean'], row[f'{field}_sem'] = metrics.mean_sem(values)
      else:
        row[f'{field}_mean'] = row[f'{field}_sem'] = None
    rows.append(row)
  return rows


def _cell(mean, sem) -> str:
  return 'no masks' if mean is None else report.fmt_cell(mean, sem)


def table_markdown(rows: Sequence[dict], pooled: dict | None = None) -> str:
  """Markdown: per category, image AUROC (pooled Sum, map max), pixel AUROC, AUPRO."""
  lines = [
    '| Category | Image AUROC (pooled) | Image AUROC (map max) | Pixel AUROC | AUPRO |',
    '|---|---|---|---|---|',
  ]
  for row in rows:
    pooled_cell = (pooled or {}).get(row['category'], '-')
    lines.append(
      f"| {row['category']} | {pooled_cell} | "
      f"{_cell(row['image_auroc_mean'], row['image_auroc_sem'])} | "
      f"{_cell(row['pixel_auroc_mean'], row['pixel_auroc_sem'])} | "
      f"{_cell(row['aupro_mean'], row['aupro_sem'])} |"
    )
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# One run of `jax_gad.main --maps`: per category, the document, the files
# ---------------------------------------------------------------------------


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


def run_category(
  category: str,
  train,
  test,
  fold_indices: Sequence[np.ndarray],
  folds: Sequence[int],
  *,
  module,
  variables,
  arch: str,
  image_size: int,
  mean,
  std,
  settings: MapSettings,
  mesh,
  batch_size: int,
  num_workers: int,
  keep_all_folds: bool = True,
) -> CategoryMaps:
  """Per-location fits streamed over the training batches, test maps and their metrics.

  With ``keep_all_folds=False`` the result keeps only the first fold's maps
  (what the overlays use), not every fold's (what ``--save_maps`` writes).
  """
  extractor = MapExtractor(
    module,
    variables,
    image_size=image_size,
    levels=settings.levels,
    channels=settings.channels,
    mesh=mesh,
    batch_size=batch_size,
  )
  preprocess = data_pipeline.image_preprocessor(image_size, mean, std)
  states = fit_folds(
    extractor,
    train,
    fold_indices,
    preprocess=preprocess,
    settings=settings,
    num_workers=num_workers,
  )
  maps = score_folds(
    extractor, test, states, preprocess=preprocess, settings=settings, num_workers=num_workers
  )
  scale = normal_scale(
    extractor, train, fold_indices[0], states[0], preprocess=preprocess, settings=settings
  )
  del states
  runs, masks, sizes = evaluate_category(category, maps, folds, test, metrics.auroc)
  has_masks = runs[0].pixel_auroc is not None
  if not has_masks:
    logging.warning("category %s has no defect masks: map metrics are image-level only.", category)
  if not keep_all_folds:
    maps = maps[:1].copy()  # a copy, so that the other folds' memory is freed
  return CategoryMaps(runs, maps, test, masks, sizes, has_masks, scale)


def settings_for(
  arch: str,
  levels: Sequence[int],
  k_channels: int | None,
  rule: str,
  sigma: float,
  ridge: float = DEFAULT_RIDGE,
) -> MapSettings:
  """The map settings of a run: default levels for ``arch``, channel subsets drawn once."""
  levels = tuple(levels) or default_map_levels(arch)
  widths = efficientnet.level_widths(arch)
  channels = channel_subsets([widths[l] for l in levels], k_channels)
  ridge = mfit.check_ridge(ridge)
  return MapSettings(levels=levels, channels=channels, ridge=ridge, rule=rule, sigma=sigma)


def document(settings: MapSettings, k_channels: int | None, outputs: dict) -> dict:
  """The ``maps`` entry of results.json."""
  runs = [r for out in outputs.values() for r in out.runs]
  return {
    "levels": list(settings.levels),
    "channels": k_channels,
    "combine": settings.rule,
    "sigma": settings.sigma,
    "ridge": settings.ridge,
    "fpr_limit": mmetrics.DEFAULT_FPR_LIMIT,
    "runs": [r._asdict() for r in runs],
    "per_category": summarize(runs),
    "no_masks": sorted(c for c, out in outputs.items() if not out.has_masks),
    "overlays": {c: overlay_paths(c, out.test) for c, out in outputs.items()},
  }


def _pooled_cells(doc) -> dict:
  """Sum-row Mahalanobis cells of the pooled tables, per category and overall."""
  cells = {}
  for row in doc["per_category"]:
    if row["level"] == report.SUM and "mahalanobis_mean" in row:
      cells[row["category"]] = report.fmt_cell(row["mahalanobis_mean"], row["mahalanobis_sem"])
  for row in doc["table1"]:
    if row["level"] == report.SUM and "mahalanobis_mean" in row:
      cells["mean"] = report.fmt_cell(row["mahalanobis_mean"], row["mahalanobis_sem"])
  return cells


def table(doc) -> str:
  """The per-category maps table (markdown) of a results document with ``maps``."""
  text = table_markdown(doc["maps"]["per_category"], _pooled_cells(doc))
  if doc["maps"]["no_masks"]:
    text += "\nNo defect masks (image metrics only): " + ", ".join(doc["maps"]["no_masks"]) + "\n"
  return text


def write_outputs(
  folder: str, doc: dict, outputs: dict, folds: Sequence[int], save_raw: bool
) -> None:
  """Overlays (first evaluated fold), raw maps if asked, and the maps table."""
  for c, out in outputs.items():
    write_overlays(folder, c, out.test, out.maps[0], out.sizes, out.masks, folds[0], out.scale)
    if save_raw:
      save_maps(folder, c, out.maps, folds, out.test)
  files.atomic_write(os.path.join(folder, "maps.md"), table(doc))
  files.atomic_write(os.path.join(folder, "maps.csv"), report.csv_text(doc["maps"]["per_category"]))
