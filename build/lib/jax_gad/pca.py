"""PCA and negated PCA (NPCA) of pooled features, before the Gaussian fit.

:func:`fit_pca` (or :func:`pca_from_moments` for streamed rows) finds the
principal axes as scikit-learn's ``PCA()`` does; :func:`select_components`
applies the paper's selection rule (docs/method.md, "PCA and NPCA");
:func:`reduce` turns the kept axes into a :class:`Projection` and
:func:`project` applies it. All pure functions over ``NamedTuple`` pytrees.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jax_gad import gaussian

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST
_PCA_MODES = ('pca', 'npca')


class PCAState(NamedTuple):
  """Principal components of training rows, as scikit-learn's ``PCA()``.

  Attributes:
    mean: (D,) mean of the training rows.
    components: (k, D) unit principal axes by decreasing variance, k =
      min(n, D); the sign makes each row's largest-magnitude entry positive.
    explained_variance: (k,) variance along each axis (ddof=1).
    explained_variance_ratio: (k,) ``explained_variance`` over its sum.
  """

  mean: Array
  components: Array
  explained_variance: Array
  explained_variance_ratio: Array


class Projection(NamedTuple):
  """Kept principal axes: :func:`project` maps x to ``(x - mean) @ components.T``.

  Attributes:
    mean: (D,) centring vector.
    components: (m, D) kept axes.
  """

  mean: Array
  components: Array


def _sign_fix(comps: Array) -> Array:
  """Makes the largest-magnitude entry of each row positive (scikit-learn's rule)."""
  pivot = jnp.argmax(jnp.abs(comps), axis=1)
  return comps * jnp.sign(jnp.take_along_axis(comps, pivot[:, None], axis=1))


def _pca_state(mean, comps, var) -> PCAState:
  total = jnp.sum(var)
  ratio = jnp.where(total > 0, var / jnp.where(total > 0, total, 1.0), 0.0)
  return PCAState(
    mean=mean, components=_sign_fix(comps), explained_variance=var, explained_variance_ratio=ratio
  )


def _pca_eigh_impl(m: gaussian.Moments, k: int) -> PCAState:
  w, v = jnp.linalg.eigh(m.scatter / (m.n - 1.0))
  return _pca_state(m.mean, v[:, ::-1][:, :k].T, jnp.maximum(w[::-1][:k], 0.0))


def _pca_svd_impl(x: Array) -> PCAState:
  mean, y = gaussian.centre_rows(x)
  _, s, vt = jnp.linalg.svd(y, full_matrices=False)
  return _pca_state(mean, vt, s * s / (x.shape[0] - 1.0))


_pca_jit = jax.jit(_pca_eigh_impl, static_argnames='k')
_pca_eigh_x_jit = jax.jit(
  lambda x, k: _pca_eigh_impl(gaussian.moments_kernel(x), k), static_argnames='k'
)
_pca_svd_jit = jax.jit(_pca_svd_impl)


def fit_pca(x) -> PCAState:
  """PCA of the rows of ``x``, as scikit-learn's ``PCA()`` (all min(n, D) components).

  Like scikit-learn's default solver choice, tall data (n >= 10 D) goes
  through the eigendecomposition of the D x D covariance (cost n D^2 + D^3);
  otherwise the thin SVD of the centred rows is used (cost n D min(n, D)),
  which is faster when n < D and resolves small variances to about
  eps * sqrt(top variance) instead of eps * top variance. With the
  covariance route, components whose variance is below roughly eps * top
  are individually undetermined (only the subspace they span is), which
  does not affect a Mahalanobis fit on the NPCA projections. When n <= D the
  centred rows span at most n - 1 directions, so the last component has
  zero variance and an arbitrary direction in the null space.

  Args:
    x: (n, D) features, n >= 2, finite.

  Returns:
    :class:`PCAState` with k = min(n, D) components.
  """
  x = gaussian.check_features(x, 'x', min_samples=2)
  n, d = x.shape
  if n >= 10 * d:
    return _pca_eigh_x_jit(x, k=d)
  return _pca_svd_jit(x)


def pca_from_moments(m: gaussian.Moments, n_components: int | None = None) -> PCAState:
  """PCA from accumulated :class:`jax_gad.gaussian.Moments` (for training sets streamed in batches).

  Args:
    m: :class:`jax_gad.gaussian.Moments` with n >= 2 (concrete when ``n_components`` is None).
    n_components: number of leading components to keep; default min(n, D).

  Returns:
    :class:`PCAState`.
  """
  gaussian.check_moments(m, 'm')
  dim = m.mean.shape[0]
  if n_components is None:
    if gaussian.is_traced(m.n):
      raise ValueError('n_components is required when m.n is traced.')
    n_components = min(int(m.n), dim)
  if not gaussian.is_traced(m.n) and float(m.n) < 2:
    raise ValueError(f'moments hold {float(m.n):g} sample(s); at least 2 are needed for PCA.')
  if (
    isinstance(n_components, bool)
    or not isinstance(n_components, numbers.Integral)
    or not 1 <= n_components <= dim
  ):
    raise ValueError(f'n_components must be an integer in [1, {dim}], got {n_components!r}.')
  return _pca_jit(m, k=int(n_components))


def _check_mode_threshold(mode, threshold) -> None:
  if mode not in _PCA_MODES:
    raise ValueError(f"mode must be 'pca' or 'npca', got {mode!r}.")
  if (
    isinstance(threshold, bool)
    or not isinstance(threshold, numbers.Real)
    or not 0.0 < float(threshold) < 1.0
  ):
    raise ValueError(f'threshold must be a number with 0 < threshold < 1, got {threshold!r}.')


def select_components(explained_variance_ratio, mode: str, threshold: float) -> tuple[int, int]:
  """Index range of the components that PCA / NPCA keep (docs/method.md, "PCA and NPCA").

  With c the cumulative sum of the ratios (in float64) and ``last`` the first
  index with c > threshold: PCA keeps [0, last]; NPCA keeps [last - 1, k - 1],
  one component of overlap by design, where k = len(ratios) = min(n, D) (so
  with fewer samples than features, NPCA ends at the last component PCA can
  estimate). ``last - 1`` is clipped at 0. If rounding keeps every c at or
  below the threshold, ``last`` is k - 1.

  Args:
    explained_variance_ratio: (k,) ratios, non-increasing, summing to 1.
    mode: ``'pca'`` or ``'npca'``.
    threshold: t with 0 < t < 1.

  Returns:
    (start, stop), Python ints: keep components[start:stop].
  """
  _check_mode_threshold(mode, threshold)
  ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
  if ratio.ndim != 1 or ratio.size == 0:
    raise ValueError(
      f'explained_variance_ratio must be a non-empty 1-D array, got shape {ratio.shape}.'
    )
  if not np.isfinite(ratio).all():
    raise ValueError('explained_variance_ratio contains NaN or inf.')
  above = np.flatnonzero(np.cumsum(ratio) > float(threshold))
  last = int(above[0]) if above.size else ratio.size - 1
  if mode == 'pca':
    return 0, last + 1
  return max(last - 1, 0), int(ratio.size)


def reduce(pca_state: PCAState, mode: str, threshold: float) -> Projection:
  """The :class:`Projection` onto the components PCA / NPCA keep.

  Args:
    pca_state: from :func:`fit_pca`.
    mode: ``'pca'`` or ``'npca'``.
    threshold: t with 0 < t < 1 (poster "PCA 99 %" and "NPCA 1 %" are 0.99).

  Returns:
    :class:`Projection` with the kept (m, D) components.
  """
  if not isinstance(pca_state, PCAState):
    raise ValueError(f'pca_state must be a PCAState, got {type(pca_state).__name__}.')
  start, stop = select_components(pca_state.explained_variance_ratio, mode, threshold)
  return Projection(mean=pca_state.mean, components=pca_state.components[start:stop])


@jax.jit
def _project_jit(projection, x):
  return jnp.matmul(x - projection.mean, projection.components.T, precision=_HIGHEST)


def project(projection: Projection, x) -> Array:
  """Projects rows onto kept components: ``(x - mean) @ components.T``.

  Args:
    projection: from :func:`reduce`.
    x: (n, D) features.

  Returns:
    (n, m) projections.
  """
  if not isinstance(projection, Projection):
    raise ValueError(f'projection must be a Projection, got {type(projection).__name__}.')
  x = gaussian.check_features(
    x,
    'x',
    min_samples=0,
    width=projection.mean.shape[0],
    dtype=projection.mean.dtype,
    owner='projection was fitted on',
  )
  return _project_jit(projection, x)
