r"""Scores images with a saved detector and writes one CSV row per image.

  python -m jax_gad.predict --detector=detector.jgd --input=PATH --output=scores.csv

PATH is an image file, a folder (searched recursively for .png .jpg .jpeg
.bmp .tif .tiff files, sorted by path) or a glob pattern (``**`` recursive).
Columns: ``path, level_<l> ... (one per level), total, decision, error``;
``decision`` is ``anomalous`` when the total score is strictly above the
detector's calibrated threshold (or ``--sigma``'s chi-squared threshold),
else ``normal``; ``error`` for an image that could not be read with
``--on_error=skip`` (its message is in ``error``; it is never dropped). With
``--on_error=fail`` (default) the first unreadable image stops the run and no
output is written. The CSV is written atomically.

Images are read and scored in chunks (memory does not grow with the number of
images), decoded and resized by worker threads while the device computes. If
PATH is a folder in the MVTec test layout (sub-folders ``good`` and at least
one defect folder), the labels come from the folder names and the image AUROC
and the TPR / FPR at the threshold are printed.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import sys
from typing import NamedTuple

import numpy as np

from jax_gad.data import folder as folder_lib

CHUNK = 256  # images per scoring chunk (bounded memory)


class Inputs(NamedTuple):
  """The images to score: absolute paths, and labels if PATH is an MVTec test folder."""
  paths: list
  labels: list | None


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
      found += [os.path.join(dirpath, f) for f in filenames
                if os.path.splitext(f)[1].lower() in exts and not f.startswith(".")]
    if not found:
      raise ValueError(f"--input={pattern}: the folder holds no images "
                       f"({', '.join(exts)}, searched recursively)")
    found = sorted(os.path.abspath(p) for p in found)
    return Inputs(found, _mvtec_labels(os.path.abspath(path), found))
  if os.path.isfile(path):
    return Inputs([os.path.abspath(path)], None)
  if glob.has_magic(path):
    found = sorted(os.path.abspath(p) for p in glob.glob(path, recursive=True)
                   if os.path.isfile(p))
    if not found:
      raise ValueError(f"--input={pattern}: the pattern matches no files")
    return Inputs(found, None)
  raise ValueError(f"--input={pattern} does not exist (expected an image, a folder or a glob)")


def _mvtec_labels(root: str, paths: list) -> list | None:
  """Labels from ``root/<good or defect>/<image>`` if that is the layout, else None."""
  subs = set()
  for p in paths:
    rel = os.path.relpath(p, root).split(os.sep)
    if len(rel) != 2:
      return None
    subs.add(rel[0])
  if "good" not in subs or len(subs) < 2:
    return None
  return [int(os.path.relpath(p, root).split(os.sep)[0] != "good") for p in paths]


def read_image(path: str) -> np.ndarray:
  """An image file -> uint8 (H, W, 3) by the folder dataset's documented conversion."""
  with open(path, "rb") as f:
    data = f.read()
  image = folder_lib.open_image_file(data, path)
  return folder_lib.to_rgb8(image, path)


class _ChunkSource:
  """Sequence of images for the extractor; records unreadable files instead of raising (skip)."""

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
      if not self.skip:
        raise ValueError(str(e) if str(self.paths[i]) in str(e)
                         else f"{self.paths[i]}: {e}") from None
      self.errors[i] = str(e) if str(self.paths[i]) in str(e) else f"{self.paths[i]}: {e}"
      return {"image": self._blank}


class Prediction(NamedTuple):
  """What :func:`predict` found: total scores (NaN for errors), decisions, errors, labels."""
  paths: list
  total: np.ndarray
  flagged: np.ndarray
  errors: dict
  labels: list | None


def predict(detector, inputs: Inputs, output: str, *, on_error: str = "fail",
            sigma: int | None = None, batch_size: int = 16, num_workers: int | None = None,
            progress: bool = True) -> Prediction:
  """Scores every input and writes the CSV atomically (nothing is written on failure)."""
  from jax_gad import files
  if on_error not in ("skip", "fail"):
    raise ValueError(f"--on_error must be skip or fail, got {on_error!r}")
  threshold = detector.threshold_for(sigma)
  extractor = detector.extractor(batch_size)
  workers = num_workers or os.cpu_count() or 2
  n = len(inputs.paths)
  total = np.full(n, np.nan)
  errors = {}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc="predict", unit="img")

  def write(f):
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(["path"] + [f"level_{l}" for l in detector.levels]
                    + ["total", "decision", "error"])
    for start in range(0, n, CHUNK):
      chunk = inputs.paths[start:start + CHUNK]
      source = _ChunkSource(chunk, on_error == "skip", detector.image_size)
      feats = extractor.extract(source, mean=detector.mean, std=detector.std,
                                num_workers=workers, progress=False)
      scores = detector.score_features(feats)
      for i, path in enumerate(chunk):
        if i in source.errors:
          errors[start + i] = source.errors[i]
          writer.writerow([path] + [""] * len(detector.levels) + ["", "error", source.errors[i]])
          continue
        total[start + i] = scores.total[i]
        writer.writerow([path] + [repr(float(v)) for v in scores.per_level[i]]
                        + [repr(float(scores.total[i])),
                           "anomalous" if scores.total[i] > threshold else "normal", ""])
      if bar is not None:
        bar.update(len(chunk))
    text.flush()
    text.detach()

  try:
    files.atomic_write(output, write)
  finally:
    if bar is not None:
      bar.close()
  return Prediction(inputs.paths, total, total > threshold, errors, inputs.labels)


def _make_flags():
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_string("detector", None, "Detector file written by jax_gad.fit.", flag_values=fv)
  flags.DEFINE_string("input", None, "An image, a folder (recursive) or a glob.", flag_values=fv)
  flags.DEFINE_string("output", None, "CSV file to write.", flag_values=fv)
  flags.DEFINE_enum("on_error", "fail", ["fail", "skip"],
                    "fail: stop at an unreadable image; skip: list it in the CSV and go on.",
                    flag_values=fv)
  flags.DEFINE_integer("sigma", None, "Decide at the chi-squared n-sigma threshold instead of "
                       "the calibrated one.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Converted weights (default "
                      "<checkpoint_dir>/<arch>.msgpack).", flag_values=fv)
  flags.DEFINE_string("checkpoint_dir", "checkpoints", "Folder of converted checkpoints.",
                      flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Batch size.", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "Decoding threads.", flag_values=fv)
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
    print(f"jax_gad.predict: error: {e}", file=sys.stderr)
    return 2
  try:
    from jax_gad import detector as detector_lib
    if not fv.detector:
      raise ValueError("--detector is required (the file written by jax_gad.fit)")
    if not fv.output:
      raise ValueError("--output is required (the CSV file to write)")
    output = os.path.expanduser(fv.output)
    if os.path.isdir(output):
      raise ValueError(f"--output={fv.output} is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
      raise ValueError(f"--output={fv.output}: its folder does not exist")
    if fv.batch_size < 1:
      raise ValueError(f"--batch_size must be positive, got {fv.batch_size}")
    inputs = find_inputs(fv.input)
    det = detector_lib.read_detector(fv.detector)
    det.threshold_for(fv.sigma)  # checks --sigma before any work
    det = detector_lib.attach_backbone(det, fv.checkpoint, fv.checkpoint_dir,
                                       where=f"detector {fv.detector}")
    result = predict(det, inputs, output, on_error=fv.on_error, sigma=fv.sigma,
                     batch_size=fv.batch_size, num_workers=fv.num_workers)
  except (ValueError, OSError) as e:
    print(f"jax_gad.predict: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax_gad.predict: interrupted; nothing written", file=sys.stderr)
    return 130
  n_ok = int(np.isfinite(result.total).sum())
  print(f"scored {n_ok} images ({len(result.errors)} skipped with errors); "
        f"{int(result.flagged.sum())} anomalous at threshold {det.threshold_for(fv.sigma):.4f}")
  if result.labels is not None:
    from jax_gad import evaluate
    ok = np.isfinite(result.total)
    y = np.asarray(result.labels)[ok]
    s = result.total[ok]
    if 0 < y.sum() < len(y):
      flagged = result.flagged[ok]
      print(f"MVTec test layout: image AUROC {100 * evaluate.auroc(s, y):.2f} %, "
            f"TPR {flagged[y == 1].mean():.3f}, FPR {flagged[y == 0].mean():.3f} at the threshold")
  print(f"wrote {os.path.abspath(output)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
