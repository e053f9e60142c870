"""Pieces shared by the TFDS builders: features, PNG coding, split metadata.

Both builders store images and masks as PNG bytes in ``tfds.features.Image``
features (bytes are stored as they are, so no TensorFlow is needed to build),
write ``array_record`` files, keep the examples in the order they are generated
(``disable_shuffling=True`` with integer keys 0, 1, 2, ...), and record per split
the file names, labels, defect types and a content hash in the dataset's
``MetadataDict``, so that reading the metadata never decodes an image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

LABEL_NAMES = ("good", "defect")
SPLITS = ("train", "test")
# Bumped whenever the layout of the metadata below changes.
METADATA_FORMAT = 1


def features() -> tfds.features.FeaturesDict:
  """The feature spec shared by mvtec_ad and synthetic_ad."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "label": tfds.features.ClassLabel(names=LABEL_NAMES),
      "defect_type": tfds.features.Text(),
      "file_name": tfds.features.Text(),
  })


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
  """uint8 (H, W) or (H, W, 3) -> PNG bytes (PIL; zlib level 0..9)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(
      buffer, format="PNG", compress_level=compress_level)
  return buffer.getvalue()


def open_png(data: bytes, source: Any) -> Image.Image:
  """Fully decodes PNG bytes with PIL; ValueError naming ``source`` if corrupt."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises several types for broken files.
    raise ValueError(f"cannot decode image file {os.fspath(source)}: {e}") from e
  if image.format != "PNG":
    raise ValueError(
        f"image file {os.fspath(source)} is not a PNG (PIL reads it as {image.format})"
    )
  return image


def decode_image(data: bytes) -> np.ndarray:
  """Stored image PNG bytes -> uint8 (H, W, 3)."""
  with Image.open(io.BytesIO(data)) as image:
    if image.mode != "RGB":
      image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
  """Stored mask PNG bytes -> uint8 (H, W), values 0 or 255."""
  with Image.open(io.BytesIO(data)) as image:
    if image.mode != "L":
      image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class SplitRecorder:
  """Accumulates, in example order, what the split metadata holds."""

  def __init__(self):
    self.file_names: list[str] = []
    self.labels: list[int] = []
    self.defect_types: list[str] = []
    self._content = hashlib.sha256()

  def add(self, file_name: str, label: int, defect_type: str, content_sha256: str) -> int:
    """Records one example; returns its index (the TFDS key)."""
    self.file_names.append(file_name)
    self.labels.append(int(label))
    self.defect_types.append(defect_type)
    line = json.dumps([file_name, int(label), defect_type, content_sha256])
    self._content.update(line.encode("utf-8") + b"\n")
    return len(self.file_names) - 1

  def as_metadata(self) -> dict:
    return {
        "file_names": list(self.file_names),
        "labels": list(self.labels),
        "defect_types": list(self.defect_types),
        "content_sha256": self._content.hexdigest(),
    }


def store_split_metadata(info: tfds.core.DatasetInfo, split: str, recorder: SplitRecorder):
  """Puts a finished split's record into ``info.metadata`` (saved with the dataset)."""
  info.metadata["format"] = METADATA_FORMAT
  info.metadata.setdefault("splits", {})[split] = recorder.as_metadata()
