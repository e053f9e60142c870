r"""Fits a detector on ALL training images of one category and saves it.

  python -m jax_gad.fit --dataset=folder --data_dir=DIR --category=NAME \
      --arch=efficientnet-lite0 --output=detector.jgd [--target_fpr=0.01]

The Gaussians of every level are fitted on every training image (no folds);
the calibrated threshold comes from k-fold out-of-fold scores of those same
images (``--calibration_folds``, default 5) at ``--target_fpr``; see
:mod:`jax_gad.detector` and docs/own-images.md. No defect image is needed.
The shared flags (data, backbone, levels, PCA / NPCA) are those of
:mod:`jax_gad.cli`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

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
)
OWN_FLAGS = ("category", "output", "target_fpr", "calibration_folds")
MAP_FLAGS = ("maps", "map_levels", "map_ridge", "map_sigma", "map_combine", "map_channels")


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
  progress: bool = True,
  maps: dict | None = None,
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
    progress: show progress bars.
    maps: None, or the keyword arguments of :func:`jax_gad.detector.map_settings`
      (levels, ridge, sigma, combine, channels): also fit per-location Gaussians.

  Returns:
    The fitted detector, with its backbone attached (``Detector.score`` works).

  Raises:
    ValueError: bad arguments or data (one line naming the culprit).
  """
  from jax_gad import cli, data, features, protocol
  from jax_gad.data import pipeline

  target_fpr = detector_lib.check_target_fpr(target_fpr)
  try:
    levels = tuple(cli.IntListParser(0, efficientnet.NUM_LEVELS - 1).parse(list(levels)))
  except ValueError as err:
    raise ValueError(f"--levels: {err}") from None
  r = protocol.reduction_from(pca, npca)
  reduction = None if r is None else r._asdict()
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  if image_size is not None and image_size < 16:
    raise ValueError(f"--image_size must be at least 16, got {image_size}")
  map_settings = None if maps is None else detector_lib.map_settings(arch, **maps)

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
  extractor = features.LevelExtractor(
    backbone.module,
    backbone.variables,
    image_size=size,
    levels=levels,
    batch_size=min(batch_size, len(train)),
  )
  feats = pipeline.pooled_features(
    extractor,
    train,
    image_size=size,
    mean=meta["mean"],
    std=meta["std"],
    num_workers=num_workers or os.cpu_count() or 2,
    progress=progress,
    desc=f"{category}/train",
  )
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
  ).replace(backbone=backbone)
  if map_settings is not None:
    workers = num_workers or os.cpu_count() or 2
    det = detector_lib.fit_maps(
      det, train, map_settings, batch_size=batch_size, num_workers=workers
    )
  return det


def command(output, category, **kwargs) -> detector_lib.Detector:
  """What ``python -m jax_gad.fit`` does: checks the output path, fits, saves atomically.

  Args:
    output: the detector file to write (its folder is created if missing).
    category: as in :func:`fit`.
    **kwargs: the other arguments of :func:`fit`.
  """
  if not category:
    raise ValueError("--category is required (the category folder's name under --data_dir)")
  if not output:
    raise ValueError("--output is required (the detector file to write)")
  output = os.path.expanduser(os.fspath(output))
  if os.path.isdir(output):
    raise ValueError(f"--output={output} is a folder; give a file name")
  options = {name[len("map_") :]: kwargs.pop(name) for name in MAP_FLAGS[1:] if name in kwargs}
  if kwargs.pop("maps", False):
    kwargs["maps"] = options
  det = fit(category, **kwargs)
  det.save(output)
  return det


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
  _define_map_flags()
  cli.show_in_help(SHARED_FLAGS + OWN_FLAGS + MAP_FLAGS)


def _define_map_flags() -> None:
  """--maps and its settings (the meanings of main's flags of the same names)."""
  from absl import flags

  from jax_gad import cli

  flags.DEFINE_bool(
    "maps",
    False,
    "Also fit per-location Gaussians of --map_levels, for anomaly maps with "
    "`jax_gad.predict --maps_dir` (docs/maps.md).",
  )
  cli.DEFINE_int_list(
    "map_levels",
    [],
    0,
    8,
    "With --maps: the levels of the maps (default: the arch's).",
    allow_empty=True,
  )
  flags.DEFINE_float(
    "map_ridge", None, "With --maps: ridge added to each per-location covariance (default 0.01)."
  )
  flags.DEFINE_float("map_sigma", 4.0, "With --maps: blur sigma in network-input pixels.")
  flags.DEFINE_enum("map_combine", "mean", ["mean", "chi"], "With --maps: level combination rule.")
  flags.DEFINE_integer("map_channels", None, "With --maps: random channels kept per level.")


def main(argv) -> int:
  """The fit command (after flag parsing); returns the exit status."""
  from absl import app, flags

  from jax_gad import cli, console

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  fv = flags.FLAGS
  v = cli.values(SHARED_FLAGS + OWN_FLAGS + MAP_FLAGS)
  v["depthwise"] = None if v["depthwise"] == "auto" else v["depthwise"]
  try:
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
  if det.has_maps:
    print(
      f"maps: levels {det.map_settings['levels']}, ridge {det.map_settings['ridge']}, "
      f"pixel threshold {det.map_threshold:.4f}, colour scale {det.map_scale[0]:.3f}.."
      f"{det.map_scale[1]:.3f} (out-of-fold maps of the training images)"
    )
  print(f"wrote {os.path.abspath(v['output'])}")
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
