"""MVTec AD as a TFDS dataset built and read without TensorFlow (manual download).

One builder config per category. The raw data is the extracted MVTec AD
archive (the "manual dir"), laid out as::

    <data_dir>/<category>/train/good/*.png
    <data_dir>/<category>/test/<defect type>/*.png      (defect type 'good' too)
    <data_dir>/<category>/ground_truth/<defect type>/<name>_mask.png

Examples come out in the protocol's order: train/good files sorted by name;
test defect folders sorted by name, files sorted by name within each. Every
PNG is decoded once at build time to catch corrupt files. Single-channel
images (grid, screw, zipper) are stored as 3-channel PNGs; masks are stored as
single-channel PNGs with values 0/255 (nonzero pixels of the original mask
become 255); good test images get an all-zero mask of the image size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import tensorflow_datasets as tfds

from jax_gad.data import common, folder

MVTEC_CATEGORIES: tuple[str, ...] = (
  "bottle",
  "cable",
  "capsule",
  "carpet",
  "grid",
  "hazelnut",
  "leather",
  "metal_nut",
  "pill",
  "screw",
  "tile",
  "toothbrush",
  "transistor",
  "wood",
  "zipper",
)
TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS: tuple[str, ...] = tuple(c for c in MVTEC_CATEGORIES if c not in TEXTURES)
# Categories whose PNGs are single-channel in the official release.
GRAYSCALE_CATEGORIES: tuple[str, ...] = ("grid", "screw", "zipper")
# Number of (train, test) images per category in the official release.
MVTEC_COUNTS: dict[str, tuple[int, int]] = {
  "bottle": (209, 83),
  "cable": (224, 150),
  "capsule": (219, 132),
  "carpet": (280, 117),
  "grid": (264, 78),
  "hazelnut": (391, 110),
  "leather": (245, 124),
  "metal_nut": (220, 115),
  "pill": (267, 167),
  "screw": (320, 160),
  "tile": (230, 117),
  "toothbrush": (60, 42),
  "transistor": (213, 100),
  "wood": (247, 79),
  "zipper": (240, 151),
}

HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

EXPECTED_LAYOUT = """\
<data_dir>/<category>/train/good/*.png
<data_dir>/<category>/test/<defect type>/*.png
<data_dir>/<category>/ground_truth/<defect type>/<image name>_mask.png"""

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title     = {{MVTec AD} -- A Comprehensive Real-World Dataset for
               Unsupervised Anomaly Detection},
  author    = {Bergmann, Paul and Fauser, Michael and Sattlegger, David and
               Steger, Carsten},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition
               (CVPR)},
  pages     = {9592--9600},
  year      = {2019},
}"""

_DOWNLOAD_INSTRUCTIONS = f"""\
MVTec AD cannot be downloaded automatically: its licence (CC BY-NC-SA 4.0,
non-commercial use) asks each user to fetch it from {HOMEPAGE} .
Download the whole dataset (mvtec_anomaly_detection.tar.xz, about 5 GB) or
single categories, extract them into one folder, and pass that folder as
data_dir (jax_gad.data.load(..., data_dir=...), or the manual_dir of the TFDS
download config). The folder must look like:
{EXPECTED_LAYOUT}"""


def check_category(category: str) -> None:
  if category not in MVTEC_CATEGORIES:
    raise ValueError(
      f"unknown mvtec_ad category {category!r}; valid categories: {', '.join(MVTEC_CATEGORIES)}"
    )


def scan(data_dir, category: str) -> folder.Layout:
  """The folder scan of :mod:`jax_gad.data.folder` with MVTec AD's rules.

  PNG files only, test images and ground-truth masks required, one of the 15
  official category names.

  Raises:
    ValueError: unknown category, data_dir missing or not MVTec-shaped (the
      message names what is missing and how the folder should look), or a
      defect image whose mask file is missing (naming the image and the
      expected mask path).
  """
  check_category(category)
  if data_dir is None:
    raise ValueError(
      "mvtec_ad needs data_dir and no data_dir was given: pass the folder holding the "
      "extracted MVTec AD data (jax_gad checks the prepared data against it at every "
      f"load).\n{_DOWNLOAD_INSTRUCTIONS}"
    )
  root = Path(os.fspath(data_dir)).expanduser()
  if not root.is_dir():
    raise ValueError(
      f"MVTec AD data_dir {root} does not exist or is not a folder.\n{_DOWNLOAD_INSTRUCTIONS}"
    )
  return MvtecAd.scan(root, category)


@dataclasses.dataclass
class MvtecAdConfig(folder.FolderConfig):
  """One MVTec AD category, keyed on its raw folder (see ``folder.make_config``)."""


class MvtecAd(folder.Folder):
  """MVTec AD, one config per category and raw folder (manual download, no TensorFlow).

  MVTec AD is the folder layout with fixed names: PNG files, test images and
  masks required. ``BUILDER_CONFIGS`` lists the 15 categories for reference;
  ``jax_gad.data.load`` builds from a config named ``<category>-<raw
  fingerprint>`` so that the prepared data always matches the raw folder.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "First release: images (3 channels), masks (0/255), labels, "
    "defect types and file names in the protocol's sorted order.",
    "1.1.0": "Records masks that are not binary or all zero (mask_notes).",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIG_CLASS = MvtecAdConfig
  EXTENSIONS = (".png",)
  FORMATS = ("PNG",)
  REQUIRE_TEST = True
  REQUIRE_MASKS = True
  LAYOUT_HELP = EXPECTED_LAYOUT
  BUILDER_CONFIGS = [
    MvtecAdConfig(
      name=c,
      category=c,
      description=f"MVTec AD category '{c}' ({'texture' if c in TEXTURES else 'object'}).",
    )
    for c in MVTEC_CATEGORIES
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "MVTec AD: industrial images of 15 categories; training images are "
        "all defect-free, test images are defect-free or show one of "
        "several defect types, with pixel masks."
      ),
      features=common.features(),
      homepage=HOMEPAGE,
      citation=_CITATION,
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _layout(self, dl_manager) -> folder.Layout:
    cfg = self.builder_config
    if not cfg.raw_dir:  # a plain category config: the raw data is the TFDS manual dir
      try:
        root = dl_manager.manual_dir
      except AssertionError as e:  # TFDS's way of saying it is missing or empty
        raise ValueError(f"{e}") from e
      return scan(root, cfg.category)
    return super()._layout(dl_manager)
