r"""Fits a detector on ALL training images of one category and saves it.

  python -m jax_gad.fit --dataset=folder --data_dir=DIR --category=NAME \
      --arch=efficientnet-lite0 --output=detector.jgd [--target_fpr=0.01]

The Gaussians of every level are fitted on every training image (no folds);
the calibrated threshold comes from k-fold out-of-fold scores of those same
images (``--calibration_folds``, default 5) at ``--target_fpr``; see
:mod:`jax_gad.detector` and docs/own-images.md. No defect image is needed.
The training features come through ``--cache_dir``, whose entries ``main``
also writes (a fit after a main run on the same data and weights extracts
nothing). With ``--plots`` (default) the histogram of the out-of-fold scores,
with the threshold, is written to ``<output without extension>_histogram.png``.
The shared flags (data, backbone, levels, PCA / NPCA, caches) are those of
:mod:`jax_gad.cli`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from jax_gad import detector as detector_lib
from jax_gad.models import efficientnet

ALL_LEVELS = tuple(range(efficientnet.NUM_LEVELS))
# The flags of this command: the shared ones of jax_gad.cli, then its own.
SHARED_FLAGS = (
  "dataset",
  "data_dir",
  "tfds_dir",
  "arch",
  "checkpoint",
  "checkpoint_dir",
  "image_size",
  "batch_size",
  "num_workers",
  "dtype",
  "depthwise",
  "levels",
  "pca",
  "npca",
  "cache_dir",
  "plots",
)
OWN_FLAGS = ("category", "output", "target_fpr", "calibration_folds")


def fit(
  category: str,
  *,
  dataset: str = "folder",
  data_dir=None,
  tfds_dir=None,
  arch: str = "efficientnet-b4",
  checkpoint=None,
  checkpoint_dir="checkpoints",
  image_size: int | None = None,
  levels: Sequence[int] = ALL_LEVELS,
  pca: float | None = None,
  npca: float | None = None,
  target_fpr: float = 0.01,
  calibration_folds: int = 5,
  batch_size: int = 16,
  num_workers: int | None = None,
  dtype: str = "float32",
  depthwise: str | None = None,
  cache_dir=None,
  progress: bool = True,
) -> detector_lib.Detector:
  """Fits a :class:`jax_gad.detector.Detector` on a category's training split.

  Args:
    category: the category (for 'folder', the folder name under data_dir).
    dataset: 'folder', 'mvtec_ad' or 'synthetic_ad'.
    data_dir, tfds_dir: as in :func:`jax_gad.data.load`.
    arch, checkpoint, checkpoint_dir: the backbone (default checkpoint:
      ``<checkpoint_dir>/<arch>.msgpack``, Lite0-2 converted there on first use).
    image_size: square input size (default: the checkpoint's native size).
    levels: level indices (0 stem .. 8 head).
    pca, npca: optional reduction threshold in (0, 1) (at most one).
    target_fpr: false-positive rate of the calibrated threshold, in (0, 1).
    calibration_folds: k of the out-of-fold calibration.
    batch_size, num_workers, dtype, depthwise: feature extraction settings.
    cache_dir: the pooled-feature cache (:mod:`jax_gad.feature_cache`; None or ''
      disables it). Its entries are those ``jax_gad.main`` writes (same key, all
      9 levels), so a fit after a main run on the same data and weights extracts nothing.
    progress: show progress bars, and say on the console where the features came from.

  Returns:
    The fitted detector, with its backbone attached (``Detector.score`` works).

  Raises:
    ValueError: bad arguments or data (one line naming the culprit).
  """
  from jax_gad import data, feature_cache

  target_fpr = detector_lib.check_target_fpr(target_fpr)
  levels, reduction = _check(levels, pca, npca, dtype, image_size, cache_dir)
  train = data.load(dataset, category, "train", data_dir=data_dir, tfds_dir=tfds_dir)
  if len(train) < max(calibration_folds, 3):
    raise ValueError(
      f"{dataset} category {category!r} has {len(train)} training images; "
      f"calibrating with {calibration_folds} folds needs at least "
      f"{max(calibration_folds, 3)}"
    )
  backbone, meta, sha = detector_lib.load_backbone(
    arch, checkpoint, checkpoint_dir, dtype, depthwise
  )
  size = int(image_size or meta["resolution"])
  settings = dict(image_size=size, batch_size=batch_size, num_workers=num_workers)
  if not cache_dir:
    feats = _extract(backbone, meta, train, levels, progress, **settings)
  else:  # main's entry for this split: every level, selected after reading
    cache = feature_cache.FeatureCache(cache_dir)
    key = feature_cache.pooled_key(
      dataset,
      category,
      "train",
      train.fingerprint,
      sha,
      arch,
      size,
      dtype,
      backbone.module.depthwise,
    )
    hits = cache.hits
    everything = cache.get_or_compute(
      key, lambda: _extract(backbone, meta, train, ALL_LEVELS, progress, **settings)
    )
    feats = [everything[l] for l in levels]
    if progress:
      print(feature_cache.describe(cache.paths(key)[0], cache.hits > hits))
  import jax_gad

  info = {
    "dataset": dataset,
    "category": category,
    "n_train": len(train),
    "data_fingerprint": train.fingerprint,
    "checkpoint": backbone.path,
    "versions": jax_gad.versions(),
  }
  det = detector_lib.fit_features(
    feats,
    levels=levels,
    target_fpr=target_fpr,
    n_folds=calibration_folds,
    reduction=reduction,
    arch=arch,
    checkpoint_sha256=sha,
    image_size=size,
    mean=tuple(float(v) for v in meta["mean"]),
    std=tuple(float(v) for v in meta["std"]),
    dtype=dtype,
    info=info,
  )
  return det.replace(backbone=backbone)


def _check(levels, pca, npca, dtype, image_size, cache_dir):
  """Checks the settings before any work; returns (levels as a tuple, reduction or None)."""
  from jax_gad import cli, protocol

  try:
    levels = tuple(cli.IntListParser(0, efficientnet.NUM_LEVELS - 1).parse(list(levels)))
  except ValueError as err:
    raise ValueError(f"--levels: {err}") from None
  r = protocol.reduction_from(pca, npca)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  if image_size is not None and image_size < 16:
    raise ValueError(f"--image_size must be at least 16, got {image_size}")
  if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise ValueError(f"--cache_dir={cache_dir} is a file; give a folder, or '' to disable")
  return levels, None if r is None else r._asdict()


def _extract(backbone, meta, train, levels, progress, *, image_size, batch_size, num_workers):
  """Pooled features of the training images at ``levels`` (a list of arrays, one per level)."""
  from jax_gad import features
  from jax_gad.data import pipeline

  extractor = features.LevelExtractor(
    backbone.module,
    backbone.variables,
    image_size=image_size,
    levels=levels,
    batch_size=min(batch_size, len(train)),
  )
  return pipeline.pooled_features(
    extractor,
    train,
    image_size=image_size,
    mean=meta["mean"],
    std=meta["std"],
    num_workers=num_workers or os.cpu_count() or 2,
    progress=progress,
    desc=f"{train.category}/train",
  )


def command(output, category, plots=True, **kwargs) -> detector_lib.Detector:
  """What ``python -m jax_gad.fit`` does: checks the output path, fits, saves atomically.

  Args:
    output: the detector file to write (its folder is created if missing).
    category: as in :func:`fit`.
    plots: also write the histogram of the out-of-fold calibration scores, with
      the threshold, to :func:`jax_gad.operating_point.histogram_path` of ``output``.
    **kwargs: the other arguments of :func:`fit`.
  """
  if not category:
    raise ValueError("--category is required (the category folder's name under --data_dir)")
  if not output:
    raise ValueError("--output is required (the detector file to write)")
  output = os.path.expanduser(os.fspath(output))
  if os.path.isdir(output):
    raise ValueError(f"--output={output} is a folder; give a file name")
  det = fit(category, **kwargs)
  det.save(output)
  if plots:
    write_histogram(det, output)
  return det


def write_histogram(det: detector_lib.Detector, output) -> str:
  """Writes the histogram of the detector's out-of-fold calibration scores; returns its path."""
  from jax_gad import files, operating_point, report

  scores = np.asarray(det.calibration_scores)
  hist = operating_point.histogram(scores, det.threshold)
  title = f"fit: out-of-fold scores of the {len(scores)} training images"
  png = report.score_histogram_png(hist, title, names={"scores": "training images"})
  path = operating_point.histogram_path(output)
  files.atomic_write(path, png)
  return path


def _define_flags() -> None:
  """This command's own flags; defined only when the command runs (absl flags are global)."""
  from absl import flags

  from jax_gad import cli

  flags.DEFINE_string(
    "category",
    None,
    "The category to fit on (for --dataset=folder, the folder name under --data_dir).",
  )
  cli.DEFINE_path("output", None, "The detector file to write.")
  flags.DEFINE_float(
    "target_fpr",
    0.01,
    "False-positive rate of the calibrated threshold, in "
    "(0, 1), set from out-of-fold scores of the training images.",
  )
  flags.DEFINE_integer("calibration_folds", 5, "k of the out-of-fold calibration.", lower_bound=2)
  cli.show_in_help(SHARED_FLAGS + OWN_FLAGS + ("compile_cache",))


def main(argv) -> int:
  """The fit command (after flag parsing); returns the exit status."""
  from absl import app, flags

  from jax_gad import cli, compile_cache, console, operating_point

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  fv = flags.FLAGS
  v = cli.values(SHARED_FLAGS + OWN_FLAGS)
  v["depthwise"] = None if v["depthwise"] == "auto" else v["depthwise"]
  try:
    compiled = compile_cache.enable(fv.compile_cache)
    det = command(**v)
  except (ValueError, OSError, MemoryError) as e:
    print(f"jax_gad.fit: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax_gad.fit: interrupted; nothing written", file=sys.stderr)
    return 130
  print(
    f"fitted on {det.info['n_train']} training images of {fv.dataset}/{fv.category} "
    f"({det.arch}, {det.image_size} px, levels {list(det.levels)})"
  )
  print(
    f"calibrated threshold {det.threshold:.4f} at target FPR {det.target_fpr} "
    f"({det.n_folds}-fold out-of-fold scores); 3-sigma threshold {det.threshold_for(3):.4f}"
  )
  print(f"wrote {os.path.abspath(v['output'])}")
  if v["plots"]:
    print(f"wrote {os.path.abspath(operating_point.histogram_path(v['output']))}")
  print(compiled.summary())
  return 0


def run() -> None:
  """Console-script entry point (``jax-gad-fit``)."""
  from absl import app

  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


class _CallableModule(type(sys)):
  """``jax_gad.fit`` is both this module and the function: calling the module calls :func:`fit`."""

  def __call__(self, *args, **kwargs):
    return fit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
  run()
