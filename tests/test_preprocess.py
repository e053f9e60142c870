"""Tests for jax_gad.data.preprocess against OpenCV (a test-only reference)."""

import numpy as np
import pytest

from jax_gad.data import preprocess

cv2 = pytest.importorskip("cv2")

# (in_h, in_w, out_h, out_w): up, down, non-square, exact halving, identity, 1-pixel.
SHAPES = [
  (16, 16, 224, 224),
  (300, 300, 224, 224),
  (90, 70, 38, 38),
  (7, 13, 5, 29),
  (200, 200, 100, 100),
  (31, 17, 31, 17),
  (1, 1, 4, 4),
  (3, 50, 1, 1),
]


def _cv2_resize(image, out_h, out_w):
  out = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  if out.ndim == image.ndim - 1:  # OpenCV drops a trailing channel of 1
    out = out[..., None]
  return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_resize_matches_opencv_uint8(shape, channels):
  in_h, in_w, out_h, out_w = shape
  rng = np.random.default_rng(in_h * 1000 + in_w + channels)
  image = rng.integers(0, 256, (in_h, in_w, channels), dtype=np.uint8)
  ours = preprocess.resize_bilinear(image, (out_h, out_w))
  ref = _cv2_resize(image, out_h, out_w)
  assert ours.dtype == np.float32
  assert ours.shape == (out_h, out_w, channels)
  # OpenCV's uint8 path is fixed point and rounded: within one grey level.
  assert np.abs(ours - ref.astype(np.float32)).max() < 1.0
  assert np.abs(np.round(ours) - ref).max() <= 1


@pytest.mark.parametrize("shape", SHAPES)
def test_resize_matches_opencv_float_exactly(shape):
  # With float input OpenCV interpolates in floating point: the sampling rule
  # (half-pixel centres, clamped borders, no antialiasing) must then agree to
  # float32 rounding.
  in_h, in_w, out_h, out_w = shape
  rng = np.random.default_rng(in_h + in_w)
  image = rng.uniform(0, 255, (in_h, in_w, 3)).astype(np.float32)
  ours = preprocess.resize_bilinear(image, (out_h, out_w))
  np.testing.assert_allclose(ours, _cv2_resize(image, out_h, out_w), atol=1e-3)


def test_resize_square_int_size_and_2d_input():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (40, 25), dtype=np.uint8)
  ours = preprocess.resize_bilinear(image, 19)
  assert ours.shape == (19, 19)
  ref = cv2.resize(image, (19, 19), interpolation=cv2.INTER_LINEAR)
  assert np.abs(ours - ref).max() < 1.0


def test_resize_does_not_antialias():
  # Downscaling 16 -> 4 samples source coordinate 4 * d + 1.5, i.e. pixels 1 and
  # 2 of each 4x4 block; a bright pixel 0 of every block must therefore vanish
  # (an antialiased or area resize would average it in).
  sparse = np.zeros((16, 16, 1), np.uint8)
  sparse[::4, ::4] = 255
  assert np.all(preprocess.resize_bilinear(sparse, 4) == 0)
  assert np.all(_cv2_resize(sparse, 4, 4) == 0)


def test_resize_is_deterministic():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (33, 21, 3), dtype=np.uint8)
  a = preprocess.resize_bilinear(image, 64)
  b = preprocess.resize_bilinear(image.copy(), 64)
  assert np.array_equal(a, b)


@pytest.mark.parametrize(
  "image, size, match",
  [
    (np.zeros((4,), np.uint8), 2, "shape"),
    (np.zeros((0, 4, 3), np.uint8), 2, "non-empty"),
    (np.zeros((4, 4, 3), np.uint8), 0, "positive"),
    (np.zeros((4, 4, 3), np.uint8), (2, 2, 2), "pair"),
    (np.zeros((4, 4, 3), np.uint8), "big", "pair"),
    (np.zeros((4, 4, 3), bool), 2, "real dtype"),
  ],
)
def test_resize_rejects_bad_input(image, size, match):
  with pytest.raises(ValueError, match=match):
    preprocess.resize_bilinear(image, size)


def test_normalize_matches_formula():
  rng = np.random.default_rng(3)
  x = rng.uniform(0, 1, (5, 6, 3)).astype(np.float32)
  out = preprocess.normalize(x, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
  ref = (x.astype(np.float64) - np.array(preprocess.IMAGENET_MEAN)) / np.array(
    preprocess.IMAGENET_STD
  )
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_lite_constants_give_x255_minus_127_over_128():
  x = np.arange(256, dtype=np.float32).reshape(16, 16, 1).repeat(3, axis=-1)
  out = preprocess.normalize(x / 255.0, preprocess.LITE_MEAN, preprocess.LITE_STD)
  np.testing.assert_allclose(out, (x - 127.0) / 128.0, atol=1e-5)


@pytest.mark.parametrize(
  "mean, std, match",
  [
    ((0.5, 0.5), (0.2, 0.2, 0.2), "one value per channel"),
    ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), "positive"),
  ],
)
def test_normalize_rejects_bad_stats(mean, std, match):
  with pytest.raises(ValueError, match=match):
    preprocess.normalize(np.zeros((2, 2, 3), np.float32), mean, std)


def test_prepare_image_against_opencv_pipeline():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  out = preprocess.prepare_image(image, 24, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
  ref = cv2.resize(image, (24, 24), interpolation=cv2.INTER_LINEAR) / 255.0
  ref = (ref - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  # One grey level in [0, 1] units divided by the smallest std.
  assert np.abs(out - ref).max() < 1.0 / 255.0 / min(preprocess.IMAGENET_STD)


def test_prepare_image_grayscale_becomes_three_channels():
  rng = np.random.default_rng(5)
  gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
  out2d = preprocess.prepare_image(gray, 8, preprocess.LITE_MEAN, preprocess.LITE_STD)
  out3d = preprocess.prepare_image(
    np.repeat(gray[..., None], 3, axis=-1), 8, preprocess.LITE_MEAN, preprocess.LITE_STD
  )
  assert out2d.shape == (8, 8, 3)
  assert np.array_equal(out2d, out3d)


def test_prepare_image_rejects_non_uint8_and_bad_channels():
  with pytest.raises(ValueError, match="uint8"):
    preprocess.prepare_image(
      np.zeros((4, 4, 3), np.float32), 2, preprocess.LITE_MEAN, preprocess.LITE_STD
    )
  with pytest.raises(ValueError, match="shape"):
    preprocess.prepare_image(
      np.zeros((4, 4, 4), np.uint8), 2, preprocess.LITE_MEAN, preprocess.LITE_STD
    )
