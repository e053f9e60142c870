"""Datasets (MVTec AD, synthetic AD) as TFDS builders read without TensorFlow.

Public API:
  CATEGORIES: dict dataset name -> tuple of category names.
  load(dataset, category, split, *, data_dir=None, tfds_dir=None) -> Split
  folds(n_train, n_splits=5, seed=0) -> list of sorted index arrays
  preprocess: resize_bilinear, normalize, prepare_image.
"""

from jax_gad.data import preprocess
from jax_gad.data.loader import CATEGORIES, Split, folds, load, prepare
from jax_gad.data.mvtec_ad import (
    GRAYSCALE_CATEGORIES,
    MVTEC_CATEGORIES,
    MVTEC_COUNTS,
    TEXTURES,
)
from jax_gad.data.synthetic_ad import SYNTHETIC_CATEGORIES, SYNTHETIC_DEFECTS

__all__ = [
    "CATEGORIES",
    "GRAYSCALE_CATEGORIES",
    "MVTEC_CATEGORIES",
    "MVTEC_COUNTS",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFECTS",
    "Split",
    "TEXTURES",
    "folds",
    "load",
    "prepare",
    "preprocess",
]
