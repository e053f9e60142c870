r"""Fits a detector on ALL training images of one category and saves it.

  python -m jax_gad.fit --dataset=folder --data_dir=DIR --category=NAME \
      --arch=efficientnet-lite0 --output=detector.jgd [--target_fpr=0.01]

The Gaussians of every level are fitted on every training image (no folds);
the calibrated threshold comes from k-fold out-of-fold scores of those same
images (``--calibration_folds``, default 5) at ``--target_fpr``; see
:mod:`jax_gad.detector`. No defect image is needed.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from jax_gad import detector as detector_lib

ALL_LEVELS = tuple(range(9))


def fit(category: str, *, dataset: str = "folder", data_dir=None, tfds_dir=None,
        arch: str = "efficientnet-b4", checkpoint=None, checkpoint_dir="checkpoints",
        image_size: int | None = None, levels: Sequence[int] = ALL_LEVELS,
        pca: float | None = None, npca: float | None = None, target_fpr: float = 0.01,
        calibration_folds: int = 5, batch_size: int = 16, num_workers: int | None = None,
        dtype: str = "float32", depthwise: str | None = None,
        progress: bool = True) -> detector_lib.Detector:
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

  Returns:
    The fitted detector, with its backbone attached (``Detector.score`` works).

  Raises:
    ValueError: bad arguments or data (one line naming the culprit).
  """
  import jax
  import numpy as np
  from jax_gad import data, features

  target_fpr = detector_lib.check_target_fpr(target_fpr)
  levels = tuple(levels)
  if not levels or len(set(levels)) != len(levels) or any(
      isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not 0 <= l <= 8
      for l in levels):
    raise ValueError(f"--levels must list distinct integers in 0..8, got {list(levels)}")
  if pca is not None and npca is not None:
    raise ValueError("--pca and --npca are mutually exclusive: request one reduction, not both")
  reduction = None
  for mode, t in (("pca", pca), ("npca", npca)):
    if t is not None:
      if not 0.0 < float(t) < 1.0:
        raise ValueError(f"--{mode} must be a cumulative variance threshold in (0, 1), got {t}")
      reduction = {"mode": mode, "threshold": float(t)}
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  if image_size is not None and image_size < 16:
    raise ValueError(f"--image_size must be at least 16, got {image_size}")

  train = data.load(dataset, category, "train", data_dir=data_dir, tfds_dir=tfds_dir)
  if len(train) < max(calibration_folds, 3):
    raise ValueError(f"{dataset} category {category!r} has {len(train)} training images; "
                     f"calibrating with {calibration_folds} folds needs at least "
                     f"{max(calibration_folds, 3)}")
  backbone, meta, sha = detector_lib.load_backbone(arch, checkpoint, checkpoint_dir, dtype,
                                                   depthwise)
  size = int(image_size or meta["resolution"])
  feats = features.extract_features(
      backbone.module, backbone.variables, train, image_size=size, mean=meta["mean"],
      std=meta["std"], batch_size=batch_size, levels=levels,
      num_workers=num_workers or os.cpu_count() or 2, progress=progress,
      desc=f"{category}/train")
  import flax
  import jax_gad
  info = {"dataset": dataset, "category": category, "n_train": len(train),
          "data_fingerprint": train.fingerprint, "checkpoint": backbone.path,
          "versions": {"jax_gad": jax_gad.__version__, "jax": jax.__version__,
                       "flax": flax.__version__}}
  det = detector_lib.fit_features(
      feats, levels=levels, target_fpr=target_fpr, n_folds=calibration_folds,
      reduction=reduction, arch=arch, checkpoint_sha256=sha, image_size=size,
      mean=tuple(float(v) for v in meta["mean"]), std=tuple(float(v) for v in meta["std"]),
      dtype=dtype, info=info)
  return det.replace(backbone=backbone)


def _make_flags():
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_enum("dataset", "folder", ["folder", "mvtec_ad", "synthetic_ad"],
                    "Dataset of the training images.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "Folder holding <category>/train/good.", flag_values=fv)
  flags.DEFINE_string("tfds_dir", None, "Where prepared datasets are kept.", flag_values=fv)
  flags.DEFINE_string("category", None, "Category to fit on.", flag_values=fv)
  flags.DEFINE_string("arch", "efficientnet-b4", "Backbone architecture.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Converted weights (.msgpack).", flag_values=fv)
  flags.DEFINE_string("checkpoint_dir", "checkpoints", "Folder of converted checkpoints.",
                      flag_values=fv)
  flags.DEFINE_integer("image_size", None, "Square input size.", flag_values=fv)
  flags.DEFINE_list("levels", [str(i) for i in ALL_LEVELS], "Levels (0..8).", flag_values=fv)
  flags.DEFINE_float("pca", None, "PCA cumulative variance threshold.", flag_values=fv)
  flags.DEFINE_float("npca", None, "NPCA cumulative variance threshold.", flag_values=fv)
  flags.DEFINE_float("target_fpr", 0.01, "False-positive rate of the calibrated threshold.",
                     flag_values=fv)
  flags.DEFINE_integer("calibration_folds", 5, "Folds of the out-of-fold calibration.",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Feature extraction batch size.", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "Decoding threads.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Backbone dtype.",
                    flag_values=fv)
  flags.DEFINE_string("output", None, "Detector file to write.", flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  from absl import flags
  fv = _make_flags()
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(fv.get_help())
    return 0
  try:
    fv(argv)
  except flags.Error as e:
    print(f"jax_gad.fit: error: {e}", file=sys.stderr)
    return 2
  try:
    if not fv.category:
      raise ValueError("--category is required (the folder name under --data_dir)")
    if not fv.output:
      raise ValueError("--output is required (the detector file to write)")
    output = os.path.expanduser(fv.output)
    if os.path.isdir(output):
      raise ValueError(f"--output={fv.output} is a folder; give a file name")
    try:
      levels = tuple(int(v) for v in fv.levels)
    except ValueError:
      raise ValueError(f"--levels must be integers, got {','.join(fv.levels)!r}") from None
    det = fit(fv.category, dataset=fv.dataset, data_dir=fv.data_dir, tfds_dir=fv.tfds_dir,
              arch=fv.arch, checkpoint=fv.checkpoint, checkpoint_dir=fv.checkpoint_dir,
              image_size=fv.image_size, levels=levels, pca=fv.pca, npca=fv.npca,
              target_fpr=fv.target_fpr, calibration_folds=fv.calibration_folds,
              batch_size=fv.batch_size, num_workers=fv.num_workers, dtype=fv.dtype)
    det.save(output)
  except (ValueError, OSError) as e:
    print(f"jax_gad.fit: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax_gad.fit: interrupted", file=sys.stderr)
    return 130
  print(f"fitted on {det.info['n_train']} training images of {fv.dataset}/{fv.category} "
        f"({det.arch}, {det.image_size} px, levels {list(det.levels)})")
  print(f"calibrated threshold {det.threshold:.4f} at target FPR {det.target_fpr} "
        f"({det.n_folds}-fold out-of-fold scores); 3-sigma threshold "
        f"{det.threshold_for(3):.4f}")
  print(f"wrote {os.path.abspath(output)}")
  return 0


class _CallableModule(type(sys)):
  """``jax_gad.fit`` is both this module and the function: calling the module calls :func:`fit`."""

  def __call__(self, *args, **kwargs):
    return fit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
  sys.exit(main())
