"""Scores images with a folder written by ``python -m jax_gad.export``; needs jax and numpy only.

  python load.py DIR images.npy   # uint8 (n, S, S, 3) RGB -> one "total decision" line per image

From Python: ``score = load(DIR)``, then ``score(images)`` returns numpy arrays
``per_level`` (n, L), ``total`` (n,) and ``anomalous`` (n,) bool. The export
writes this file into DIR as ``load.py``; it imports nothing from jax_gad.
"""

import hashlib
import json
import os
import sys

from jax import export
import numpy as np


def load(folder):
  """Checks every file against the sha256 in DIR/manifest.json; returns ``score(images)``."""
  with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  for name, digest in manifest["sha256"].items():
    with open(os.path.join(folder, name), "rb") as f:
      if hashlib.sha256(f.read()).hexdigest() != digest:
        raise ValueError(f"{os.path.join(folder, name)}: sha256 differs from manifest.json")
  with open(os.path.join(folder, manifest["program"]), "rb") as f:
    program = export.deserialize(bytearray(f.read()))
  shape = tuple(manifest["input"]["shape"][1:])

  def score(images):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != shape or len(images) < 1:
      raise ValueError(
        f"images must be uint8 of shape (n, {', '.join(map(str, shape))}) with n >= 1 "
        f"({manifest['input']['channel_order']}, resized as manifest.json says), "
        f"got {images.dtype} {images.shape}"
      )
    return {k: np.asarray(v) for k, v in program.call(images).items()}

  return score


if __name__ == "__main__":
  result = load(sys.argv[1])(np.load(sys.argv[2]))
  for total, anomalous in zip(result["total"], result["anomalous"]):
    print(f"{total!r} {'anomalous' if anomalous else 'normal'}")
