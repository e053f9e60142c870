"""A detector for one category: what ``python -m jax_gad.fit`` runs.

The densities of every level are fitted on every training image (no folds);
the calibrated threshold comes from k-fold out-of-fold scores of those same
images (``calibration_folds``) at ``target_fpr``; see :mod:`jax_gad.detector`
and docs/own-images.md. No defect image is needed. With ``--maps`` the
detector also holds anomaly-map statistics (docs/maps.md).

The training features come through the feature cache (``cache_dir``), whose
entries ``python -m jax_gad.main`` also writes (same key, every level): a fit
after a main run on the same data and weights extracts nothing. With ``plots``
the histogram of the out-of-fold scores, with the threshold, is written beside
the detector (:func:`jax_gad.operating_point.histogram_path`).
"""

from __future__ import annotations

import os

import numpy as np

import jax_gad
from jax_gad import backbone as backbone_lib
from jax_gad import (
  config,
  data,
  detector,
  feature_cache,
  files,
  operating_point,
  protocol,
  report,
)
from jax_gad.data import pipeline
from jax_gad.models import efficientnet

ALL_LEVELS = tuple(range(efficientnet.NUM_LEVELS))


def fit(cfg: config.Fit, progress: bool = True) -> detector.Detector:
  """Fits a :class:`jax_gad.detector.Detector` on a category's training split.

  Args:
    cfg: the data (``cfg.data``; its ``categories`` are not used), the backbone,
      the levels and reduction, ``cfg.calibration`` (the category, the
      target false-positive rate and the k of the out-of-fold calibration)
      and ``cfg.maps``: with ``maps``, also per-location Gaussians of the
      map levels, a pixel threshold and an overlay colour scale
      (:func:`jax_gad.detector.fit_maps`; ``save_maps`` is refused: it is
      main's).
    progress: show progress bars, and say on the console where the features came from.

  Returns:
    The fitted detector, with its backbone attached (``Detector.score`` works).

  Raises:
    ValueError: bad options or data (one line naming the culprit), before any work.
  """
  if cfg.maps.save_maps:
    raise ValueError(
      "--save_maps is jax_gad.main's; fit --maps stores the map statistics in the detector "
      "and `jax_gad.predict --maps_dir` writes the maps"
    )
  config.validate(cfg)
  r = protocol.reduction_from(cfg.levels.pca, cfg.levels.npca)
  map_settings = detector.map_settings(cfg.backbone.arch, cfg.maps) if cfg.maps.maps else None
  d, b, cal = cfg.data, cfg.backbone, cfg.calibration
  if b.cache_dir and os.path.exists(b.cache_dir) and not os.path.isdir(b.cache_dir):
    raise ValueError(f"--cache_dir={b.cache_dir} is a file; give a folder, or '' to disable")
  train = data.load(d.dataset, cal.category, "train", data_dir=d.data_dir, tfds_dir=d.tfds_dir)
  needed = max(cal.calibration_folds, 3)
  if len(train) < needed:
    raise ValueError(
      f"{d.dataset} category {cal.category!r} has {len(train)} training images; "
      f"calibrating with {cal.calibration_folds} folds needs at least {needed}"
    )
  backbone, meta, sha = backbone_lib.load_backbone(
    b.arch, b.checkpoint, b.checkpoint_dir, b.dtype, b.depthwise_impl
  )
  size = int(b.image_size or meta["resolution"])
  feats = training_features(cfg, train, (backbone, meta, sha), size, progress)
  info = {
    "dataset": d.dataset,
    "category": cal.category,
    "n_train": len(train),
    "data_fingerprint": train.fingerprint,
    "checkpoint": backbone.path,
    "versions": jax_gad.versions(),
  }
  det = detector.fit_features(
    feats,
    levels=cfg.levels.levels,
    target_fpr=cal.target_fpr,
    n_folds=cal.calibration_folds,
    reduction=None if r is None else r._asdict(),
    arch=b.arch,
    checkpoint_sha256=sha,
    image_size=size,
    mean=tuple(float(v) for v in meta["mean"]),
    std=tuple(float(v) for v in meta["std"]),
    dtype=b.dtype,
    info=info,
  ).replace(backbone=backbone)
  if map_settings is not None:
    det = detector.fit_maps(
      det, train, map_settings, batch_size=b.batch_size, num_workers=b.num_workers
    )
  return det


def _extract(b: config.Backbone, loaded, train, levels, size: int, progress: bool) -> list:
  """Pooled features of the training images at ``levels`` (a list of arrays, one per level)."""
  backbone, meta, _ = loaded
  extractor = backbone.extractor(
    image_size=size, levels=levels, batch_size=min(b.batch_size, len(train))
  )
  return pipeline.pooled_features(
    extractor,
    train,
    image_size=size,
    mean=meta["mean"],
    std=meta["std"],
    num_workers=b.workers,
    progress=progress,
    desc=f"{train.category}/train",
  )


def training_features(cfg: config.Fit, train, loaded, size: int, progress: bool) -> list:
  """The pooled training features of ``cfg.levels``, through the feature cache if enabled.

  The cache entry is main's (:func:`jax_gad.feature_cache.pooled_key`, every
  level), so a fit after a main run on the same data and weights reads it, and
  a fit stores what a later main run reads; the levels are selected after reading.
  """
  b, levels = cfg.backbone, cfg.levels.levels
  if not b.cache_dir:
    return _extract(b, loaded, train, levels, size, progress)
  backbone, _, sha = loaded
  cache = feature_cache.FeatureCache(b.cache_dir)
  key = feature_cache.pooled_key(
    cfg.data.dataset,
    cfg.calibration.category,
    "train",
    train.fingerprint,
    sha,
    b.arch,
    size,
    b.dtype,
    backbone.module.depthwise,
  )
  hits = cache.hits
  everything = cache.get_or_compute(
    key, lambda: _extract(b, loaded, train, ALL_LEVELS, size, progress)
  )
  if progress:
    print(feature_cache.describe(cache.paths(key)[0], cache.hits > hits))
  return [everything[level] for level in levels]


def write_histogram(det: detector.Detector, output) -> str:
  """Writes the histogram of the detector's out-of-fold calibration scores; returns its path."""
  scores = np.asarray(det.calibration_scores)
  hist = operating_point.histogram(scores, det.threshold)
  title = f"fit: out-of-fold scores of the {len(scores)} training images"
  png = report.score_histogram_png(hist, title, names={"scores": "training images"})
  path = operating_point.histogram_path(output)
  files.atomic_write(path, png)
  return path


def fit_inputs(cfg: config.Fit) -> list:
  """(what, path) of what a fit reads: the checkpoint file and the raw category folder."""
  b, data_dir = cfg.backbone, cfg.data.data_dir
  default = os.path.join(os.fspath(b.checkpoint_dir), f"{b.arch}.msgpack")
  raw = os.path.join(os.fspath(data_dir), cfg.calibration.category) if data_dir else None
  return [("the checkpoint", b.checkpoint or default), ("the training data", raw)]


def fit_and_save(cfg: config.Fit, progress: bool = True) -> detector.Detector:
  """Checks the output path, fits (:func:`fit`) and saves the detector atomically.

  With ``cfg.plots.plots``, also writes the histogram of the out-of-fold
  calibration scores (:func:`write_histogram`).
  """
  output = cfg.calibration.output
  if not output:
    raise ValueError("--output is required (the detector file to write)")
  if os.path.isdir(output):
    raise ValueError(f"--output={output} is a folder; give a file name")
  files.check_not_an_input("output", output, fit_inputs(cfg))
  if cfg.plots.plots:
    operating_point.check_histogram_path(output, fit_inputs(cfg))
  files.remove_stale_temporaries_beside(output)
  det = fit(cfg, progress=progress)
  det.save(output)
  if cfg.plots.plots:
    write_histogram(det, output)
  return det
