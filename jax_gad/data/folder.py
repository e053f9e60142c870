"""Any MVTec-shaped image folder as a TFDS dataset (``folder``), masks optional.

The raw data of one category is laid out as MVTec AD is::

    <data_dir>/<category>/train/good/<images>                    (required)
    <data_dir>/<category>/test/<defect type or good>/<images>    (optional)
    <data_dir>/<category>/ground_truth/<defect type>/<stem>_mask.<ext>   (optional)

Any category name made of letters, digits, ``_``, ``-`` and ``.`` is accepted.

Masks are optional for the whole category: without a ``ground_truth/`` folder
the category is image-level only (``Split.has_masks`` is False and every mask
is all zero; :meth:`jax_gad.data.Split.require_masks` says so clearly); with
one, every defect image needs its mask. Without ``test/`` the category can be
fitted on (train split) but has no test split.

Image files: PNG, JPEG, BMP and TIFF (extensions ``.png .jpg .jpeg .bmp .tif
.tiff``, any case; hidden files ignored). Pixel formats and how they become
the stored RGB uint8 image:

* 8-bit RGB: unchanged. 8-bit gray (and 1-bit): the gray value in all three
  channels. Palette images: the palette colours.
* RGBA / gray + alpha: the alpha channel is dropped (colour values kept as
  stored, not composited over a background).
* 16-bit gray: scaled linearly from the full 16-bit range to 8 bits,
  ``round(v * 255 / 65535)`` (no contrast stretch; 12-bit data stored in 16
  bits looks dark, as it does in an image viewer).
* 16-bit colour (RGB PNG or TIFF): accepted; the decoder (Pillow) keeps the
  high byte of each channel, ``v // 256`` (within one grey level of the
  16-bit gray rule).
* 32-bit integer and floating-point pixels (TIFF modes ``I`` and ``F``) are
  refused with a message naming the file and the mode: their value range is
  not known (a 32-bit TIFF often holds 8-bit values), so no scaling is safe.
  CMYK and other modes are refused the same way. Empty or undecodable files
  are refused naming the file.

Masks: any of those formats; a pixel is defect when its value is non-zero
(stored as 255), normal when it is 0. A mask whose size differs from its
image is refused naming both files. Two kinds of mask are kept but recorded
(``Split.mask_notes``, warned about and written to results.json by
``jax_gad.main``): a mask that is not binary (values other than 0 and its
maximum, e.g. the soft edges JPEG leaves: every non-zero pixel still counts
as defect), and a defect image's mask that is all zero (its pixels count as
normal in the pixel AUROC and AUPRO).

Prepared data is keyed on the raw folder: the builder config's name is
``<category>-<16 hex digits of the raw fingerprint>`` (see
:func:`raw_fingerprint`), so a changed raw folder is prepared anew and two
different raw folders never share prepared data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
import re
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jax_gad.data import common

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF")
_CATEGORY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

LAYOUT = """\
<data_dir>/<category>/train/good/<images>
<data_dir>/<category>/test/<defect type or good>/<images>        (optional)
<data_dir>/<category>/ground_truth/<defect type>/<stem>_mask.png (optional)"""


class Source(NamedTuple):
  """One raw example found on disk (before decoding)."""

  file_name: str  # relative to the category folder, e.g. 'test/crack/000.png'
  label: int  # 0 good, 1 defect
  defect_type: str  # 'good' for good images
  image_path: Path
  mask_path: Optional[Path]  # None for good images and categories without masks


class Layout(NamedTuple):
  """What :func:`scan` found for one category."""

  category_dir: Path
  train: list  # [Source]
  test: list  # [Source]; empty when there is no test/ folder
  has_masks: bool


def list_images(folder: Path, extensions=IMAGE_EXTENSIONS) -> list[Path]:
  """Image files of one folder (not recursive), sorted by name; hidden files ignored."""
  return sorted(
    (
      p
      for p in folder.iterdir()
      if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file()
    ),
    key=lambda p: p.name,
  )


def check_category_name(category) -> None:
  """A folder category is a plain folder name (letters, digits, ``_ - .``)."""
  if not isinstance(category, str) or not _CATEGORY_RE.match(category):
    raise ValueError(
      f"folder category must be a folder name of letters, digits, '_', '-' and '.' "
      f"(not starting with '.' or '-'), got {category!r}"
    )


def _subdirs(folder: Path) -> list[Path]:
  return sorted(
    (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
  )


def scan(
  data_dir,
  category: str,
  *,
  extensions=IMAGE_EXTENSIONS,
  dataset: str = "folder",
  require_test: bool = False,
  require_masks: bool = False,
  layout_help: str = LAYOUT,
) -> Layout:
  """Lists a category's examples in dataset order.

  Order: train/good sorted by file name; test folders sorted by name, files
  sorted by name within each (the protocol's order, as for MVTec AD).

  Args:
    data_dir: the folder holding one folder per category.
    category: the category folder's name.
    extensions: lower-case file extensions that count as images.
    dataset: dataset name used in messages.
    require_test: refuse a category without test images (MVTec AD).
    require_masks: every defect image needs its mask (MVTec AD), even without
      ``ground_truth/``; otherwise masks are optional for the whole category.
    layout_help: the expected layout, shown in messages.

  Returns:
    A :class:`Layout`.

  Raises:
    ValueError: data_dir or the category folder missing, no ``train/good``
      images, missing test images or masks where required, or (when the
      category has ``ground_truth/``) a defect image without its mask; the
      message names the path and shows the expected layout.
  """
  if data_dir is None:
    raise ValueError(
      f"{dataset}: data_dir is required (the folder holding <category>/train/good)."
      f"\nExpected layout:\n{layout_help}"
    )
  root = Path(os.fspath(data_dir)).expanduser()
  if not root.is_dir():
    raise ValueError(
      f"{dataset} data_dir {root} does not exist or is not a folder.\n"
      f"Expected layout:\n{layout_help}"
    )
  cat_dir = root / category
  if not cat_dir.is_dir():
    hint = ""
    nested = [d for d in _subdirs(root) if (d / category).is_dir()]
    if (root / "train" / "good").is_dir():
      hint = " It looks like a single category folder; pass its parent folder as data_dir."
    elif nested:
      hint = f" The category is one level down: pass {nested[0]} as data_dir."
    found = [d.name for d in _subdirs(root) if (d / "train" / "good").is_dir()]
    raise ValueError(
      f"{dataset} data_dir {root} has no folder for category {category!r} "
      f"(expected {cat_dir}); categories found: {found or 'none'}.{hint}\n"
      f"Expected layout:\n{layout_help}"
    )
  train_dir = cat_dir / "train" / "good"
  kinds = "/".join(e.lstrip(".") for e in extensions)
  train_files = list_images(train_dir, extensions) if train_dir.is_dir() else []
  if not train_files:
    raise ValueError(
      f"{dataset} category folder {cat_dir} has no training images: expected {kinds} "
      f"files in {train_dir}.\nExpected layout:\n{layout_help}"
    )
  train = [Source(f"train/good/{p.name}", 0, "good", p, None) for p in train_files]
  test_dir = cat_dir / "test"
  gt_dir = cat_dir / "ground_truth"
  # With require_masks (MVTec AD) every defect image needs its mask, ground_truth/ or not.
  has_masks = gt_dir.is_dir() or require_masks
  test = []
  for d in _subdirs(test_dir) if test_dir.is_dir() else []:
    for p in list_images(d, extensions):
      if d.name == "good":
        test.append(Source(f"test/good/{p.name}", 0, "good", p, None))
        continue
      mask = None
      if has_masks:
        mask = _find_mask(gt_dir / d.name, p.stem, extensions)
        if mask is None:
          raise ValueError(
            f"defect image {p} has no ground-truth mask: expected "
            f"{gt_dir / d.name / (p.stem + '_mask.png')}"
            + (
              ""
              if require_masks
              else " (the category has a ground_truth/ folder, so every defect image needs a "
              "mask; remove ground_truth/ for an image-level-only category)"
            )
          )
      test.append(Source(f"test/{d.name}/{p.name}", 1, d.name, p, mask))
  if require_test and not test:
    raise ValueError(
      f"{dataset} category folder {cat_dir} has no test images: expected {kinds} files in "
      f"{test_dir}/<defect type>/.\nExpected layout:\n{layout_help}"
    )
  return Layout(cat_dir, train, test, has_masks)


def _find_mask(folder: Path, stem: str, extensions) -> Optional[Path]:
  for ext in (".png",) + tuple(e for e in extensions if e != ".png"):
    for candidate in (folder / f"{stem}_mask{ext}", folder / f"{stem}_mask{ext.upper()}"):
      if candidate.is_file():
        return candidate
  return None


def raw_fingerprint(layout: Layout) -> str:
  """Identity of the raw files a category is built from, without reading them.

  Hashes the category folder's real path and, for every image and mask the
  scan found, its relative path, size and modification time (ns), plus whether
  the category has masks. Any added, removed, renamed, rewritten or touched
  file changes it; a different raw folder (another real path) always has
  another fingerprint. Stat-only on purpose: it is computed at every load, and
  reading every byte of a multi-GB folder each time would cost more than the
  run's startup. (The bytes are hashed once, at build time, into the split's
  content hash, which is what feature caches are keyed on.) A file replaced by
  one of the same size with its modification time forged back (``cp -p``,
  ``touch -r``) is the one change this cannot see; re-prepare explicitly after
  such edits by deleting the prepared folder.
  """
  digest = hashlib.sha256()
  digest.update(json.dumps([os.path.realpath(layout.category_dir), layout.has_masks]).encode())
  for src in layout.train + layout.test:
    for path in (src.image_path, src.mask_path):
      if path is None:
        continue
      st = path.stat()
      rel = os.path.relpath(path, layout.category_dir)
      digest.update(json.dumps([rel, st.st_size, st.st_mtime_ns]).encode() + b"\n")
  return digest.hexdigest()


def _clean_message(message: str, path) -> str:
  """PIL names in-memory files as ``<_io.BytesIO object at 0x...>``; name the user's file."""
  return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", os.fspath(path), message)


def open_image_file(data: bytes, path, formats=IMAGE_FORMATS) -> Image.Image:
  """Fully decodes an image file's bytes with PIL; ValueError naming ``path`` if unusable."""
  if not data:
    raise ValueError(f"image file {os.fspath(path)} is empty (0 bytes)")
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises several types for broken files.
    raise ValueError(
      f"cannot decode image file {os.fspath(path)}: {_clean_message(str(e), path)}"
    ) from None
  if image.format not in formats:
    raise ValueError(
      f"image file {os.fspath(path)} is {image.format or 'of an unknown format'}; "
      f"supported formats: {', '.join(formats)}"
    )
  return image


def to_rgb8(image: Image.Image, path) -> np.ndarray:
  """A decoded PIL image -> uint8 (H, W, 3) by the module's documented rules."""
  mode = image.mode
  if mode == "RGB":
    return np.asarray(image, dtype=np.uint8)
  if mode in ("L", "1", "P", "RGBA", "LA", "PA", "La"):
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  # 16-bit gray; older Pillow opens 16-bit gray PNG as "I" (PNG has no 32-bit pixels).
  if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
    values = np.asarray(image).astype(np.int64)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode.startswith(("I", "F")):
    kind = "32-bit integer" if mode.startswith("I") else "floating-point"
    raise ValueError(
      f"image file {os.fspath(path)} has {kind} pixels (mode {mode!r}); 32-bit integer and "
      "float images are refused (their value range is unknown): save it as 8-bit or 16-bit"
    )
  raise ValueError(
    f"image file {os.fspath(path)} has unsupported pixel format {mode!r}; expected 8-bit "
    "gray, RGB or RGBA, or 16-bit gray or RGB"
  )


def read_image(path: Path, formats=IMAGE_FORMATS) -> tuple[bytes, bytes, tuple[int, int]]:
  """Reads and validates one image file.

  Returns:
    (raw file bytes, RGB PNG bytes to store, (H, W)). An 8-bit RGB PNG is
    stored as it is; everything else is converted and re-encoded (zlib level 1:
    about 3x faster than level 6 for large images at ~30 % more bytes).
  """
  data = Path(path).read_bytes()
  image = open_image_file(data, path, formats)
  size = (image.height, image.width)
  if image.format == "PNG" and image.mode == "RGB":
    return data, data, size
  return data, common.encode_png(to_rgb8(image, path), compress_level=1), size


def mask_notes(values: np.ndarray) -> list[str]:
  """What is odd about a mask's pixel values: ``'non_binary'``, ``'empty'`` (both, one or none).

  ``non_binary``: values other than 0 and the mask's maximum; ``empty``: all zero.
  """
  top = int(values.max()) if values.size else 0
  notes = []
  if np.any((values != 0) & (values != top)):
    notes.append("non_binary")
  if top == 0:
    notes.append("empty")
  return notes


def read_mask(
  path: Path, image_path: Path, size: tuple[int, int], formats=IMAGE_FORMATS
) -> tuple[bytes, bytes, list]:
  """Reads a mask file; returns (raw bytes, single-channel 0/255 PNG bytes, :func:`mask_notes`)."""
  data = Path(path).read_bytes()
  mask = open_image_file(data, path, formats)
  if (mask.height, mask.width) != size:
    raise ValueError(
      f"mask file {path} is {mask.height}x{mask.width} but its image {image_path} is "
      f"{size[0]}x{size[1]}"
    )
  if mask.mode in ("L", "1", "P", "RGB", "RGBA", "LA"):
    values = np.asarray(mask.convert("L"))
  elif mask.mode.startswith("I"):
    values = np.asarray(mask)
  else:
    raise ValueError(f"mask file {path} has unsupported pixel format {mask.mode!r}")
  notes = mask_notes(values)
  if mask.format == "PNG" and mask.mode == "L" and np.isin(values, (0, 255)).all():
    return data, data, notes  # already binary 0/255: stored unchanged
  return data, common.encode_png(np.where(values > 0, 255, 0).astype(np.uint8)), notes


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """One raw category folder. Built by :func:`make_config`; the name carries the fingerprint."""

  category: str = ""
  raw_dir: str = ""  # the category folder (absolute path as given)
  raw_fingerprint: str = ""


def make_config(config_cls, layout: Layout, category: str, description: str = ""):
  """The builder config of a scanned category, named ``<category>-<fingerprint[:16]>``."""
  fingerprint = raw_fingerprint(layout)
  return config_cls(
    name=f"{category}-{fingerprint[:16]}",
    category=category,
    raw_dir=os.path.abspath(layout.category_dir),
    raw_fingerprint=fingerprint,
    description=description
    or f"Images of category {category!r} from {os.path.realpath(layout.category_dir)}.",
  )


class Folder(common.IntegrityMixin, tfds.core.GeneratorBasedBuilder):
  """An MVTec-shaped folder of one category (see the module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "First release: any category name, masks optional.",
    "1.1.0": "Records masks that are not binary or all zero (mask_notes).",
  }
  BUILDER_CONFIG_CLASS = FolderConfig
  # How this builder scans (subclasses narrow it, e.g. MVTec AD: PNG only, masks required).
  EXTENSIONS: tuple[str, ...] = IMAGE_EXTENSIONS
  FORMATS: tuple[str, ...] = IMAGE_FORMATS
  REQUIRE_TEST = False
  REQUIRE_MASKS = False
  LAYOUT_HELP = LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="A user's MVTec-shaped image folder: defect-free training images, optional "
      "test images (good or one of several defect types), optional masks.",
      features=common.features(),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  @classmethod
  def scan(cls, data_dir, category: str) -> Layout:
    return scan(
      data_dir,
      category,
      extensions=cls.EXTENSIONS,
      dataset=cls.name,
      require_test=cls.REQUIRE_TEST,
      require_masks=cls.REQUIRE_MASKS,
      layout_help=cls.LAYOUT_HELP,
    )

  def _layout(self, dl_manager) -> Layout:
    cfg = self.builder_config
    if not getattr(cfg, "raw_dir", ""):
      raise ValueError(
        f"{self.name}: build through jax_gad.data.load(..., data_dir=...), which "
        "keys the prepared data on the raw folder"
      )
    del dl_manager
    layout = self.scan(os.path.dirname(cfg.raw_dir), cfg.category)
    if raw_fingerprint(layout) != cfg.raw_fingerprint:
      raise ValueError(
        f"the raw folder {cfg.raw_dir} changed while it was being prepared; run again"
      )
    return layout

  def _split_generators(self, dl_manager):
    layout = self._layout(dl_manager)
    self.info.metadata["has_masks"] = bool(layout.has_masks)
    self.info.metadata["raw_dir"] = self.builder_config.raw_dir
    self.info.metadata["raw_fingerprint"] = self.builder_config.raw_fingerprint
    splits = {"train": self._generate_examples("train", layout.train)}
    if layout.test:
      splits["test"] = self._generate_examples("test", layout.test)
    return splits

  def _generate_examples(self, split, sources):
    recorder = common.SplitRecorder()
    empty_masks = {}
    for src in sources:
      image_data, image_png, size = read_image(src.image_path, self.FORMATS)
      if src.mask_path is None:
        mask_data = b""
        if size not in empty_masks:
          empty_masks[size] = common.encode_png(np.zeros(size, np.uint8))
        mask_png = empty_masks[size]
      else:
        mask_data, mask_png, notes = read_mask(src.mask_path, src.image_path, size, self.FORMATS)
        for note in notes:
          recorder.note(note, src.file_name)
      content = common.sha256(
        common.sha256(image_data).encode() + common.sha256(mask_data).encode()
      )
      key = recorder.add(
        src.file_name, src.label, src.defect_type, content, stored=(image_png, mask_png)
      )
      yield (
        key,
        {
          "image": image_png,
          "mask": mask_png,
          "label": src.label,
          "defect_type": src.defect_type,
          "file_name": src.file_name,
        },
      )
    common.store_split_metadata(self.info, split, recorder)
