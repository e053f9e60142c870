r"""Fits a detector on ALL training images of one category and saves it.

  python -m jax_gad.fit --dataset=folder --data_dir=DIR --category=NAME \
      --arch=efficientnet-lite0 --output=detector.jgd [--target_fpr=0.01]

Flags -> :class:`jax_gad.config.Fit` -> :func:`jax_gad.fitting.fit_and_save`
-> a summary printed. The calibrated threshold comes from k-fold out-of-fold
scores of the training images (``--calibration_folds``) at ``--target_fpr``;
see docs/own-images.md. No defect image is needed. The training features come
through ``--cache_dir`` (main's entries: a fit after a main run on the same data
and weights extracts nothing); with ``--plots`` (default) the histogram of the
out-of-fold scores is written to ``<output without extension>_histogram.png``. With ``--maps`` the
detector also holds anomaly-map statistics for ``jax_gad.predict --maps_dir``
(docs/maps.md).
"""

from __future__ import annotations

import os
import sys
import warnings

from absl import app

from jax_gad import cli, compile_cache, config, console
from jax_gad.detector import FitWarning


def main(argv) -> int:
  """The fit command (after flag parsing); returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  from jax_gad import fitting, operating_point  # imports TFDS: kept out of --help

  cfg = cli.build(config.Fit)
  try:
    compiled = compile_cache.enable(cfg.backbone.compile_cache)
    with warnings.catch_warnings():  # said below, once, as lines of this command
      warnings.simplefilter("ignore", FitWarning)
      det = fitting.fit_and_save(cfg)
  except (ValueError, OSError, MemoryError) as e:
    print(f"jax_gad.fit: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax_gad.fit: interrupted; nothing written", file=sys.stderr)
    return 130
  print(
    f"fitted on {det.info['n_train']} training images of {cfg.data.dataset}/"
    f"{cfg.calibration.category} ({det.arch}, {det.image_size} px, levels {list(det.levels)})"
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
  for note in det.info.get("warnings", []):
    print(f"jax_gad.fit: warning: {note}", file=sys.stderr)
  print(f"wrote {os.path.abspath(cfg.calibration.output)}")
  if cfg.plots.plots:
    histogram = operating_point.histogram_path(cfg.calibration.output)
    print(f"wrote {os.path.abspath(histogram)}")
  print(compiled.summary())
  return 0


def run() -> None:
  """Console-script entry point (``jax-gad-fit``)."""
  cli.define(config.Calibration)  # this command's own flags: defined only when it runs
  cli.define(config.Plots)
  # main's section, less --save_maps: defined outside this module so that --help lists only
  # the flags show_in_help names.
  cli.define(config.Maps, module_name=cli.__name__)
  cli.show_in_help(config.Fit, exclude=("categories", "save_maps"))
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
