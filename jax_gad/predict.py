r"""Scores images with a saved detector and writes one CSV row per image.

  python -m jax_gad.predict --detector=detector.jgd --input=PATH --output=scores.csv

PATH is an image file, a folder (searched recursively for .png .jpg .jpeg
.bmp .tif .tiff files, sorted by path) or a glob pattern (``**`` recursive).
Columns (:mod:`jax_gad.operating_point`): ``path, level_<l> ... (one per
level), total, decision, threshold``, then ``label, defect_type`` for a
labelled folder (below), then ``error``; ``decision`` is ``anomalous`` when
the total score is strictly above ``threshold`` (the detector's calibrated
threshold, or ``--sigma``'s chi-squared threshold), else ``normal``;
``error`` for an image that could not be read with ``--on_error=skip`` (its
message is in ``error``; it is never dropped). With
``--on_error=fail`` (default) the first unreadable image stops the run and no
output is written. The CSV is written atomically. With ``--maps_dir=DIR`` (a
detector fitted with ``--maps``) every image also gets ``DIR/<path relative to
--input>.npy`` (its float32 anomaly map at its own size) and ``.png`` (the
overlay, with the predicted mask at the calibrated pixel threshold), and the
CSV the columns ``map_max, map_file`` (docs/maps.md).

Images are read and scored in chunks (memory does not grow with the number of
images), decoded and resized by worker threads while the device computes. If
PATH is a labelled folder, in the MVTec test layout (every image in a
sub-folder, ``good`` and at least one defect folder), the labels come from the
folder names and the image AUROC, the TPR / FPR at the threshold and the rate
per folder (FPR of ``good``, TPR of each defect type) are printed. With
``--plots`` (default) the histogram of the scores, with the threshold, is
written to ``<output without extension>_histogram.png``.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import os
import sys
from typing import NamedTuple

from absl import app
import numpy as np
import tqdm.auto

from jax_gad import cli, compile_cache, config, console, files, metrics, operating_point, report
from jax_gad import detector as detector_lib
from jax_gad.data import folder as folder_lib
from jax_gad.data import pipeline
from jax_gad.maps import deploy

CHUNK = 256  # images scored and written per step (bounded memory)


class Inputs(NamedTuple):
  """The images to score: absolute paths, labels and defect types if PATH is labelled, and
  the folder the paths are relative to in --maps_dir (PATH itself if a folder)."""

  paths: list
  labels: list | None
  defect_types: list | None = None
  root: str | None = None


def find_inputs(pattern: str) -> Inputs:
  """Expands ``--input``: one image, a folder (recursive) or a glob. ValueError if none."""
  if not pattern:
    raise ValueError("--input is required: an image, a folder or a glob pattern")
  path = os.path.expanduser(pattern)
  exts = folder_lib.IMAGE_EXTENSIONS
  if os.path.isdir(path):
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      found += [
        os.path.join(dirpath, f)
        for f in filenames
        if os.path.splitext(f)[1].lower() in exts and not f.startswith(".")
      ]
    if not found:
      raise ValueError(
        f"--input={pattern}: the folder holds no images ({', '.join(exts)}, searched recursively)"
      )
    found = sorted(os.path.abspath(p) for p in found)
    types = _folder_types(os.path.abspath(path), found)
    labels = None if types is None else [int(t != "good") for t in types]
    return Inputs(found, labels, types, os.path.abspath(path))
  if os.path.isfile(path):
    return Inputs([os.path.abspath(path)], None, root=os.path.dirname(os.path.abspath(path)))
  if glob.has_magic(path):
    found = sorted(os.path.abspath(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not found:
      raise ValueError(f"--input={pattern}: the pattern matches no files")
    return Inputs(found, None, root=os.path.commonpath([os.path.dirname(p) for p in found]))
  raise ValueError(f"--input={pattern} does not exist (expected an image, a folder or a glob)")


def _folder_types(root: str, paths: list) -> list | None:
  """Defect types from ``root/<good or defect type>/<image>`` if that is the layout, else None."""
  types = []
  for p in paths:
    rel = os.path.relpath(p, root).split(os.sep)
    if len(rel) != 2:
      return None
    types.append(rel[0])
  if "good" not in types or len(set(types)) < 2:
    return None
  return types


def read_image(path: str) -> np.ndarray:
  """An image file -> uint8 (H, W, 3) by the folder dataset's documented conversion."""
  with open(path, "rb") as f:
    data = f.read()
  image = folder_lib.open_image_file(data, path)
  return folder_lib.to_rgb8(image, path)


class _ImageFiles:
  """Image files as a source for the decode pipeline; with skip, records unreadable files."""

  def __init__(self, paths, skip: bool, image_size: int):
    self.paths = paths
    self.skip = skip
    self.errors = {}
    self._blank = np.zeros((image_size, image_size, 3), np.uint8)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    try:
      return {"image": read_image(self.paths[i])}
    except (ValueError, OSError) as e:
      message = str(e) if str(self.paths[i]) in str(e) else f"{self.paths[i]}: {e}"
      if not self.skip:
        raise ValueError(message) from None
      self.errors[i] = message
      return {"image": self._blank}


def _truth(inputs: Inputs, k: int) -> tuple:
  """``(label, defect_type)`` of input ``k`` for the CSV, or ``()`` when the input has none."""
  return () if inputs.defect_types is None else (inputs.labels[k], inputs.defect_types[k])


class Prediction(NamedTuple):
  """What :func:`predict` found: total scores (NaN for errors), decisions, errors, labels."""

  paths: list
  total: np.ndarray
  flagged: np.ndarray
  errors: dict
  labels: list | None
  defect_types: list | None = None
  threshold: float = float("nan")
  histogram: str | None = None  # the histogram PNG's path, when written


def predict(
  detector,
  inputs: Inputs,
  output: str,
  *,
  on_error: str = config.Scoring.on_error,
  sigma: int | None = config.Scoring.sigma,
  batch_size: int = config.Backbone.batch_size,
  num_workers: int | None = config.Backbone.num_workers,
  progress: bool = True,
  maps_dir: str | None = config.Scoring.maps_dir,
) -> Prediction:
  """Scores every input and writes the CSV atomically (nothing is written on failure).

  With ``maps_dir``: each image's map files, CSV columns ``map_max, map_file``
  (:class:`jax_gad.maps.deploy.PredictMaps`).

  One decode pipeline (:func:`jax_gad.data.pipeline.prefetch_batches`) runs
  over all inputs, so decoding stays ahead of the device across chunks; the
  pooled features are scored and written chunk by chunk (``CHUNK`` images),
  so memory does not grow with the number of images.
  """
  if on_error not in ("skip", "fail"):
    raise ValueError(f"--on_error must be skip or fail, got {on_error!r}")
  threshold = detector.threshold_for(sigma)
  n = len(inputs.paths)
  extractor = detector.extractor(min(batch_size, n))
  bs = extractor.batch_size
  chunk_batches = max(1, CHUNK // bs)
  source = _ImageFiles(inputs.paths, on_error == "skip", detector.image_size)
  total = np.full(n, np.nan)
  maps = deploy.map_writer(detector, maps_dir, inputs.root, bs, read_image)
  extractor.compile()  # before the bar, so that its rate and ETA do not count compilation
  bar = None
  if progress:
    bar = tqdm.auto.tqdm(total=n, desc="predict", unit="img")

  def write(f):
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(
      operating_point.csv_header(detector.levels, inputs.defect_types is not None)
      + list(maps.columns)
    )
    batches = pipeline.prefetch_batches(
      source,
      preprocess=pipeline.image_preprocessor(detector.image_size, detector.mean, detector.std),
      batch_size=bs,
      image_shape=(detector.image_size, detector.image_size, 3),
      rows=extractor.local_rows,
      num_workers=config.worker_count(num_workers),
    )
    decoded = maps.tee(batches)
    try:
      for start in range(0, n, chunk_batches * bs):
        count = min(chunk_batches * bs, n - start)
        feats = extractor.extract(itertools.islice(decoded, -(-count // bs)), count, progress=False)
        scores = detector.score_features(feats)
        chunk_maps = maps.take(count)
        for i in range(count):
          k = start + i
          ok = k not in source.errors
          if ok:
            total[k] = scores.total[i]
          writer.writerow(
            operating_point.csv_row(
              inputs.paths[k],
              len(detector.levels),
              threshold,
              scores=(scores.per_level[i], scores.total[i]) if ok else None,
              error=source.errors.get(k, ""),
              truth=_truth(inputs, k),
            )
            + (maps.cells(inputs.paths[k], chunk_maps, i) if ok else maps.blank())
          )
        if bar is not None:
          bar.update(count)
    finally:
      batches.close()
    text.flush()
    text.detach()

  try:
    files.atomic_write(output, write)
  finally:
    if bar is not None:
      bar.close()
  return Prediction(
    inputs.paths,
    total,
    total > threshold,
    dict(source.errors),
    inputs.labels,
    inputs.defect_types,
    threshold,
  )


def command(cfg: config.Predict, progress: bool = True):
  """What ``python -m jax_gad.predict`` does, with every check before any work.

  With ``cfg.plots.plots``, also writes the score histogram (good vs defect
  where the input gives labels, the threshold as a line) to
  :func:`jax_gad.operating_point.histogram_path` of the output.

  Returns:
    (the loaded detector, :class:`Prediction`).
  """
  config.validate(cfg)
  sc, b = cfg.scoring, cfg.backbone
  if os.path.isdir(sc.output):
    raise ValueError(f"--output={sc.output} is a folder; give a file name")
  if not os.path.isdir(os.path.dirname(os.path.abspath(sc.output))):
    raise ValueError(f"--output={sc.output}: its folder does not exist")
  inputs = find_inputs(sc.input)
  det = detector_lib.read_detector(sc.detector)
  det.threshold_for(sc.sigma)  # checks --sigma before any work
  if sc.maps_dir:
    if not det.has_maps:
      raise ValueError(
        f"--maps_dir: detector {sc.detector} holds no map statistics; fit it again with "
        "`python -m jax_gad.fit ... --maps`"
      )
    if os.path.exists(sc.maps_dir) and not os.path.isdir(sc.maps_dir):
      raise ValueError(f"--maps_dir={sc.maps_dir} is a file; give a folder")
  weights = b.checkpoint or os.path.join(os.fspath(b.checkpoint_dir), f"{det.arch}.msgpack")
  read = [("the detector", sc.detector), ("the checkpoint", weights)]
  read += [("the input image", p) for p in inputs.paths]
  files.check_not_an_input("output", sc.output, read)
  if cfg.plots.plots:
    operating_point.check_histogram_path(sc.output, read)
  files.remove_stale_temporaries_beside(sc.output)
  det = detector_lib.attach_backbone(
    det, b.checkpoint, b.checkpoint_dir, b.depthwise_impl, where=f"detector {sc.detector}"
  )
  result = predict(
    det,
    inputs,
    sc.output,
    on_error=sc.on_error,
    sigma=sc.sigma,
    batch_size=b.batch_size,
    num_workers=b.num_workers,
    progress=progress,
    maps_dir=sc.maps_dir or None,
  )
  if cfg.plots.plots and np.isfinite(result.total).any():  # no histogram of nothing
    result = result._replace(histogram=write_histogram(result, sc.output))
  return det, result


def write_histogram(result: Prediction, output) -> str:
  """Writes the scores' histogram beside ``output`` (atomically); returns its path."""
  hist = operating_point.histogram(result.total, result.threshold, result.labels)
  n = int(np.isfinite(result.total).sum())
  path = operating_point.histogram_path(output)
  files.atomic_write(path, report.score_histogram_png(hist, f"predict: scores of {n} images"))
  return path


def summary(det, result: Prediction, sigma=None) -> list:
  """The lines the command prints: counts, and AUROC / TPR / FPR for an MVTec test folder."""
  n_ok = int(np.isfinite(result.total).sum())
  lines = [
    f"scored {n_ok} images ({len(result.errors)} skipped with errors); "
    f"{int(result.flagged.sum())} anomalous at threshold {det.threshold_for(sigma):.4f}"
  ]
  lines += [
    f"the detector was fitted with a warning: {w}" for w in (det.info or {}).get("warnings", [])
  ]
  if result.labels is not None:
    ok = np.isfinite(result.total)
    y = np.asarray(result.labels)[ok]
    if 0 < y.sum() < len(y):
      s, flagged = result.total[ok], result.flagged[ok]
      lines.append(
        f"MVTec test layout: image AUROC {100 * metrics.auroc(s, y):.2f} %, "
        f"TPR {flagged[y == 1].mean():.3f}, FPR {flagged[y == 0].mean():.3f} "
        "at the threshold"
      )
  if result.defect_types is not None:
    found = operating_point.rates(result.total, result.threshold, result.defect_types)
    lines += operating_point.rate_lines(found, result.threshold)
  return lines


def main(argv) -> int:
  """The predict command (after flag parsing); returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  cfg = cli.build(config.Predict)
  try:
    compiled = compile_cache.enable(cfg.backbone.compile_cache)
    det, result = command(cfg)
  except (ValueError, OSError, MemoryError) as e:
    print(f"jax_gad.predict: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax_gad.predict: interrupted; nothing written", file=sys.stderr)
    return 130
  for line in summary(det, result, cfg.scoring.sigma):
    print(line)
  print(f"wrote {os.path.abspath(cfg.scoring.output)}")
  if result.histogram:
    print(f"wrote {os.path.abspath(result.histogram)}")
  print(compiled.summary())
  return 0


def run() -> None:
  """Console-script entry point (``jax-gad-predict``)."""
  cli.define(config.Scoring)  # this command's own flags: defined only when it runs
  cli.define(config.Plots)
  cli.show_in_help(config.Predict, exclude=("arch", "image_size", "dtype", "cache_dir"))
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
