"""Per-location Gaussians on unpooled level maps, streamed with constant memory.

A level map of one image is an ``(H, W, C)`` array; PaDiM-style localisation
fits one Gaussian per spatial position ``(h, w)`` over the training images and
scores every position of a test map by its Mahalanobis distance, giving an
``(H, W)`` anomaly map per level.

The statistics are :class:`jax_gad.gaussian.Moments` with two extra leading
axes ``(H, W)`` on every leaf: the mergeable moments of :mod:`jax_gad.gaussian`
vectorised over locations with ``jax.vmap`` (no new statistics are written
here). Their size is ``H W (C^2 + 2 C + 2)`` numbers whatever the number of
training images, so a training set of any size streams through
:func:`accumulate` batch by batch in constant memory (the buffer of the old
statistics is donated to the new ones). :func:`merge` combines statistics of
disjoint image sets (e.g. the parts of cross-validation folds), and
:func:`psum` all-reduces them over a mapped device axis inside ``shard_map``;
under plain ``jax.jit`` a batch sharded over devices is reduced by the
compiler, so :func:`accumulate` accepts batch-sharded maps as they come out of
the extractor.

:func:`finalize` turns the statistics into a :class:`MapState`: per location
the mean and a whitening matrix ``W`` with ``W W^T`` = the precision of the
Ledoit-Wolf shrunk covariance (as :func:`jax_gad.gaussian.fit_from_moments`;
pseudo-inverse where the covariance is singular), optionally plus a fixed
ridge ``r I`` (PaDiM adds 0.01 I). Storing ``W`` rather than the Cholesky
factor makes :func:`score` one batched matrix product per location, with no
triangular solve and no per-location branch.

Channel reduction (:func:`random_channels`): PaDiM keeps a random subset of
channels, drawn once with a fixed seed, which shrinks the statistics by
``(k / C)^2``. Select the channels with ``maps[..., channels]`` before
:func:`accumulate` and :func:`score`.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
import numpy as np

from jax_gad import gaussian

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


class MapState(NamedTuple):
  """Fitted per-location Gaussians of one level, ``(H, W)`` locations of width ``C``.

  Attributes:
    mean: (H, W, C) per-location mean of the training maps.
    whitening: (H, W, C, C) ``W`` with ``W W^T`` = the per-location precision
      (pseudo-inverse for a singular covariance); the squared Mahalanobis
      distance of ``x`` is ``|(x - mean) W|^2``.
    shrinkage: (H, W) Ledoit-Wolf (or fixed) shrinkage coefficient used.
    n: (H, W) number of training images (the same at every location).
  """

  mean: Array
  whitening: Array
  shrinkage: Array
  n: Array


# ---------------------------------------------------------------------------
# Checks (host side)
# ---------------------------------------------------------------------------


def _check_maps(maps, name: str = 'maps', shape: tuple | None = None) -> Array:
  if not hasattr(maps, 'ndim') or not hasattr(maps, 'dtype'):
    maps = np.asarray(maps)
  if maps.ndim != 4:
    raise ValueError(f'{name} must be 4-D (n_images, H, W, C), got shape {tuple(maps.shape)}.')
  if maps.shape[0] < 1 or min(maps.shape[1:]) < 1:
    raise ValueError(f'{name} must be non-empty, got shape {tuple(maps.shape)}.')
  kind = np.dtype(maps.dtype).kind
  if kind not in 'fiub' and np.dtype(maps.dtype) != jnp.bfloat16:
    raise ValueError(f'{name} must hold real numbers, got dtype {maps.dtype}.')
  if shape is not None and tuple(maps.shape[1:]) != tuple(shape):
    raise ValueError(
      f'{name} has per-image shape {tuple(maps.shape[1:])}; the statistics '
      f'were built for (H, W, C) = {tuple(shape)}.'
    )
  return maps


def _check_stats(stats, name: str = 'stats') -> tuple[int, int, int]:
  if not isinstance(stats, gaussian.Moments):
    raise TypeError(
      f'{name} must be a jax_gad.gaussian.Moments with leading (H, W) axes, '
      f'got {type(stats).__name__}.'
    )
  if stats.mean.ndim != 3:
    raise ValueError(f'{name}.mean must be (H, W, C), got shape {tuple(stats.mean.shape)}.')
  h, w, c = stats.mean.shape
  if (
    stats.scatter.shape != (h, w, c, c)
    or stats.third.shape != (h, w, c)
    or stats.n.shape != (h, w)
    or stats.fourth.shape != (h, w)
  ):
    raise ValueError(
      f'{name} is inconsistent: mean {tuple(stats.mean.shape)}, scatter '
      f'{tuple(stats.scatter.shape)}, n {tuple(stats.n.shape)}.'
    )
  return h, w, c


def _check_mask(mask, n: int):
  if mask is None:
    return None
  if not hasattr(mask, 'shape') or not hasattr(mask, 'dtype'):
    mask = np.asarray(mask)
  if tuple(mask.shape) != (n,) or np.dtype(mask.dtype) != np.bool_:
    raise ValueError(
      f'mask must be a boolean array of shape ({n},), got {mask.dtype} {tuple(mask.shape)}.'
    )
  return jnp.asarray(mask)


def check_ridge(ridge) -> float:
  """``ridge`` as a float; ValueError unless it is a finite number >= 0."""
  if (
    isinstance(ridge, bool)
    or not isinstance(ridge, numbers.Real)
    or not (0.0 <= float(ridge) < float('inf'))
  ):
    raise ValueError(f'ridge must be a finite number >= 0, got {ridge!r}.')
  return float(ridge)


# ---------------------------------------------------------------------------
# Statistics: vmapped mergeable moments
# ---------------------------------------------------------------------------


def _per_location(fn, batched: tuple[int, ...]):
  """vmaps ``fn`` twice (over H, then W); ``batched[i]`` is the H axis of argument i or None."""
  inner = jax.vmap(fn, in_axes=tuple(None if a is None else a for a in batched))
  return jax.vmap(inner, in_axes=tuple(None if a is None else a for a in batched))


# maps (N, H, W, C): the H axis is 1, and after vmapping it out, the W axis is 1 again.
_moments_loc = _per_location(gaussian.moments_kernel, (1, None))
_merge_loc = _per_location(gaussian.merge_kernel, (0, 0))


def _maps_dtype(maps, dtype=None):
  if dtype is not None:
    return dtype
  return gaussian.float_dtype(maps.dtype)


@jax.jit
def _batch_moments_jit(maps, mask):
  return _moments_loc(maps, mask)


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate_jit(stats, maps, mask):
  return _merge_loc(stats, _moments_loc(maps.astype(stats.mean.dtype), mask))


@jax.jit
def _merge_jit(a, b):
  return _merge_loc(a, b)


def empty(shape, dtype=jnp.float32) -> gaussian.Moments:
  """Statistics of zero images for maps of per-image shape ``(H, W, C)``.

  Args:
    shape: ``(H, W, C)``, positive ints.
    dtype: float dtype of the statistics (float64 needs ``jax_enable_x64``).

  Returns:
    :class:`jax_gad.gaussian.Moments` with leading (H, W) axes, n = 0.
  """
  try:
    h, w, c = (int(s) for s in shape)
  except (TypeError, ValueError):
    raise ValueError(f'shape must be (H, W, C), got {shape!r}.') from None
  if min(h, w, c) < 1:
    raise ValueError(f'shape must be (H, W, C) of positive ints, got {shape!r}.')
  one = gaussian.empty_moments(c, dtype)
  return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (h, w) + leaf.shape), one)


def batch_moments(maps, mask=None) -> gaussian.Moments:
  """Per-location moments of one batch of maps.

  Args:
    maps: (N, H, W, C) level maps; float64 stays float64 under x64, anything
      else is computed in float32.
    mask: optional (N,) bool; images where it is False are ignored (padding).

  Returns:
    :class:`jax_gad.gaussian.Moments` with leading (H, W) axes.
  """
  maps = _check_maps(maps)
  maps = jnp.asarray(maps, _maps_dtype(maps))
  return _batch_moments_jit(maps, _check_mask(mask, maps.shape[0]))


def accumulate(stats: gaussian.Moments, maps, mask=None) -> gaussian.Moments:
  """Adds a batch of maps to per-location statistics (constant memory).

  The buffers of ``stats`` are donated: do not use ``stats`` afterwards.

  Args:
    stats: from :func:`empty`, :func:`batch_moments` or an earlier call.
    maps: (N, H, W, C) maps, cast to the statistics' dtype; may be a
      batch-sharded ``jax.Array``.
    mask: optional (N,) bool, as in :func:`batch_moments`.

  Returns:
    The statistics of every image seen.
  """
  shape = _check_stats(stats)
  maps = _check_maps(maps, shape=shape)
  return _accumulate_jit(stats, jnp.asarray(maps), _check_mask(mask, maps.shape[0]))


def merge(a: gaussian.Moments, b: gaussian.Moments) -> gaussian.Moments:
  """Statistics of the union of two disjoint image sets (per location).

  Args:
    a, b: per-location statistics of the same (H, W, C).

  Returns:
    The merged statistics.
  """
  sa, sb = _check_stats(a, 'a'), _check_stats(b, 'b')
  if sa != sb:
    raise ValueError(f'cannot merge statistics of shapes {sa} and {sb}.')
  return _merge_jit(a, b)


def psum(stats: gaussian.Moments, axis_name) -> gaussian.Moments:
  """All-reduces per-location statistics over a mapped axis (``shard_map``, ``pmap``, ``vmap``).

  Args:
    stats: this device's statistics.
    axis_name: the mapped axis to reduce over.

  Returns:
    The statistics of the images of every member of ``axis_name``.
  """
  _check_stats(stats)
  reduce = _per_location(lambda m: gaussian.psum_moments(m, axis_name), (0,))
  return reduce(stats)


# ---------------------------------------------------------------------------
# Fit and score
# ---------------------------------------------------------------------------


def _fit_location(m: gaussian.Moments, mode: str, value, ridge) -> tuple[Array, Array]:
  """(whitening, shrinkage) of one location: gaussian.fit_from_moments' rule, plus a ridge."""
  cov, shrinkage, shrink_ridge = gaussian.shrunk_covariance(m, mode, value)
  dim = cov.shape[0]
  eye = jnp.eye(dim, dtype=cov.dtype)
  cov = cov + ridge * eye
  factor, is_whitening = gaussian.factorize(cov, shrink_ridge + ridge)
  # A Cholesky factor L gives |L^-1 z|^2 = |z L^-T|^2: W = L^-T.
  chol_inv_t = solve_triangular(jnp.where(is_whitening, eye, factor), eye, lower=True).T
  return jnp.where(is_whitening, factor, chol_inv_t), shrinkage


def _fit_cholesky(m: gaussian.Moments, mode: str, value, ridge):
  """The Cholesky route of :func:`_fit_location` alone: (whitening, shrinkage, ok).

  ``ok`` is ``gaussian.cholesky``'s acceptance test (``gaussian.factorize``'s);
  where it holds, the result equals :func:`_fit_location`'s. Needed because under ``vmap`` a
  per-location ``lax.cond`` runs both branches, and the eigendecomposition of
  the other branch costs ~100x the Cholesky factorisation on CPU.
  """
  cov, shrinkage, shrink_ridge = gaussian.shrunk_covariance(m, mode, value)
  dim = cov.shape[0]
  eye = jnp.eye(dim, dtype=cov.dtype)
  cov = cov + ridge * eye
  chol, ok = gaussian.cholesky(cov, shrink_ridge + ridge)
  safe = jnp.where(ok, chol, eye)
  return solve_triangular(safe, eye, lower=True).T, shrinkage, ok


@functools.partial(jax.jit, static_argnames='mode')
def _finalize_fast_jit(stats, mode, value, ridge):
  whitening, shrinkage, ok = _per_location(lambda m: _fit_cholesky(m, mode, value, ridge), (0,))(
    stats
  )
  return MapState(mean=stats.mean, whitening=whitening, shrinkage=shrinkage, n=stats.n), ok


@functools.partial(jax.jit, static_argnames='mode')
def _finalize_full_jit(stats, mode, value, ridge):
  whitening, shrinkage = _per_location(lambda m: _fit_location(m, mode, value, ridge), (0,))(stats)
  return MapState(mean=stats.mean, whitening=whitening, shrinkage=shrinkage, n=stats.n)


def finalize(stats: gaussian.Moments, shrinkage='ledoit_wolf', ridge: float = 0.0) -> MapState:
  """Per-location Gaussians from accumulated statistics.

  Per location this is :func:`jax_gad.gaussian.fit_from_moments` (same mean,
  shrinkage and precision up to rounding); with ``ridge > 0`` the covariance
  is ``LW(C) + ridge I``. Concrete statistics only (it decides on the host
  whether any location needs the pseudo-inverse route).

  Args:
    stats: per-location statistics with n >= 2.
    shrinkage: ``'ledoit_wolf'`` or a fixed coefficient in [0, 1].
    ridge: fixed ridge added to every covariance, >= 0 (PaDiM: 0.01).

  Returns:
    :class:`MapState`.
  """
  _check_stats(stats)
  mode, value = gaussian.check_shrinkage(shrinkage)
  ridge = check_ridge(ridge)
  if float(jnp.min(stats.n)) < 2:
    raise ValueError(
      f'stats hold {float(jnp.min(stats.n)):g} image(s); at least 2 are needed to fit.'
    )
  dtype = stats.mean.dtype
  value, ridge = jnp.asarray(value, dtype), jnp.asarray(ridge, dtype)
  state, ok = _finalize_fast_jit(stats, mode, value, ridge)
  # Decided on the host: the eigendecomposition route (pseudo-inverse for a
  # singular covariance, i.e. no shrinkage and n <= C or dead channels) runs
  # only when some location needs it. A lax.cond here was measured to cost as
  # much as running both routes on CPU.
  if not bool(jnp.all(ok)):
    state = _finalize_full_jit(stats, mode, value, ridge)
  return state


def _score_impl(state: MapState, maps: Array) -> Array:
  z = maps.astype(state.mean.dtype) - state.mean
  y = jnp.einsum('nhwc,hwcd->nhwd', z, state.whitening, precision=_HIGHEST)
  return jnp.sqrt(jnp.sum(y * y, axis=-1))


_score_jit = jax.jit(_score_impl)


def score(state: MapState, maps) -> Array:
  """Mahalanobis distance of every location of every map: an (N, H, W) anomaly map.

  Args:
    state: from :func:`finalize`.
    maps: (N, H, W, C) maps of the same (H, W, C) as the fit.

  Returns:
    (N, H, W) non-negative distances in the state's dtype.
  """
  if not isinstance(state, MapState):
    raise TypeError(f'state must be a MapState, got {type(state).__name__}.')
  maps = _check_maps(maps, shape=state.mean.shape)
  return _score_jit(state, jnp.asarray(maps))


def fit(
  maps, shrinkage='ledoit_wolf', ridge: float = 0.0, batch_size: int | None = None
) -> MapState:
  """One-call fit of per-location Gaussians on in-memory maps (streams in batches).

  Args:
    maps: (N, H, W, C) training maps, N >= 2.
    shrinkage: as in :func:`finalize`.
    ridge: as in :func:`finalize`.
    batch_size: images per accumulation step (default: all at once).

  Returns:
    :class:`MapState`.
  """
  maps = _check_maps(maps)
  n = maps.shape[0]
  step = n if batch_size is None else int(batch_size)
  if step < 1:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
  dtype = _maps_dtype(maps)
  stats = empty(maps.shape[1:], dtype)
  for start in range(0, n, step):
    stats = accumulate(stats, jnp.asarray(maps[start : start + step], dtype))
  return finalize(stats, shrinkage, ridge)


def random_channels(n_channels: int, k: int | None, seed: int = 0) -> np.ndarray:
  """A fixed random subset of ``k`` of ``n_channels`` channels (PaDiM's reduction).

  Args:
    n_channels: the level's channel count C.
    k: channels to keep; None or k >= C keeps all (returns arange(C)).
    seed: seed of ``numpy.random.default_rng``; the same seed, C and k always
      give the same subset.

  Returns:
    Sorted int32 indices, shape (min(k, C),).
  """
  if isinstance(n_channels, bool) or not isinstance(n_channels, numbers.Integral) or n_channels < 1:
    raise ValueError(f'n_channels must be a positive int, got {n_channels!r}.')
  if k is None or k >= n_channels:
    return np.arange(n_channels, dtype=np.int32)
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f'k (channels to keep) must be a positive int, got {k!r}.')
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n_channels, size=int(k), replace=False)).astype(np.int32)


def state_bytes(shape, dtype=jnp.float32) -> int:
  """Bytes of the per-location statistics for maps of shape (H, W, C)."""
  h, w, c = (int(s) for s in shape)
  return h * w * (c * c + 2 * c + 2) * np.dtype(dtype).itemsize
