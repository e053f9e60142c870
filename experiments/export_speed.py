r"""Size, load time and scoring speed of an export, next to jax_gad's own scoring path.

  python experiments/export_speed.py efficientnet-lite0 [BATCH ...]

Builds a detector on all 9 levels at the arch's native size (Lite0-2: the
packaged ImageNet weights; other archs: random weights of the same shapes,
which give the same size and speed), its Gaussians fitted on random pooled
features, exports it with ``jax_gad.export.write`` and prints one JSON object:
the file sizes; the loader's ``load`` (sha256 checks + deserialisation) and
first call (compilation) in seconds; and, for each batch size (default 1 8),
ms per image of the export's ``score`` and of jax_gad's compiled extractor +
``Detector.score_features`` (images already normalised there, so that path
does slightly less), the best of 3 calls after one warm-up.
"""

import importlib.util
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from jax_gad import checkpoint, detector, export
from jax_gad.models import efficientnet


def _detector(arch):
  if arch in checkpoint.LITE_PACKAGES:
    path = checkpoint.ensure_checkpoint(arch, tempfile.mkdtemp())
    variables, meta = checkpoint.load_checkpoint(path, arch=arch)
  else:
    variables, meta = efficientnet.init(arch, jax.random.key(0)), None
  size = efficientnet.native_resolution(arch)
  rng = np.random.default_rng(0)
  widths = efficientnet.level_widths(arch)
  feats = [rng.gamma(1.0, 1.0, (64, w)).astype(np.float32) for w in widths]
  det = detector.fit_features(
    feats,
    levels=tuple(range(len(widths))),
    n_folds=2,
    arch=arch,
    image_size=size,
    mean=tuple(meta["mean"]) if meta else (0.485, 0.456, 0.406),
    std=tuple(meta["std"]) if meta else (0.229, 0.224, 0.225),
  )
  return det.replace(backbone=detector.Backbone(efficientnet.create(arch), variables, ""))


def _best_ms(fn, images, repeats=3):
  jax.block_until_ready(fn(images))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(images))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times) / len(images)


def main(arch, batches):
  det = _detector(arch)
  out = os.path.join(tempfile.mkdtemp(), "export")
  start = time.perf_counter()
  export.write(det, out)
  row = {"arch": arch, "image_size": det.image_size, "export_s": time.perf_counter() - start}
  row["bytes"] = {name: os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)}
  spec = importlib.util.spec_from_file_location("load", os.path.join(out, export.LOADER))
  loader = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loader)
  start = time.perf_counter()
  score = loader.load(out)
  row["load_s"] = time.perf_counter() - start
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (max(batches), det.image_size, det.image_size, 3), np.uint8)
  start = time.perf_counter()
  score(images[:1])
  row["first_call_s"] = time.perf_counter() - start
  row["export_ms_per_image"], row["jax_gad_ms_per_image"] = {}, {}
  mean, std = np.float32(det.mean), np.float32(det.std)
  for b in batches:
    row["export_ms_per_image"][b] = _best_ms(score, images[:b])
    extractor = det.extractor(b)
    x = (images[:b] / np.float32(255) - mean) / std
    row["jax_gad_ms_per_image"][b] = _best_ms(
      lambda x: det.score_features(extractor(x)).total, x.astype(np.float32)
    )
  print(json.dumps(row, indent=1))


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  main(sys.argv[1], [int(b) for b in sys.argv[2:]] or [1, 8])
