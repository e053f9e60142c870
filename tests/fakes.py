"""Small MVTec-AD-shaped folders written by the tests (no download)."""

import os

import numpy as np
from PIL import Image


def _smooth_noise(rng, size, channels):
  """A blurry texture: upsampled coarse noise, values in 60..200."""
  coarse = rng.uniform(60, 200, size=(size // 4 + 1, size // 4 + 1, channels))
  img = np.kron(coarse, np.ones((4, 4, 1)))[:size, :size]
  return img.astype(np.uint8)


def write_mvtec(
  root,
  categories=(("bottle", "rgb"), ("grid", "gray")),
  n_train=10,
  n_good_test=4,
  defects=(("crack", 3), ("hole", 3)),
  size=32,
  seed=0,
):
  """Writes ``root/<category>/{train/good, test/<defect>, ground_truth/<defect>}`` PNGs.

  Defects are bright squares; their masks mark the square. Grayscale categories are
  written as single-channel PNGs, as MVTec's grid, screw and zipper are.

  Returns:
    The root path, as a string.
  """
  rng = np.random.default_rng(seed)
  for category, mode in categories:
    channels = 3 if mode == "rgb" else 1

    def save(rel, arr):
      path = os.path.join(root, category, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(path)

    for i in range(n_train):
      save(f"train/good/{i:03d}.png", _smooth_noise(rng, size, channels))
    for i in range(n_good_test):
      save(f"test/good/{i:03d}.png", _smooth_noise(rng, size, channels))
    for defect, count in defects:
      for i in range(count):
        img = _smooth_noise(rng, size, channels)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size - size // 4, 2)
        img[y : y + size // 4, x : x + size // 4] = 255
        mask[y : y + size // 4, x : x + size // 4] = 255
        save(f"test/{defect}/{i:03d}.png", img)
        save(f"ground_truth/{defect}/{i:03d}_mask.png", mask[..., None])
  return str(root)


def extract_features(
  module,
  variables,
  source,
  *,
  image_size,
  mean,
  std,
  batch_size=8,
  mesh=None,
  levels=tuple(range(9)),
  num_workers=2,
  progress=False,
  desc="features",
  preprocess=None,
):
  """One extractor + the decode pipeline: jax_gad's path from a source to pooled features.

  ``preprocess``, when given, is ``f(image, size, mean, std)`` as
  ``jax_gad.data.preprocess.prepare_image``.
  """
  from jax_gad import features

  extractor = features.LevelExtractor(
    module, variables, image_size=image_size, mesh=mesh, levels=levels, batch_size=batch_size
  )
  return pooled(
    extractor,
    source,
    mean=mean,
    std=std,
    num_workers=num_workers,
    progress=progress,
    desc=desc,
    preprocess=preprocess,
  )


def pooled(
  extractor, source, *, mean, std, num_workers=2, progress=False, desc="features", preprocess=None
):
  """``pipeline.pooled_features`` with a test-style ``preprocess(image, size, mean, std)``."""
  from jax_gad.data import pipeline

  size = extractor.image_size
  fn = None if preprocess is None else (lambda image: preprocess(image, size, mean, std))
  return pipeline.pooled_features(
    extractor,
    source,
    image_size=size,
    mean=mean,
    std=std,
    num_workers=num_workers,
    progress=progress,
    desc=desc,
    preprocess=fn,
  )


def write_synthetic_mvtec(
  root, category, name=None, *, n_train, n_test, size=64, background="default"
):
  """Writes a generated synthetic_ad category in the MVTec layout under ``root/<name>``.

  Returns:
    The root path, as a string.
  """
  from jax_gad.data import synthetic_ad

  name = name or category
  splits = synthetic_ad.generate(
    category, n_train=n_train, n_test=n_test, size=size, background=background
  )
  for split, items in splits.items():
    for ex in items:
      folder, defect, stem = ex["file_name"].removesuffix(".png").split("/")
      path = os.path.join(root, name, folder, defect, f"{stem}.png")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(ex["image"]).save(path)
      if ex["label"]:
        mask = os.path.join(root, name, "ground_truth", defect, f"{stem}_mask.png")
        os.makedirs(os.path.dirname(mask), exist_ok=True)
        Image.fromarray(ex["mask"]).save(mask)
  return str(root)
