"""Image preprocessing: bilinear resize (OpenCV INTER_LINEAR rule) and normalisation.

The protocol (docs/method.md, "Preprocessing") resizes the whole image to the architecture's native
square resolution with bilinear interpolation, half-pixel centres and no
antialiasing (what ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` does),
scales to [0, 1] and normalises with the checkpoint's per-channel mean and std.
Everything here is plain numpy; OpenCV is only used by the tests as a reference.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

# Per-channel normalisation constants, on the [0, 1] scale.
# B-family (efficientnet-pytorch) checkpoints were trained with ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Lite checkpoints expect (x * 255 - 127) / 128, i.e. mean 127/255 and std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

Size = Union[int, Sequence[int]]


def output_size(size: Size) -> tuple[int, int]:
  """Returns (height, width) from an int or a (height, width) pair."""
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    out = (int(size), int(size))
  else:
    try:
      out = tuple(int(s) for s in size)
    except (TypeError, ValueError):
      raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    if len(out) != 2:
      raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}")
  if min(out) < 1:
    raise ValueError(f"size must be positive, got {size!r}")
  return out


def source_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Indices and weights of the two source samples for each output sample.

  Half-pixel centres: output sample ``d`` sits at source coordinate
  ``(d + 0.5) * n_in / n_out - 0.5``, clamped to ``[0, n_in - 1]`` (OpenCV's
  border rule). Returns ``(i0, i1, w1)`` with the result ``(1 - w1) * src[i0] +
  w1 * src[i1]``.
  """
  scale = n_in / n_out
  coord = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  coord = np.clip(coord, 0.0, n_in - 1)
  i0 = np.floor(coord).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = coord - i0
  return i0, i1, w1


def resize_bilinear(image: np.ndarray, size: Size) -> np.ndarray:
  """Resizes an image with OpenCV ``INTER_LINEAR`` semantics, in numpy.

  Bilinear interpolation with half-pixel centres, edge clamping and no
  antialiasing, for both up- and down-scaling. The result is not rounded, so it
  can differ from OpenCV's uint8 output (fixed-point arithmetic, rounded) by up
  to about one grey level.

  Args:
    image: uint8 (or any real dtype) array of shape (H, W, C) or (H, W).
    size: output side for a square result, or a (height, width) pair.

  Returns:
    float32 array of shape (height, width, C) (or (height, width) for a 2-D
    input) with values on the input's scale (0..255 for uint8 input).
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f"image must have shape (H, W, C) or (H, W), got shape {image.shape}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"image must be non-empty, got shape {image.shape}")
  if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
    raise ValueError(f"image must have a real dtype, got {image.dtype}")
  out_h, out_w = output_size(size)
  in_h, in_w = image.shape[:2]

  y0, y1, wy = source_taps(out_h, in_h)
  x0, x1, wx = source_taps(out_w, in_w)
  # Separable: rows first, then columns. Weights broadcast over the channel axis.
  extra = (1,) * (image.ndim - 2)
  wy = wy.astype(np.float32).reshape((out_h, 1) + extra)
  # Gather the rows before converting: only out_h rows of the image become float32.
  rows = image[y0].astype(np.float32) * (1.0 - wy) + image[y1].astype(np.float32) * wy
  wx = wx.astype(np.float32).reshape((1, out_w) + extra)
  out = rows[:, x0] * (1.0 - wx) + rows[:, x1] * wx
  return out.astype(np.float32, copy=False)


def normalize(x01: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Per-channel normalisation ``(x - mean) / std``.

  Args:
    x01: float array (..., C) with values in [0, 1].
    mean: C per-channel means on the [0, 1] scale.
    std: C per-channel standard deviations on the [0, 1] scale (all > 0).

  Returns:
    float32 array of the same shape as ``x01``.
  """
  x01 = np.asarray(x01, dtype=np.float32)
  mean = np.asarray(mean, dtype=np.float32).reshape(-1)
  std = np.asarray(std, dtype=np.float32).reshape(-1)
  channels = x01.shape[-1] if x01.ndim else 0
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(
      f"mean and std must have one value per channel ({channels}), got "
      f"mean of shape {mean.shape} and std of shape {std.shape}"
    )
  if not np.all(std > 0):
    raise ValueError(f"std must be positive, got {std.tolist()}")
  return ((x01 - mean) / std).astype(np.float32, copy=False)


def prepare_image(
  image: np.ndarray,
  size: Size,
  mean: Sequence[float],
  std: Sequence[float],
) -> np.ndarray:
  """Resize + scale to [0, 1] + normalise: the model input for one image.

  Args:
    image: uint8 array (H, W, 3), or (H, W) / (H, W, 1) grayscale, which is
      repeated to 3 channels.
    size: square output side (or a (height, width) pair).
    mean: 3 per-channel means on the [0, 1] scale (e.g. ``IMAGENET_MEAN``).
    std: 3 per-channel standard deviations on the [0, 1] scale.

  Returns:
    float32 array (size, size, 3).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image must have shape (H, W, 3), (H, W, 1) or (H, W), got {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  x = resize_bilinear(image, size) / np.float32(255.0)
  return normalize(x, mean, std)
