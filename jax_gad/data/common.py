"""Pieces shared by the TFDS builders: features, PNG coding, split metadata.

Both builders store images and masks as PNG bytes in ``tfds.features.Image``
features (bytes are stored as they are, so no TensorFlow is needed to build),
write ``array_record`` files, keep the examples in the order they are generated
(``disable_shuffling=True`` with integer keys 0, 1, 2, ...), and record per split
the file names, labels, defect types, a content hash of the source files and
a sha256 of every stored example in the dataset's ``MetadataDict``, so that
reading the metadata never decodes an image and every example read back can be
checked against what was written (:func:`stored_digest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

LABEL_NAMES = ("good", "defect")
# Written into every prepared dataset folder: its shard files' sizes and split counts.
INTEGRITY_FILE = "jax_gad_integrity.json"
INTEGRITY_FORMAT = 1
SPLITS = ("train", "test")
# Bumped whenever the layout of the metadata below changes.
# 2: per-example digests of the stored bytes ("stored_sha256").
METADATA_FORMAT = 2


def features() -> tfds.features.FeaturesDict:
  """The feature spec shared by mvtec_ad and synthetic_ad."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "label": tfds.features.ClassLabel(names=LABEL_NAMES),
      "defect_type": tfds.features.Text(),
      "file_name": tfds.features.Text(),
    }
  )


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
  """uint8 (H, W) or (H, W, 3) -> PNG bytes (PIL; zlib level 0..9)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(
    buffer, format="PNG", compress_level=compress_level
  )
  return buffer.getvalue()


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


def stored_digest(image: bytes, mask: bytes, label: int, defect_type: str, file_name: str) -> str:
  """sha256 of one stored example (its PNG bytes and fields), as written and as read back."""
  digest = hashlib.sha256()
  for part in (image, mask):
    digest.update(len(part).to_bytes(8, "little"))
    digest.update(part)
  digest.update(json.dumps([int(label), defect_type, file_name]).encode("utf-8"))
  return digest.hexdigest()


class SplitRecorder:
  """Accumulates, in example order, what the split metadata holds."""

  def __init__(self):
    self.file_names: list[str] = []
    self.labels: list[int] = []
    self.defect_types: list[str] = []
    self.stored_sha256: list[str] = []
    self.mask_notes: dict[str, list[str]] = {}
    self._content = hashlib.sha256()

  def note(self, kind: str, file_name: str) -> None:
    """Records something odd about an example's mask (``'non_binary'``, ``'empty'``)."""
    self.mask_notes.setdefault(kind, []).append(file_name)

  def add(
    self,
    file_name: str,
    label: int,
    defect_type: str,
    content_sha256: str,
    *,
    stored: tuple[bytes, bytes],
  ) -> int:
    """Records one example; returns its index (the TFDS key).

    Args:
      file_name, label, defect_type: the example's fields.
      content_sha256: hash of the source bytes (goes into the split's content hash).
      stored: the (image, mask) PNG bytes written to the dataset.
    """
    self.stored_sha256.append(stored_digest(stored[0], stored[1], label, defect_type, file_name))
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
      "stored_sha256": list(self.stored_sha256),
      "content_sha256": self._content.hexdigest(),
      "mask_notes": {k: list(v) for k, v in sorted(self.mask_notes.items())},
    }


def store_split_metadata(info: tfds.core.DatasetInfo, split: str, recorder: SplitRecorder):
  """Puts a finished split's record into ``info.metadata`` (saved with the dataset)."""
  info.metadata["format"] = METADATA_FORMAT
  info.metadata.setdefault("splits", {})[split] = recorder.as_metadata()


MASK_NOTES = {
  "non_binary": "mask(s) with values other than 0 and the maximum (every non-zero pixel counts "
  "as defect)",
  "empty": "defect image(s) whose mask is all zero (their pixels count as normal in the pixel "
  "AUROC and AUPRO)",
}


def mask_warnings(where: str, notes: dict) -> list[str]:
  """One line per kind of odd mask in ``notes`` (``{kind: [file names]}``), naming a few files."""
  lines = []
  for kind, names in sorted(notes.items()):
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    lines.append(f"{where}: {len(names)} {MASK_NOTES.get(kind, kind)}: {shown}")
  return lines


def shard_files(data_dir) -> list[str]:
  """Names of the record files of a prepared dataset folder, sorted."""
  return sorted(
    n for n in os.listdir(os.fspath(data_dir)) if ".array_record-" in n and not n.startswith(".")
  )


class IntegrityMixin:
  """Builder mixin: records file sizes and split counts when a build finishes.

  Runs inside TFDS's temporary ``incomplete.*`` folder, after the records are
  written and before the folder is renamed into place, so the record is part
  of the atomic result: a prepared folder always has it (``INTEGRITY_FILE``).
  """

  # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and
  # prepared" to stdout around every build; these builders download nothing
  # (they convert a local folder or generate images), and jax_gad.data.loader
  # announces the build itself.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    data_dir = os.fspath(self.data_dir)
    doc = {
      "format": INTEGRITY_FORMAT,
      "files": {n: os.path.getsize(os.path.join(data_dir, n)) for n in shard_files(data_dir)},
      "num_examples": {name: int(info.num_examples) for name, info in self.info.splits.items()},
    }
    # A plain write is enough: the folder it is in is renamed into place whole afterwards.
    with open(os.path.join(data_dir, INTEGRITY_FILE), "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=1, sort_keys=True)
