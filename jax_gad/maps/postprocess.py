"""From per-level Mahalanobis maps to one anomaly map per image.

:func:`combine` does, on the device, for a batch:

1. resize every level's ``(N, h_l, w_l)`` map to the network input size
   ``(S, S)`` (bilinear, half-pixel centres, no antialiasing: the rule of
   :func:`jax_gad.data.preprocess.resize_bilinear`);
2. combine the levels: ``'mean'`` (default) is the mean of the level maps,
   the same rule as the pooled score's "Sum" row (the mean of the level
   distances); ``'chi'`` divides each level's map by ``sqrt(C_l)`` first (the
   expected Mahalanobis distance of a C_l-dim Gaussian), so that wide levels
   do not dominate;
3. blur with a Gaussian of standard deviation ``sigma`` input pixels (default
   4, PaDiM's value; truncated at 4 sigma, mirror boundary: exactly
   ``scipy.ndimage.gaussian_filter(mode='reflect')``).

:func:`to_original` then resizes each map to its image's original size on the
host (bilinear, as step 1), and the image score is the map's maximum
(:func:`image_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_gad.data import preprocess

COMBINE_RULES = ('mean', 'chi')
DEFAULT_SIGMA = 4.0
TRUNCATE = 4.0


def gaussian_kernel(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
  """1-D Gaussian weights of scipy.ndimage.gaussian_filter1d (radius round(truncate sigma))."""
  if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma >= 0:
    raise ValueError(f'sigma must be a number >= 0, got {sigma!r}.')
  if sigma == 0:
    return np.ones(1, np.float64)
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / float(sigma)) ** 2)
  return w / w.sum()


def _mirror_index(n: int, r: int) -> np.ndarray:
  """Source index of each of the n + 2r padded samples, scipy.ndimage's 'reflect' rule.

  'reflect' mirrors about the edge with the edge sample repeated (d c b a | a b
  c d | d c b a), periodic with period 2n, so it also covers r > n.
  """
  idx = np.mod(np.arange(-r, n + r), 2 * n)
  return np.where(idx >= n, 2 * n - 1 - idx, idx)


def blur(maps, sigma: float = DEFAULT_SIGMA) -> jax.Array:
  """Gaussian blur of (N, H, W) maps over H and W (scipy's gaussian_filter, mode 'reflect').

  Args:
    maps: (N, H, W) float maps. A side shorter than the kernel radius is
      padded by repeated mirroring, as scipy does.
    sigma: standard deviation in pixels, >= 0 (0: no blur).

  Returns:
    (N, H, W) blurred maps.
  """
  maps = jnp.asarray(maps)
  if maps.ndim != 3:
    raise ValueError(f'maps must be (N, H, W), got shape {tuple(maps.shape)}.')
  return _blur_jit(maps, float(sigma))


@functools.partial(jax.jit, static_argnames='sigma')
def _blur_jit(maps, sigma):
  kernel = gaussian_kernel(sigma)
  r = (kernel.shape[0] - 1) // 2
  if r == 0:
    return maps
  for axis in (1, 2):
    n = maps.shape[axis]
    padded = jnp.take(maps, jnp.asarray(_mirror_index(n, r)), axis=axis)
    out = jnp.zeros_like(maps)
    for k, weight in enumerate(kernel):
      window = jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
      out = out + jnp.asarray(weight, maps.dtype) * window
    maps = out
  return maps


def resize(maps, size: int | Sequence[int]) -> jax.Array:
  """Bilinear resize of (N, h, w) maps (half-pixel centres, edge clamp, no antialiasing).

  The rule of :func:`jax_gad.data.preprocess.resize_bilinear` (OpenCV's
  INTER_LINEAR), as a pair of small interpolation matrices applied on the
  device.

  Args:
    maps: (N, h, w) float maps.
    size: output side, or (height, width).

  Returns:
    (N, height, width) maps.
  """
  maps = jnp.asarray(maps)
  if maps.ndim != 3:
    raise ValueError(f'maps must be (N, H, W), got shape {tuple(maps.shape)}.')
  out_h, out_w = preprocess.output_size(size)
  return _resize_jit(maps, (out_h, out_w))


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  i0, i1, w1 = preprocess.source_taps(n_out, n_in)
  m = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), 1.0 - w1)
  np.add.at(m, (rows, i1), w1)
  return m


@functools.partial(jax.jit, static_argnames='size')
def _resize_jit(maps, size):
  ry = jnp.asarray(_interp_matrix(size[0], maps.shape[1]), maps.dtype)
  rx = jnp.asarray(_interp_matrix(size[1], maps.shape[2]), maps.dtype)
  return jnp.einsum('ah,nhw,bw->nab', ry, maps, rx, precision=jax.lax.Precision.HIGHEST)


def _check_rule(rule: str) -> None:
  if rule not in COMBINE_RULES:
    raise ValueError(f'combine rule must be one of {list(COMBINE_RULES)}, got {rule!r}.')


def combine(
  level_maps: Sequence,
  image_size: int,
  *,
  rule: str = 'mean',
  widths: Sequence[int] | None = None,
  sigma: float = DEFAULT_SIGMA,
) -> jax.Array:
  """Per-level Mahalanobis maps of a batch -> one blurred (N, S, S) map per image.

  Args:
    level_maps: one (N, h_l, w_l) map per level.
    image_size: the network input side S.
    rule: ``'mean'`` or ``'chi'`` (see the module docstring).
    widths: channel count C_l of each level (needed by ``'chi'``).
    sigma: blur standard deviation in input pixels (0: none).

  Returns:
    (N, S, S) float32 anomaly maps at the network input resolution.
  """
  _check_rule(rule)
  if not level_maps:
    raise ValueError('level_maps must hold at least one level map.')
  if rule == 'chi':
    if widths is None or len(widths) != len(level_maps):
      raise ValueError("combine rule 'chi' needs one width per level map.")
    scales = [1.0 / math.sqrt(int(w)) for w in widths]
  else:
    scales = [1.0] * len(level_maps)
  total = None
  for m, s in zip(level_maps, scales):
    up = resize(jnp.asarray(m, jnp.float32), image_size) * s
    total = up if total is None else total + up
  return blur(total / len(level_maps), sigma)


def to_original(maps, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
  """Resizes each (S, S) map to its image's original (height, width), on the host.

  Args:
    maps: (N, S, S) maps.
    sizes: N (height, width) pairs.

  Returns:
    N float32 arrays of the given sizes.
  """
  maps = np.asarray(maps)
  if maps.ndim != 3 or len(sizes) != maps.shape[0]:
    raise ValueError(
      f'maps must be (N, S, S) with one size per map, got shape {maps.shape} '
      f'and {len(sizes)} sizes.'
    )
  out = []
  for m, (h, w) in zip(maps, sizes):
    if m.shape == (h, w):
      out.append(np.asarray(m, np.float32))
    else:
      out.append(preprocess.resize_bilinear(m, (int(h), int(w))).astype(np.float32))
  return out


def image_scores(maps: Sequence[np.ndarray]) -> np.ndarray:
  """Image anomaly score from its map: the maximum (PaDiM's rule). (N,) float64."""
  return np.asarray([float(np.max(m)) for m in maps], np.float64)
