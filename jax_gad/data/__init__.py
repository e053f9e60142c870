"""Datasets (MVTec AD, any MVTec-shaped folder, synthetic AD) as TFDS builders read without TF.

Public API:
  CATEGORIES: dict dataset name -> tuple of category names ('folder': any folder name).
  load(dataset, category, split, *, data_dir=None, tfds_dir=None) -> Split
  preprocess: resize_bilinear, normalize, prepare_image.
"""

from jax_gad.data import preprocess
from jax_gad.data.folder import IMAGE_EXTENSIONS
from jax_gad.data.loader import CATEGORIES, DamagedDatasetError, Split, load, prepare
from jax_gad.data.mvtec_ad import (
  GRAYSCALE_CATEGORIES,
  MVTEC_CATEGORIES,
  MVTEC_COUNTS,
  TEXTURES,
)
from jax_gad.data.synthetic_ad import SYNTHETIC_CATEGORIES, SYNTHETIC_DEFECTS

__all__ = [
  "CATEGORIES",
  "DamagedDatasetError",
  "IMAGE_EXTENSIONS",
  "GRAYSCALE_CATEGORIES",
  "MVTEC_CATEGORIES",
  "MVTEC_COUNTS",
  "SYNTHETIC_CATEGORIES",
  "SYNTHETIC_DEFECTS",
  "Split",
  "TEXTURES",
  "load",
  "prepare",
  "preprocess",
]
