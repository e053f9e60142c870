"""The Gaussian core: mergeable moments, Ledoit-Wolf, the fit, distances.

Everything here is a pure function over pytrees (``NamedTuple``):

* :class:`Moments` are mergeable sufficient statistics of a set of feature
  rows. :func:`moments`, :func:`accumulate`, :func:`merge` and
  :func:`psum_moments` build them from batches, across batches and across
  devices; :func:`fit_from_moments` turns them into a :class:`GaussianState`
  equal (up to rounding) to :func:`fit_gaussian` on the concatenated rows.
* :func:`ledoit_wolf` and :func:`fit_gaussian` follow scikit-learn's
  ``ledoit_wolf`` / ``LedoitWolf`` (data not assumed centred, covariance
  normalised by ``n``, pseudo-inverse precision). The state holds either the
  Cholesky factor of the covariance or, for singular covariances and for
  fits with D >= 4 n (done through the n x n Gram matrix), a whitening
  matrix; no precision matrix is ever formed by inversion.
* :func:`mahalanobis`, :func:`l2` and :func:`sed` score rows against a fitted
  state (docs/method.md, "Distances"); :data:`DISTANCES` maps their names to them.

PCA / NPCA live in :mod:`jax_gad.pca`, the chi-squared thresholds in
:mod:`jax_gad.metrics`, other density models in :mod:`jax_gad.densities`.

Public functions validate their inputs on the host (shapes always; NaN / inf
only for concrete arrays, since traced values cannot be inspected) and then
call jitted cores, so they can also be used inside a caller's ``jax.jit``.
Features are computed in float32, or in float64 when the input is float64 and
``jax_enable_x64`` is on; other dtypes are promoted to float32.

Numerics of the statistics. The moments of a batch are taken about the
batch's own mean, after first subtracting the batch's first row (a shift that
is exact for constant columns, so their variance comes out exactly zero).
Batches are combined with the parallel-moments update of Chan et al.: each
side's moments are re-expressed about the combined mean, so every correction
term is built from differences of means, never from a large raw sum minus a
large squared mean. This avoids the cancellation of the one-pass formula
``sum x x^T - n mu mu^T`` without a second pass over the data; float64
accumulation is still available (enable x64 and pass float64 arrays) when
batches are many and very large.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
import numpy as np

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Pytrees
# ---------------------------------------------------------------------------


class Moments(NamedTuple):
  """Mergeable sufficient statistics of ``n`` feature rows of width ``D``.

  All sums are about ``mean``; with ``y = x - mean`` over the rows:

  Attributes:
    n: () float, number of rows (0 for :func:`empty_moments`).
    mean: (D,) row mean.
    scatter: (D, D) ``sum y y^T``; covariance and the Ledoit-Wolf ``delta``.
    third: (D,) ``sum |y|^2 y``; needed only to re-centre ``fourth`` when
      moments with different means are merged.
    fourth: () ``sum |y|^4``; the Ledoit-Wolf ``beta`` term, since
      ``sum_ij ((y^2)^T y^2)_ij = sum_k |y_k|^4``.
  """

  n: Array
  mean: Array
  scatter: Array
  third: Array
  fourth: Array


def has_no_variance(x) -> bool:
  """True when every column of the rows ``x`` (n, D) is constant: the fit carries no information."""
  return not np.any(np.ptp(np.asarray(x), axis=0) > 0)


class GaussianState(NamedTuple):
  """A fitted Gaussian of width ``D``.

  Attributes:
    mean: (D,) mean of the training rows.
    factor: (D, D) when ``whitening`` is False, the lower Cholesky factor
      ``L`` of the (shrunk) covariance, ``cov = L L^T``; when True, a
      whitening matrix ``W`` with ``W W^T`` = the precision (its
      pseudo-inverse when the covariance is singular, dropping null-space
      directions). Either way ``mahalanobis^2 = |L^-1 (x - mu)|^2`` or
      ``|(x - mu) W|^2``.
    std: (D,) per-dimension sample standard deviation (ddof=1), for SED.
    shrinkage: () shrinkage coefficient used, in [0, 1].
    n: () number of training rows.
    whitening: () bool, see ``factor``.
  """

  mean: Array
  factor: Array
  std: Array
  shrinkage: Array
  n: Array
  whitening: Array


# ---------------------------------------------------------------------------
# Input validation (host side)
# ---------------------------------------------------------------------------


def is_traced(x) -> bool:
  """True for a value traced by a JAX transformation (its entries cannot be inspected)."""
  return isinstance(x, jax.core.Tracer)


def _float_dtype(dtype) -> np.dtype:
  """float64 stays float64 (when x64 is on); everything else computes in float32."""
  if np.dtype(dtype) == np.float64:
    return jax.dtypes.canonicalize_dtype(np.float64)
  return np.dtype(np.float32)


def _check_finite(x, name: str) -> None:
  """Raises ValueError naming the first NaN / inf entry of a concrete 2-D array."""
  if is_traced(x):
    return
  if isinstance(x, np.ndarray):
    ok = bool(np.isfinite(x).all())
  else:
    ok = bool(jnp.isfinite(x).all())
  if ok:
    return
  host = np.asarray(x)
  bad = np.argwhere(~np.isfinite(host))
  i, j = (int(v) for v in bad[0])
  value = host[i, j]
  kind = 'NaN' if np.isnan(value) else ('inf' if value > 0 else '-inf')
  raise ValueError(
    f'{name} contains {kind} at row {i}, column {j} '
    f'({len(bad)} non-finite value(s) in total); features must be finite.'
  )


def check_features(
  x,
  name: str = 'x',
  *,
  min_samples: int = 1,
  width: int | None = None,
  dtype=None,
  owner: str = 'state was fitted on',
) -> Array:
  """Validates a feature matrix and returns it as a float JAX array.

  Args:
    x: array-like (n_samples, n_features) of real numbers.
    name: argument name used in error messages.
    min_samples: smallest allowed n_samples.
    width: if given, the required n_features (e.g. the width a state was
      fitted on).
    dtype: if given, the float dtype to cast to; otherwise float64 stays
      float64 (under x64) and anything else becomes float32.
    owner: start of the width-mismatch message, e.g. 'state was fitted on'.

  Returns:
    x as a JAX array of shape (n_samples, n_features).

  Raises:
    ValueError: wrong rank, too few rows, wrong width, non-real dtype, NaN or
      inf (the last only for concrete, non-traced arrays).
  """
  if not hasattr(x, 'ndim') or not hasattr(x, 'dtype'):
    x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f'{name} must be 2-D (n_samples, n_features), got shape {tuple(x.shape)}.')
  n, d = x.shape
  kind = np.dtype(x.dtype).kind
  if kind not in 'fiub' and np.dtype(x.dtype) != jnp.bfloat16:
    raise ValueError(f'{name} must hold real numbers, got dtype {x.dtype}.')
  if d < 1:
    raise ValueError(f'{name} has 0 features; at least 1 is needed.')
  if width is not None and d != width:
    raise ValueError(
      f'{owner} D={width} features, got {name} with {d} features (shape {tuple(x.shape)}).'
    )
  if n < min_samples:
    raise ValueError(f'{name} has {n} sample(s); at least {min_samples} are needed.')
  _check_finite(x, name)
  return jnp.asarray(x, dtype=dtype if dtype is not None else _float_dtype(x.dtype))


def _check_shrinkage(shrinkage) -> tuple[str, float]:
  if isinstance(shrinkage, str):
    if shrinkage != 'ledoit_wolf':
      raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}.")
    return 'ledoit_wolf', 0.0
  if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real):
    raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}.")
  if not 0.0 <= float(shrinkage) <= 1.0:
    raise ValueError(f'shrinkage must lie in [0, 1], got {shrinkage!r}.')
  return 'fixed', float(shrinkage)


def _check_state(state) -> None:
  if not isinstance(state, GaussianState):
    raise ValueError(f'state must be a GaussianState, got {type(state).__name__}.')


def check_moments(m, name: str = 'moments') -> None:
  """Raises ValueError unless ``m`` is a :class:`Moments` with consistent shapes."""
  if not isinstance(m, Moments):
    raise ValueError(f'{name} must be a Moments, got {type(m).__name__}.')
  d = m.mean.shape[-1] if m.mean.ndim == 1 else None
  if d is None or m.scatter.shape != (d, d) or m.third.shape != (d,):
    raise ValueError(
      f'{name} is inconsistent: mean {tuple(m.mean.shape)}, scatter '
      f'{tuple(m.scatter.shape)}, third {tuple(m.third.shape)}.'
    )


# ---------------------------------------------------------------------------
# Moments: build, merge, reduce over devices
# ---------------------------------------------------------------------------


def centre_rows(x: Array) -> tuple[Array, Array]:
  """(mean, centred rows) of ``x``, computed as the statistics need them.

  The rows are first shifted by the first row (exact for constant columns, so
  their centred values and variance come out exactly zero), then by the mean
  of the shifted rows: every product formed afterwards is of small, centred
  numbers. A jittable kernel without input checks.

  Args:
    x: (n, D) float rows, n >= 1.

  Returns:
    ``(mean, y)``: (D,) row mean and (n, D) rows minus that mean.
  """
  ref = x[0]
  y = x - ref
  offset = jnp.mean(y, axis=0)
  return ref + offset, y - offset


def moments_kernel(x: Array, mask: Array | None = None) -> Moments:
  """:func:`moments` without input checks: a jittable kernel for other modules."""
  # Shift by a data row (exact for constant columns), then centre on the
  # batch mean: the products below are of small, centred numbers.
  if mask is None:
    n = jnp.asarray(x.shape[0], x.dtype)
    mean, y = centre_rows(x)
  else:
    keep = mask[:, None]
    n = jnp.sum(mask).astype(x.dtype)
    ref = x[jnp.argmax(mask)]
    y = jnp.where(keep, x - ref, 0.0)
    offset = jnp.sum(y, axis=0) / jnp.maximum(n, 1.0)
    y = jnp.where(keep, y - offset, 0.0)
    mean = ref + offset
  r = jnp.sum(y * y, axis=1)
  return Moments(
    n=n,
    mean=mean,
    scatter=jnp.matmul(y.T, y, precision=_HIGHEST),
    third=jnp.matmul(r, y, precision=_HIGHEST),
    fourth=jnp.sum(r * r),
  )


def _recentre(m: Moments, centre: Array) -> tuple[Array, Array, Array]:
  """scatter, third, fourth of ``m`` taken about ``centre`` instead of ``m.mean``.

  With y = x - m.mean (so sum y = 0), d = m.mean - centre and z = y + d:
    sum z z^T  = S + n d d^T
    sum|z|^2 z = t + 2 S d + tr(S) d + n |d|^2 d
    sum|z|^4   = q + 4 d.t + 4 d^T S d + 2 |d|^2 tr(S) + n |d|^4
  """
  d = m.mean - centre
  sd = jnp.matmul(m.scatter, d, precision=_HIGHEST)
  tr = jnp.trace(m.scatter)
  dd = jnp.dot(d, d)
  scatter = m.scatter + m.n * jnp.outer(d, d)
  third = m.third + 2.0 * sd + tr * d + (m.n * dd) * d
  fourth = (
    m.fourth + 4.0 * jnp.dot(d, m.third) + 4.0 * jnp.dot(d, sd) + 2.0 * dd * tr + m.n * dd * dd
  )
  return scatter, third, fourth


def _merge_impl(a: Moments, b: Moments) -> Moments:
  n = a.n + b.n
  # Exact when one side is empty, or when both means agree (constant columns).
  w = b.n / jnp.maximum(n, 1.0)
  mean = a.mean + w * (b.mean - a.mean)
  sa, ta, qa = _recentre(a, mean)
  sb, tb, qb = _recentre(b, mean)
  return Moments(n=n, mean=mean, scatter=sa + sb, third=ta + tb, fourth=qa + qb)


_moments_jit = jax.jit(moments_kernel)
_merge_jit = jax.jit(_merge_impl)
_accumulate_jit = jax.jit(lambda m, x, mask: _merge_impl(m, moments_kernel(x, mask)))


def empty_moments(dim: int, dtype=jnp.float32) -> Moments:
  """Moments of zero rows of width ``dim``: the identity of :func:`merge`.

  Args:
    dim: feature width D >= 1.
    dtype: float dtype of the statistics.

  Returns:
    :class:`Moments` with n = 0 and all sums zero.
  """
  if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
    raise ValueError(f'dim must be a positive integer, got {dim!r}.')
  dtype = _float_dtype(dtype)
  z = lambda *s: jnp.zeros(s, dtype)
  return Moments(n=z(), mean=z(dim), scatter=z(dim, dim), third=z(dim), fourth=z())


def _check_mask(mask, n: int):
  if mask is None:
    return None
  if not hasattr(mask, 'shape') or not hasattr(mask, 'dtype'):
    mask = np.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f'mask must have shape ({n},) to match x, got {tuple(mask.shape)}.')
  if np.dtype(mask.dtype) != np.bool_:
    raise ValueError(f'mask must be boolean, got dtype {mask.dtype}.')
  return jnp.asarray(mask)


def moments(x, mask=None) -> Moments:
  """Sufficient statistics of the rows of ``x``.

  Args:
    x: (n, D) features, n >= 1, finite (masked-out rows included).
    mask: optional (n,) bool; rows where it is False are ignored, so a batch
      padded to a fixed shape (for one compiled program, or an even split over
      devices) gives the moments of its real rows only.

  Returns:
    :class:`Moments` of width D (n = number of rows kept).
  """
  x = check_features(x, 'x', min_samples=1)
  return _moments_jit(x, _check_mask(mask, x.shape[0]))


def accumulate(m: Moments, x, mask=None) -> Moments:
  """Adds the rows of ``x`` to ``m``; equals ``merge(m, moments(x, mask))``.

  Args:
    m: :class:`Moments` of width D.
    x: (n, D) features, n >= 1, finite; cast to ``m``'s dtype.
    mask: optional (n,) bool, as in :func:`moments`.

  Returns:
    :class:`Moments` of all rows seen.
  """
  check_moments(m, 'm')
  x = check_features(
    x, 'x', min_samples=1, width=m.mean.shape[0], dtype=m.mean.dtype, owner='m (moments) holds'
  )
  return _accumulate_jit(m, x, _check_mask(mask, x.shape[0]))


def merge(a: Moments, b: Moments) -> Moments:
  """Moments of the union of the rows behind ``a`` and ``b`` (order-free).

  Args:
    a, b: :class:`Moments` of the same width D.

  Returns:
    :class:`Moments` with n = a.n + b.n.
  """
  check_moments(a, 'a')
  check_moments(b, 'b')
  if a.mean.shape != b.mean.shape:
    raise ValueError(f'cannot merge moments of width {a.mean.shape[0]} and {b.mean.shape[0]}.')
  return _merge_jit(a, b)


def psum_moments(m: Moments, axis_name) -> Moments:
  """All-reduces moments over a mapped axis (inside ``shard_map`` / ``pmap``).

  Every device ends with the moments of all rows on all devices along
  ``axis_name``. The global mean is found first (relative to device 0's mean,
  which keeps constant columns exact), each device re-centres its moments on
  it, and the re-centred sums are ``psum``-ed: the same update as
  :func:`merge`, done for all devices at once.

  Args:
    m: this device's :class:`Moments`.
    axis_name: the mapped axis name to reduce over.

  Returns:
    :class:`Moments` of the rows of every device along ``axis_name``.

  Example (rows sharded over a 1-D mesh axis ``'d'``, padded rows masked)::

    def local(x, mask):
      return psum_moments(moments(x, mask), 'd')
    m = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P('d'), P('d')),
                              out_specs=P()))(x, mask)
    state = fit_from_moments(m)
  """
  n = lax.psum(m.n, axis_name)
  is_first = lax.axis_index(axis_name) == 0
  ref = lax.psum(jnp.where(is_first, m.mean, jnp.zeros_like(m.mean)), axis_name)
  mean = ref + lax.psum(m.n * (m.mean - ref), axis_name) / jnp.maximum(n, 1.0)
  scatter, third, fourth = _recentre(m, mean)
  scatter, third, fourth = lax.psum((scatter, third, fourth), axis_name)
  return Moments(n=n, mean=mean, scatter=scatter, third=third, fourth=fourth)


# ---------------------------------------------------------------------------
# Ledoit-Wolf and the Gaussian fit
# ---------------------------------------------------------------------------


def ledoit_wolf_shrinkage(beta: Array, delta: Array) -> Array:
  """Ledoit-Wolf's shrinkage min(beta, delta) / delta, 0 when delta is 0 (scikit-learn's rule)."""
  beta = jnp.clip(beta, 0.0, delta)
  return jnp.where(delta > 0, beta / jnp.where(delta > 0, delta, 1.0), 0.0)


def _shrunk_covariance(m: Moments, mode: str, value) -> tuple[Array, Array, Array]:
  """(covariance, shrinkage, ridge) from moments; scikit-learn's ledoit_wolf formula.

  With C = scatter / n, mu = tr(C) / D:
    beta  = (sum|y|^4 / n - |C|_F^2) / (D n)
    delta = |C - mu I|_F^2 / D
    shrinkage = min(beta, delta) / delta   (0 when delta == 0, e.g. D == 1)
    covariance = (1 - shrinkage) C + ridge I,  ridge = shrinkage mu
  ``beta`` is a variance (of the rank-one matrices y y^T, ``E|y|^4 - |E y y^T|_F^2``),
  non-negative up to rounding; it is clipped at 0. Its two terms are of the
  same size only for degenerate data (all |y| equal and y y^T nearly
  constant), so the subtraction loses little even in float32; the same
  formula is what scikit-learn evaluates.
  """
  dim = m.mean.shape[0]
  emp = m.scatter / m.n
  mu = jnp.trace(emp) / dim
  eye = jnp.eye(dim, dtype=emp.dtype)
  if mode == 'ledoit_wolf':
    frob2 = jnp.sum(emp * emp)
    beta = (m.fourth / m.n - frob2) / (dim * m.n)
    delta = jnp.sum(jnp.square(emp - mu * eye)) / dim
    shrinkage = ledoit_wolf_shrinkage(beta, delta)
  else:
    shrinkage = jnp.asarray(value, emp.dtype)
  shrinkage = shrinkage.astype(emp.dtype)
  ridge = shrinkage * mu
  return (1.0 - shrinkage) * emp + ridge * eye, shrinkage, ridge


def _factorize(cov: Array, ridge: Array) -> tuple[Array, Array]:
  """(factor, whitening): Cholesky factor, or pseudo-inverse whitening if singular.

  ``ridge`` is the shrinkage target's weight ``shrinkage * mu``. Let
  cutoff = D * eps * max(diag(cov)), the relative cut-off of scipy's
  ``pinvh`` (with the largest diagonal entry standing in for the largest
  eigenvalue). When ridge > cutoff the covariance is numerically positive
  definite by construction (smallest eigenvalue >= ridge), and the Cholesky
  factor is used whenever it completes: it is backward stable, so it is as
  good as the covariance itself. Otherwise (no shrinkage, or a rounding-level
  one) rank deficiency is expected (n <= D, dead channels), and the factor is
  accepted only if its smallest pivot^2 exceeds the cut-off. If not, we use
  the eigendecomposition, keep eigenvalues above the cut-off, and the
  Mahalanobis distance ignores the null space, as scikit-learn's
  pseudo-inverse precision does.
  """
  dim = cov.shape[0]
  rtol = dim * jnp.finfo(cov.dtype).eps
  # LAPACK potrf reads the lower triangle only; on failure JAX returns NaNs,
  # the diagonal included.
  chol = jnp.linalg.cholesky(cov, symmetrize_input=False)
  pivots = jnp.diagonal(chol)
  cutoff = rtol * jnp.max(jnp.diagonal(cov))
  floor = jnp.where(ridge > cutoff, 0.0, cutoff)
  ok = jnp.all(jnp.isfinite(pivots)) & (jnp.min(pivots) ** 2 > floor)

  def whitening():
    w, v = jnp.linalg.eigh(cov)
    keep = w > rtol * jnp.maximum(jnp.max(w), 0.0)
    return v * jnp.where(keep, lax.rsqrt(jnp.where(keep, w, 1.0)), 0.0)

  factor = lax.cond(ok, lambda: chol, whitening)
  return factor, jnp.logical_not(ok)


def _fit_impl(m: Moments, mode: str, value) -> GaussianState:
  cov, shrinkage, ridge = _shrunk_covariance(m, mode, value)
  factor, whitening = _factorize(cov, ridge)
  var = jnp.maximum(jnp.diagonal(m.scatter), 0.0) / (m.n - 1.0)
  return GaussianState(
    mean=m.mean, factor=factor, std=jnp.sqrt(var), shrinkage=shrinkage, n=m.n, whitening=whitening
  )


def _fit_gram_impl(x: Array, mode: str, value) -> GaussianState:
  """Fit through the n x n Gram matrix (for n << D); never forms a D x D covariance.

  With y the centred rows and G = y y^T = U diag(lam) U^T, the covariance is
  Sigma = (1 - s) y^T y / n + ridge I, whose eigenvalues are
  ev = ridge + (1 - s) lam / n on span(y^T U) and ridge elsewhere. The
  Ledoit-Wolf terms come from G alone: tr C = tr G / n, |C|_F = |G|_F / n,
  sum |y|^4 = sum diag(G)^2. The symmetric whitening W = Sigma^(-1/2) is
  ``ridge^(-1/2) I + B diag(k) B^T`` with B = y^T U and
  k = (rsqrt(ev) - rsqrt(ridge)) / lam, evaluated in a form without
  cancellation or division by lam (tiny or rounding-level lam contribute
  almost nothing, as they should). Without a ridge the covariance is
  singular and W is its pseudo-inverse square root, keeping ev above
  D * eps * max(ev) as scipy's ``pinvh`` does. Cost O(n^2 D + n^3 + n D^2)
  instead of O(n D^2 + D^3) for the Cholesky route.
  """
  n, dim = x.shape
  mean, y = centre_rows(x)
  gram = jnp.matmul(y, y.T, precision=_HIGHEST)
  r = jnp.diagonal(gram)
  mu = jnp.sum(r) / (n * dim)
  if mode == 'ledoit_wolf':
    frob2 = jnp.sum(gram * gram) / (n * n)
    beta = (jnp.sum(r * r) / n - frob2) / (dim * n)
    # |C - mu I|_F^2 = |C|_F^2 - D mu^2: no cancellation here, since with
    # rank(C) < n < D, |C|_F^2 >= (tr C)^2 / n = D^2 mu^2 / n > D mu^2.
    delta = jnp.maximum(frob2 - dim * mu * mu, 0.0) / dim
    shrinkage = ledoit_wolf_shrinkage(beta, delta)
  else:
    shrinkage = jnp.asarray(value, x.dtype)
  shrinkage = shrinkage.astype(x.dtype)
  ridge = shrinkage * mu
  scale = (1.0 - shrinkage) / n
  lam, u = jnp.linalg.eigh(gram)
  lam = jnp.maximum(lam, 0.0)
  ev = ridge + scale * lam
  b = jnp.matmul(y.T, u, precision=_HIGHEST)  # (D, n), column norms^2 = lam
  # Eigenvalues at or below pinvh's cut-off count as zero (see _factorize).
  cutoff = dim * jnp.finfo(x.dtype).eps * jnp.maximum(jnp.max(ev), ridge)
  use_ridge = ridge > cutoff
  # With a ridge: (rsqrt(ev) - rsqrt(ridge)) / lam = -scale / (sr se (sr + se)).
  se = jnp.sqrt(ev)
  sr = jnp.sqrt(jnp.where(use_ridge, ridge, 1.0))
  k_ridge = -scale / (sr * se * (sr + se))
  # Without: pseudo-inverse square root, rsqrt(ev) / lam on kept directions.
  keep = ev > cutoff
  k_pinv = jnp.where(keep, lax.rsqrt(jnp.where(keep, ev, 1.0)) / jnp.where(keep, lam, 1.0), 0.0)
  k = jnp.where(use_ridge, k_ridge, k_pinv)
  diag = jnp.where(use_ridge, 1.0 / sr, 0.0)
  factor = jnp.matmul(b * k, b.T, precision=_HIGHEST) + diag * jnp.eye(dim, dtype=x.dtype)
  std = jnp.sqrt(jnp.sum(y * y, axis=0) / (n - 1.0))
  return GaussianState(
    mean=mean,
    factor=factor,
    std=std,
    shrinkage=shrinkage,
    n=jnp.asarray(n, x.dtype),
    whitening=jnp.asarray(True),
  )


_fit_moments_jit = jax.jit(_fit_impl, static_argnames='mode')
_fit_x_jit = jax.jit(
  lambda x, mode, value: _fit_impl(moments_kernel(x), mode, value), static_argnames='mode'
)
_fit_gram_jit = jax.jit(_fit_gram_impl, static_argnames='mode')
_ledoit_wolf_jit = jax.jit(lambda x: _shrunk_covariance(moments_kernel(x), 'ledoit_wolf', 0.0)[:2])


def ledoit_wolf(x) -> tuple[Array, Array]:
  """Ledoit-Wolf shrunk covariance, as scikit-learn's ``ledoit_wolf(x)``.

  Args:
    x: (n, D) features, n >= 2, finite. Not assumed centred.

  Returns:
    covariance: (D, D) ``(1 - s) C + s tr(C)/D I`` with C the covariance
      normalised by n.
    shrinkage: () the coefficient s in [0, 1].
  """
  return _ledoit_wolf_jit(check_features(x, 'x', min_samples=2))


def fit_gaussian(x, shrinkage='ledoit_wolf') -> GaussianState:
  """Fits a Gaussian to the rows of ``x``.

  Usually the covariance is formed from :class:`Moments` and
  Cholesky-factored (O(n D^2 + D^3)). With far fewer rows than features,
  D >= 4 n (MVTec's train sets against the 1792-wide head level), the fit
  goes through the n x n Gram matrix instead and returns a whitening factor
  (O(n^2 D + n D^2)): the same Gaussian up to rounding, 2-5x faster there.

  Args:
    x: (n, D) training features, n >= 2, finite.
    shrinkage: ``'ledoit_wolf'`` (default, scikit-learn's ``LedoitWolf``) or a
      fixed coefficient in [0, 1]; 0 gives the plain (n-normalised) covariance.

  Returns:
    :class:`GaussianState`.
  """
  mode, value = _check_shrinkage(shrinkage)
  x = check_features(x, 'x', min_samples=2)
  if 4 * x.shape[0] <= x.shape[1]:  # measured crossover on CPU: D ~ 3.5 n
    return _fit_gram_jit(x, mode, value)
  return _fit_x_jit(x, mode, value)


def fit_from_moments(m: Moments, shrinkage='ledoit_wolf') -> GaussianState:
  """Fits a Gaussian from accumulated :class:`Moments`.

  Equals :func:`fit_gaussian` on the concatenation of the rows behind ``m``
  up to rounding (the same mean, std, shrinkage, precision and distances;
  the ``factor`` may be a Cholesky factor here and a whitening matrix there).

  Args:
    m: :class:`Moments` with n >= 2.
    shrinkage: as in :func:`fit_gaussian`.

  Returns:
    :class:`GaussianState`.
  """
  check_moments(m, 'm')
  mode, value = _check_shrinkage(shrinkage)
  if not is_traced(m.n) and float(m.n) < 2:
    raise ValueError(f'moments hold {float(m.n):g} sample(s); at least 2 are needed to fit.')
  return _fit_moments_jit(m, mode, value)


def precision(state: GaussianState) -> Array:
  """(D, D) precision matrix of a fitted state (pseudo-inverse if singular)."""
  _check_state(state)
  return _precision_jit(state)


@jax.jit
def _precision_jit(state):
  eye = jnp.eye(state.mean.shape[0], dtype=state.mean.dtype)

  def from_cholesky():
    inv = solve_triangular(state.factor, eye, lower=True)
    return jnp.matmul(inv.T, inv, precision=_HIGHEST)

  return lax.cond(
    state.whitening,
    lambda: jnp.matmul(state.factor, state.factor.T, precision=_HIGHEST),
    from_cholesky,
  )


# ---------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------


def _mahalanobis_impl(state: GaussianState, x: Array) -> Array:
  z = x - state.mean

  def cholesky_solve():
    y = solve_triangular(state.factor, z.T, lower=True)
    return jnp.sum(y * y, axis=0)

  def whiten():
    y = jnp.matmul(z, state.factor, precision=_HIGHEST)
    return jnp.sum(y * y, axis=1)

  # A sum of squares: never negative, so the square root cannot produce NaN.
  return jnp.sqrt(lax.cond(state.whitening, whiten, cholesky_solve))


def _l2_impl(state: GaussianState, x: Array) -> Array:
  z = x - state.mean
  return jnp.sqrt(jnp.mean(z * z, axis=1))


def _sed_impl(state: GaussianState, x: Array) -> Array:
  # Zero-variance dimensions are left out of the mean (see `sed`).
  valid = state.std > 0
  z = jnp.where(valid, (x - state.mean) / jnp.where(valid, state.std, 1.0), 0.0)
  count = jnp.maximum(jnp.sum(valid), 1).astype(z.dtype)
  return jnp.sqrt(jnp.sum(z * z, axis=1) / count)


_mahalanobis_jit = jax.jit(_mahalanobis_impl)
_l2_jit = jax.jit(_l2_impl)
_sed_jit = jax.jit(_sed_impl)


def _score_input(state, x) -> Array:
  _check_state(state)
  return check_features(x, 'x', min_samples=0, width=state.mean.shape[0], dtype=state.mean.dtype)


def mahalanobis(state: GaussianState, x) -> Array:
  """Mahalanobis distance ``sqrt((x - mu)^T P (x - mu))`` (not squared).

  Args:
    state: fitted :class:`GaussianState` of width D.
    x: (n, D) features.

  Returns:
    (n,) distances in the state's dtype.
  """
  return _mahalanobis_jit(state, _score_input(state, x))


def l2(state: GaussianState, x) -> Array:
  """Root-mean-square deviation from the mean, ``sqrt(mean((x - mu)^2))``.

  Args:
    state: fitted :class:`GaussianState` of width D.
    x: (n, D) features.

  Returns:
    (n,) distances.
  """
  return _l2_jit(state, _score_input(state, x))


def sed(state: GaussianState, x) -> Array:
  """Standardised Euclidean distance ``sqrt(mean(((x - mu) / s)^2))``.

  ``s`` is the training standard deviation (ddof=1). Dimensions whose
  training variance is exactly zero (e.g. dead ReLU6 channels) are left out,
  and the mean runs over the remaining D' dimensions (0 if D' = 0). Such a
  dimension carries no scale to standardise by; dividing by an epsilon would
  let any rounding-level deviation there swamp all informative dimensions,
  and replacing s by 1 would mix raw units into a unitless score. Leaving it
  out is what the pseudo-inverse does for Mahalanobis on a singular
  covariance, and dividing by D' keeps SED about 1 for in-distribution rows
  whatever the number of dead channels, so levels stay comparable when their
  scores are averaged. Constant columns give exactly zero variance because
  the moments are shifted by a data row first.

  Args:
    state: fitted :class:`GaussianState` of width D.
    x: (n, D) features.

  Returns:
    (n,) finite distances.
  """
  return _sed_jit(state, _score_input(state, x))


DISTANCES: dict[str, Callable[[GaussianState, Any], Array]] = {
  'l2': l2,
  'sed': sed,
  'mahalanobis': mahalanobis,
}


def score(state: GaussianState, x, distance: str = 'mahalanobis') -> Array:
  """Scores rows with the distance named ``distance`` (a key of :data:`DISTANCES`)."""
  if distance not in DISTANCES:
    raise ValueError(f'distance must be one of {sorted(DISTANCES)}, got {distance!r}.')
  return DISTANCES[distance](state, x)
