r"""Exports a detector to a folder that scores images without jax_gad.

  python -m jax_gad.export --detector=detector.jgd --output=DIR

The whole scoring function (uint8 NHWC RGB at the detector's input size ->
normalisation -> backbone -> pooled levels -> per-level Mahalanobis distances
-> their mean, the total -> the decision at the calibrated threshold) is
lowered once with ``jax.export`` for a symbolic batch size and serialised
(StableHLO), the backbone weights and the fitted Gaussians inside as
constants. DIR holds:

* ``scorer.jaxexport``: the serialised program (``jax.export.deserialize``);
* ``load.py``: the loader (:mod:`jax_gad.export_loader`), jax and numpy only;
* ``manifest.json``: input size, dtype, layout, channel order, resize rule,
  mean / std, threshold, levels, outputs, versions, and the sha256 of every
  other file, which the loader checks.

Resizing stays outside (an input of another size is refused): resize to the
manifest's size as :mod:`jax_gad.data.preprocess` does (bilinear, half-pixel
centres, no antialiasing; OpenCV ``INTER_LINEAR``). docs/export.md has the
sizes, load times and speeds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

import jax_gad
from jax_gad import cli, config, console, export_loader, files, gaussian, pca
from jax_gad import detector as detector_lib

FORMAT_NAME = "jax_gad.export"
FORMAT_VERSION = 1
PROGRAM = "scorer.jaxexport"
LOADER = "load.py"
MANIFEST = "manifest.json"
OUTPUTS = {
  "per_level": "float32 (n, L): Mahalanobis distance at each level, in the order of 'levels'",
  "total": "float32 (n,): the mean of per_level",
  "anomalous": "bool (n,): total > threshold",
}


def scoring_function(det: detector_lib.Detector):
  """``f(uint8 (n, S, S, 3)) -> {'per_level', 'total', 'anomalous'}``, pure, for ``det``.

  The backbone runs one image at a time (``lax.map`` over the symbolic batch;
  jax_gad's own per-image split of the leading blocks depends on the batch
  size, unknown here). Everything the function needs is closed over as
  constants.
  """
  if det.backbone is None:
    raise ValueError("the detector has no backbone attached (use detector.attach_backbone)")
  module = det.backbone.module
  variables = jax.tree.map(np.asarray, det.backbone.variables)
  mean = np.asarray(det.mean, np.float32)
  std = np.asarray(det.std, np.float32)
  states = [jax.tree.map(np.asarray, s) for s in det.states]
  projections = [None if p is None else jax.tree.map(np.asarray, p) for p in det.projections]
  threshold = np.float32(det.threshold)

  def score(images):
    # The order of the operations of data.preprocess: / 255, then (x - mean) / std.
    x = (images.astype(jnp.float32) / np.float32(255.0) - mean) / std
    # One image at a time (lax.map over the symbolic batch): a batch-1 network
    # keeps its working set in cache on CPU, as jax_gad's own per-image split does.
    pooled = jax.lax.map(lambda image: module.apply(variables, image[None], pool=True), x)
    pooled = [p[:, 0] for p in pooled]
    per_level = []
    for level, state, projection in zip(det.levels, states, projections):
      rows = pooled[level].astype(jnp.float32)
      if projection is not None:
        rows = pca.project(projection, rows)
      per_level.append(gaussian.mahalanobis(state, rows))
    per_level = jnp.stack(per_level, axis=1)
    total = jnp.mean(per_level, axis=1)
    return {"per_level": per_level, "total": total, "anomalous": total > threshold}

  return score


def export_program(det: detector_lib.Detector):
  """The ``jax.export.Exported`` of :func:`scoring_function`, batch symbolic (``n >= 1``).

  Lowered for the platform this process runs on (``Exported.platforms``).
  """
  (batch,) = jax_export.symbolic_shape("n")
  spec = jax.ShapeDtypeStruct((batch, det.image_size, det.image_size, 3), np.uint8)
  return jax_export.export(jax.jit(scoring_function(det)))(spec)


def manifest(det: detector_lib.Detector, program, digests: dict, detector_sha256: str) -> dict:
  """The manifest.json of an export: what the program expects, returns and was built from."""
  size = int(det.image_size)
  return {
    "format": FORMAT_NAME,
    "format_version": FORMAT_VERSION,
    "program": PROGRAM,
    "input": {
      "shape": ["n", size, size, 3],
      "dtype": "uint8",
      "layout": "NHWC",
      "channel_order": "RGB",
      "resize": (
        f"resize each image to {size} x {size} before scoring: bilinear, half-pixel "
        "centres, no antialiasing (OpenCV INTER_LINEAR)"
      ),
      "normalisation": "(x / 255 - mean) / std, per channel, inside the program",
      "mean": list(det.mean),
      "std": list(det.std),
    },
    "outputs": OUTPUTS,
    "threshold": float(det.threshold),
    "target_fpr": float(det.target_fpr),
    "levels": list(det.levels),
    "aggregation": det.aggregation,
    "arch": det.arch,
    "dtype": det.dtype,
    "checkpoint_sha256": det.checkpoint_sha256,
    "detector_sha256": detector_sha256,
    "platforms": list(program.platforms),
    "calling_convention_version": int(program.calling_convention_version),
    "versions": jax_gad.versions(),
    "sha256": digests,
  }


def check_output(output) -> str:
  """The output folder as an absolute path; refuses a file or a folder that is not empty."""
  if not output:
    raise ValueError("--output is required (the folder to write the export to)")
  output = os.path.abspath(os.path.expanduser(os.fspath(output)))
  if os.path.exists(output) and not os.path.isdir(output):
    raise ValueError(f"--output={output} is a file; give a folder that is empty or absent")
  if os.path.isdir(output) and os.listdir(output):
    raise ValueError(
      f"--output={output} is a folder that is not empty ({len(os.listdir(output))} entries); "
      "give an empty or absent folder"
    )
  return output


def write(det: detector_lib.Detector, output, detector_sha256: str = "") -> dict:
  """Writes the export of ``det`` (backbone attached) into ``output`` atomically -> manifest."""
  output = check_output(output)
  program = export_program(det)
  written = {}

  def fill(folder):
    with open(os.path.join(folder, PROGRAM), "wb") as f:
      f.write(program.serialize())
    shutil.copyfile(export_loader.__file__, os.path.join(folder, LOADER))
    digests = {name: files.sha256(os.path.join(folder, name)) for name in (PROGRAM, LOADER)}
    written.update(manifest(det, program, digests, detector_sha256))
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(written, f, indent=1, sort_keys=True, allow_nan=False)
      f.write("\n")

  files.write_dir(output, fill)
  return written


def command(cfg: config.Export) -> dict:
  """What ``python -m jax_gad.export`` does, every check before any work; returns the manifest."""
  config.validate(cfg.exporting)
  detector, b = cfg.exporting.detector, cfg.backbone
  output = check_output(cfg.exporting.output)
  files.remove_stale_temporaries_beside(output)  # of exports killed while writing here
  det = detector_lib.read_detector(detector)
  det = detector_lib.attach_backbone(
    det, b.checkpoint, b.checkpoint_dir, where=f"--detector={detector}"
  )
  return write(det, output, files.sha256(os.path.expanduser(os.fspath(detector))))


def main(argv) -> int:
  """The export command (after flag parsing); returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  cfg = cli.build(config.Export)
  try:
    written = command(cfg)
  except (ValueError, OSError, MemoryError) as e:
    print(f"jax_gad.export: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax_gad.export: interrupted; nothing written", file=sys.stderr)
    return 130
  out = os.path.abspath(cfg.exporting.output)
  size = os.path.getsize(os.path.join(out, PROGRAM))
  print(
    f"exported {written['arch']} ({written['input']['shape'][1]} px, levels "
    f"{written['levels']}, threshold {written['threshold']:.4f}) for {written['platforms'][0]}: "
    f"{size / 2**20:.1f} MiB program"
  )
  print(f"wrote {out}; score with: python {os.path.join(out, LOADER)} {out} images.npy")
  return 0


def run() -> None:
  """Console-script entry point (``jax-gad-export``)."""
  cli.define(config.Exporting)  # this command's own flags: defined only when it runs
  cli.show_in_help(
    config.Export,
    exclude=tuple(
      n for n in config.options(config.Backbone) if n not in ("checkpoint", "checkpoint_dir")
    ),
  )
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
