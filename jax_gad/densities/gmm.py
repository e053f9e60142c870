"""Gaussian mixture with full covariances, fitted by EM in JAX.

The EM iterations are scikit-learn's ``GaussianMixture(covariance_type='full')``
step for step (with ``regularization='reg_covar'`` and the same initial
parameters the iterates agree to rounding; ``tests/test_densities.py`` checks
this): the E-step forms log responsibilities with log-sum-exp, the M-step sets
``N_k = sum_i r_ik + 10 eps``, ``w_k = N_k / sum N_k``, ``mu_k = sum_i r_ik x_i / N_k``
and ``C_k = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T / N_k``; the loop stops when
the mean log-likelihood changes by less than ``tol`` or after ``max_iter``
iterations.

Covariance regularisation (``GMMConfig.regularization``):

* ``'ledoit_wolf'`` (default): each component's weighted covariance is shrunk
  towards ``tr(C_k)/D I`` with the Ledoit-Wolf coefficient, computed from the
  responsibility-weighted moments (the weighted analogue of
  :func:`jax_gad.gaussian.ledoit_wolf`, with Kish's effective sample size
  ``(sum r)^2 / sum r^2`` in place of n), then ``reg_covar`` is added to the
  diagonal. It is the default because the pooled EfficientNet features have
  far fewer training rows than dimensions (MVTec: 50-400 images against up to
  1792 channels, and each component sees only its share of them): there the
  sample covariance is singular, ``reg_covar = 1e-6`` alone leaves a nearly
  singular component that puts huge density on its own training rows, and
  the paper's result is that Ledoit-Wolf shrinkage is what makes the
  Gaussian work on these features. With one component it *is* the paper's
  Gaussian (same covariance, so the negative log-likelihood ranks rows
  exactly as the Mahalanobis distance).
* ``'reg_covar'``: scikit-learn's rule, only ``reg_covar`` added to the
  diagonal (use it to compare with scikit-learn).

Initialisation: k-means++ seeding from the PRNG key (first centre uniform,
then each next centre drawn with probability proportional to the squared
distance to the nearest chosen one), ``kmeans_iter`` Lloyd iterations, then one
M-step from the hard assignment. Explicit initial parameters
(:class:`GMMParams`) may be passed instead, as scikit-learn's
``weights_init`` / ``means_init`` / ``precisions_init``.

Components that get (almost) no rows: when a component's responsibility mass
``N_k`` falls below one row, its mean and covariance keep their previous
values (the seed centre and the pooled covariance at initialisation) and its
weight becomes ``N_k / sum N`` (tiny but positive, since ``N_k >= 10 eps``), so
no NaN arises and the component can pick rows up again later. scikit-learn
instead recomputes such a component from its vanishing responsibilities.
Components with one row or more are updated normally; besides ``reg_covar``
each covariance diagonal gets a rounding floor ``D eps max(diag C_k)`` (scipy
``pinvh``'s cut-off), so that the Cholesky factor of a component with two or
three rows (rank-deficient, and for two rows the Ledoit-Wolf coefficient is
exactly 0) exists in float32 too; in float64 the floor is ~1e-16 relative and
leaves the scikit-learn equality intact.

BIC follows scikit-learn: ``-2 log L + p log n`` with
``p = k D (D + 1) / 2 + k D + k - 1``; :func:`choose_k` fits each candidate k
(key ``fold_in(key, k)``) and keeps the one with the lowest BIC (the smaller k
on ties). With ``n_components`` a tuple, :func:`fit` does exactly that.

Cost per EM iteration: O(k n D^2) for the scatters and O(k D^3) for the
Cholesky factors; at D = 1792 and k = 8 a few seconds per iteration on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp
import numpy as np

from jax_gad import densities
from jax_gad import gaussian as core
from jax_gad.densities import _checks

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST
_LOG_2PI = math.log(2.0 * math.pi)
REGULARIZATIONS = ('ledoit_wolf', 'reg_covar')


@dataclasses.dataclass(frozen=True)
class GMMConfig:
  """Hyper-parameters of the Gaussian mixture.

  Attributes:
    n_components: number of components k, or a tuple of candidates from
      which :func:`fit` picks the one with the lowest BIC (default
      (1, 2, 4, 8)). Normalised to a sorted tuple of distinct ints.
    regularization: ``'ledoit_wolf'`` (default) or ``'reg_covar'``, see the
      module docstring.
    reg_covar: non-negative value added to every covariance diagonal
      (scikit-learn's default 1e-6).
    tol: stop when the mean log-likelihood changes by less (>= 0; 0 runs
      ``max_iter`` iterations).
    max_iter: maximum number of EM iterations (>= 1).
    kmeans_iter: Lloyd iterations after k-means++ seeding (>= 0).
  """

  n_components: int | tuple = (1, 2, 4, 8)
  regularization: str = 'ledoit_wolf'
  reg_covar: float = 1e-6
  tol: float = 1e-3
  max_iter: int = 100
  kmeans_iter: int = 10

  def __post_init__(self):
    owner = 'GMMConfig'
    ks = self.n_components
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
      ks = (ks,)
    if not isinstance(ks, (tuple, list)) or not ks:
      raise ValueError(
        f'{owner}.n_components must be a positive integer or a non-empty tuple of '
        f'them, got {self.n_components!r}.'
      )
    ks = tuple(sorted({_checks.positive_int(owner, 'n_components', k) for k in ks}))
    _checks.set_field(self, 'n_components', ks)
    _checks.choice(owner, 'regularization', self.regularization, REGULARIZATIONS)
    _checks.real(owner, 'reg_covar', self.reg_covar, low=0.0)
    _checks.real(owner, 'tol', self.tol, low=0.0)
    _checks.positive_int(owner, 'max_iter', self.max_iter)
    _checks.nonneg_int(owner, 'kmeans_iter', self.kmeans_iter)


class GMMParams(NamedTuple):
  """Mixture parameters (also the form of explicit initial parameters).

  Attributes:
    weights: (k,) positive, summing to 1.
    means: (k, D).
    covariances: (k, D, D) symmetric positive definite.
  """

  weights: Array
  means: Array
  covariances: Array


class GMMState(NamedTuple):
  """A fitted mixture.

  Attributes:
    weights: (k,) mixing weights.
    means: (k, D) component means.
    covariances: (k, D, D) regularised covariances.
    chol: (k, D, D) their lower Cholesky factors.
    shrinkage: (k,) Ledoit-Wolf coefficient per component (0 with 'reg_covar').
    n_iter: () EM iterations run.
    converged: () bool, the tolerance was met before ``max_iter``.
    log_likelihood: () mean log-likelihood of the training rows under the
      returned parameters.
    bic: () scikit-learn's BIC of the training rows.
  """

  weights: Array
  means: Array
  covariances: Array
  chol: Array
  shrinkage: Array
  n_iter: Array
  converged: Array
  log_likelihood: Array
  bic: Array


# ---------------------------------------------------------------------------
# EM kernels (jit-compiled; shapes fix k and D)
# ---------------------------------------------------------------------------


def _log_gauss(x: Array, means: Array, chol: Array) -> Array:
  """(n, k) log N(x_i | mu_k, L_k L_k^T)."""
  dim = x.shape[1]

  def one(mu, factor):
    z = solve_triangular(factor, (x - mu).T, lower=True)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(factor)))
    return -0.5 * (jnp.sum(z * z, axis=0) + dim * _LOG_2PI) - half_logdet

  return jax.vmap(one, out_axes=1)(means, chol)


def _e_step(x, weights, means, chol):
  """(log p(x_i) (n,), log responsibilities (n, k))."""
  weighted = _log_gauss(x, means, chol) + jnp.log(weights)
  log_norm = logsumexp(weighted, axis=1)
  return log_norm, weighted - log_norm[:, None]


def _weighted_cov(x, resp_k, mean_k, nk, regularization):
  """Weighted covariance of one component and its Ledoit-Wolf coefficient."""
  dim = x.shape[1]
  diff = x - mean_k
  emp = jnp.matmul((resp_k[:, None] * diff).T, diff, precision=_HIGHEST) / nk
  if regularization == 'reg_covar':
    return emp, jnp.zeros((), x.dtype)
  # Weighted Ledoit-Wolf: the terms of gaussian.shrunk_covariance with
  # weighted averages and Kish's effective size in place of n.
  mu = jnp.trace(emp) / dim
  eye = jnp.eye(dim, dtype=x.dtype)
  r2 = jnp.sum(diff * diff, axis=1)
  fourth = jnp.sum(resp_k * r2 * r2) / nk
  n_eff = nk * nk / jnp.maximum(jnp.sum(resp_k * resp_k), jnp.finfo(x.dtype).tiny)
  beta = (fourth - jnp.sum(emp * emp)) / (dim * n_eff)
  delta = jnp.sum(jnp.square(emp - mu * eye)) / dim
  shrink = core.ledoit_wolf_shrinkage(beta, delta)
  return (1.0 - shrink) * emp + (shrink * mu) * eye, shrink


def _regularize(covs, reg_covar):
  """Adds ``reg_covar`` plus the rounding floor ``D eps max(diag C_k)`` to each diagonal.

  The floor (scipy ``pinvh``'s cut-off) keeps the Cholesky factor of a
  component with very few rows (a rank-1 covariance of two rows, where the
  Ledoit-Wolf coefficient is 0) computable in float32, where ``reg_covar = 1e-6``
  alone can be below the factorisation's rounding; in float64 it is ~1e-16
  relative and does not change the iterates.
  """
  dim = covs.shape[-1]
  eye = jnp.eye(dim, dtype=covs.dtype)
  diag_max = jnp.max(jnp.diagonal(covs, axis1=-2, axis2=-1), axis=-1)
  floor = dim * jnp.finfo(covs.dtype).eps * jnp.maximum(diag_max, 0.0)
  return covs + (reg_covar + floor)[..., None, None] * eye


def _m_step(x, resp, prev_means, prev_covs, reg_covar, regularization):
  """New (weights, means, covariances, shrinkage) from responsibilities (n, k)."""
  eps = jnp.finfo(x.dtype).eps
  nk = jnp.sum(resp, axis=0) + 10.0 * eps
  means = jnp.matmul(resp.T, x, precision=_HIGHEST) / nk[:, None]
  covs, shrink = jax.vmap(
    lambda r, m, n: _weighted_cov(x, r, m, n, regularization), in_axes=(1, 0, 0)
  )(resp, means, nk)
  covs = _regularize(covs, reg_covar)
  # A component with less than one row of mass keeps its previous mean and covariance.
  small = nk < 1.0
  means = jnp.where(small[:, None], prev_means, means)
  covs = jnp.where(small[:, None, None], prev_covs, covs)
  shrink = jnp.where(small, 0.0, shrink)
  return nk / jnp.sum(nk), means, covs, shrink


def _cholesky(covs):
  return jnp.linalg.cholesky(covs, symmetrize_input=False)


def _em_impl(x, weights, means, covs, shrink, reg_covar, tol, max_iter, regularization):
  init = (
    jnp.asarray(0, jnp.int32),
    weights,
    means,
    covs,
    _cholesky(covs),
    shrink,
    jnp.asarray(-jnp.inf, x.dtype),
    jnp.asarray(False),
  )

  def cond(carry):
    it, *_, done = carry
    return (it < max_iter) & jnp.logical_not(done)

  def body(carry):
    it, w, mu, cov, chol, sh, prev_lb, _ = carry
    log_norm, log_resp = _e_step(x, w, mu, chol)
    lb = jnp.mean(log_norm)
    w, mu, cov, sh = _m_step(x, jnp.exp(log_resp), mu, cov, reg_covar, regularization)
    done = jnp.abs(lb - prev_lb) < tol
    return it + 1, w, mu, cov, _cholesky(cov), sh, lb, done

  it, w, mu, cov, chol, sh, _, done = lax.while_loop(cond, body, init)
  final_ll = jnp.mean(_e_step(x, w, mu, chol)[0])
  return w, mu, cov, chol, sh, it, done, final_ll


_em_jit = jax.jit(_em_impl, static_argnames='regularization')


def _kmeans_pp(x, k, key):
  """k-means++ seeds (k, D): first uniform, then proportional to squared distance."""
  n = x.shape[0]
  key, sub = jax.random.split(key)
  first = x[jax.random.randint(sub, (), 0, n)]
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
  d2 = jnp.sum(jnp.square(x - first), axis=1)

  def body(j, carry):
    centres, d2, key = carry
    key, sub = jax.random.split(key)
    positive = d2 > 0
    # All rows already chosen (duplicates): draw uniformly instead of from -inf logits.
    logits = jnp.where(
      jnp.any(positive), jnp.where(positive, jnp.log(jnp.where(positive, d2, 1.0)), -jnp.inf), 0.0
    )
    c = x[jax.random.categorical(sub, logits)]
    return centres.at[j].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=1)), key

  centres, _, _ = lax.fori_loop(1, k, body, (centres, d2, key))
  return centres


def _assign(x, centres):
  d2 = (
    jnp.sum(x * x, axis=1)[:, None]
    - 2.0 * jnp.matmul(x, centres.T, precision=_HIGHEST)
    + jnp.sum(centres * centres, axis=1)[None, :]
  )
  return jnp.argmin(d2, axis=1)


def _init_impl(x, key, k, kmeans_iter, reg_covar, regularization):
  centres = _kmeans_pp(x, k, key)

  def lloyd(_, centres):
    onehot = jax.nn.one_hot(_assign(x, centres), k, dtype=x.dtype)
    count = jnp.sum(onehot, axis=0)
    new = jnp.matmul(onehot.T, x, precision=_HIGHEST) / jnp.maximum(count, 1.0)[:, None]
    return jnp.where((count > 0)[:, None], new, centres)  # empty clusters keep their centre

  centres = lax.fori_loop(0, kmeans_iter, lloyd, centres)
  resp = jax.nn.one_hot(_assign(x, centres), k, dtype=x.dtype)
  n = x.shape[0]
  pooled, _ = _weighted_cov(
    x, jnp.ones((n,), x.dtype), jnp.mean(x, axis=0), jnp.asarray(n, x.dtype), regularization
  )
  pooled = _regularize(pooled, reg_covar)
  prev_covs = jnp.broadcast_to(pooled, (k,) + pooled.shape)
  return _m_step(x, resp, centres, prev_covs, reg_covar, regularization)


_init_jit = jax.jit(_init_impl, static_argnames=('k', 'kmeans_iter', 'regularization'))


@jax.jit
def _score_jit(state: GMMState, x: Array) -> Array:
  return -_e_step(x, state.weights, state.means, state.chol)[0]


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def n_parameters(k: int, dim: int) -> int:
  """Free parameters of a k-component full-covariance mixture in D dims (scikit-learn's count)."""
  return k * dim * (dim + 1) // 2 + k * dim + k - 1


def _check_init(init: GMMParams, k_config, dim: int, dtype) -> GMMParams:
  if not isinstance(init, GMMParams):
    raise ValueError(f'init must be a GMMParams, got {type(init).__name__}.')
  w = np.asarray(init.weights, dtype=np.float64)
  if w.ndim != 1 or w.size < 1:
    raise ValueError(f'init.weights must be 1-D (k,), got shape {w.shape}.')
  k = w.size
  if k_config != (k,):
    raise ValueError(
      f'GMMConfig.n_components must be ({k},) to match init with {k} components, got {k_config}.'
    )
  if np.shape(init.means) != (k, dim) or np.shape(init.covariances) != (k, dim, dim):
    raise ValueError(
      f'init.means must be ({k}, {dim}) and init.covariances ({k}, {dim}, {dim}), '
      f'got {np.shape(init.means)} and {np.shape(init.covariances)}.'
    )
  if not (np.all(np.isfinite(w)) and np.all(w > 0) and abs(w.sum() - 1.0) < 1e-6):
    raise ValueError(f'init.weights must be positive and sum to 1, got {w.tolist()}.')
  for name in ('means', 'covariances'):
    if not np.all(np.isfinite(np.asarray(getattr(init, name)))):
      raise ValueError(f'init.{name} contains NaN or inf.')
  return GMMParams(*(jnp.asarray(a, dtype) for a in init))


def _finish(x, config: GMMConfig, out) -> GMMState:
  w, mu, cov, chol, sh, it, done, ll = out
  if not (bool(jnp.all(jnp.isfinite(chol))) and bool(jnp.isfinite(ll))):
    bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(chol)), axis=(1, 2)))
    raise ValueError(
      f'GMM component(s) {bad.tolist()} got a covariance that is not positive '
      f'definite (k={w.shape[0]}, regularization={config.regularization!r}); '
      f'raise GMMConfig.reg_covar (now {config.reg_covar:g}).'
    )
  n, dim = x.shape
  k = int(w.shape[0])
  bic = -2.0 * float(ll) * n + n_parameters(k, dim) * math.log(n)
  return GMMState(
    weights=w,
    means=mu,
    covariances=cov,
    chol=chol,
    shrinkage=sh,
    n_iter=it,
    converged=done,
    log_likelihood=ll,
    bic=jnp.asarray(bic, x.dtype),
  )


def _fit_k(config: GMMConfig, x: Array, key, k: int, init: GMMParams | None) -> GMMState:
  reg = jnp.asarray(config.reg_covar, x.dtype)
  if init is None:
    w, mu, cov, sh = _init_jit(
      x,
      key,
      k=k,
      kmeans_iter=config.kmeans_iter,
      reg_covar=reg,
      regularization=config.regularization,
    )
  else:
    w, mu, cov = init
    sh = jnp.zeros((k,), x.dtype)
  out = _em_jit(
    x,
    w,
    mu,
    cov,
    sh,
    reg,
    jnp.asarray(config.tol, x.dtype),
    jnp.asarray(config.max_iter, jnp.int32),
    regularization=config.regularization,
  )
  return _finish(x, config, out)


def _check_rows(config: GMMConfig, x_train):
  x = core.check_features(x_train, 'x_train', min_samples=2)
  n = x.shape[0]
  too_many = [k for k in config.n_components if k > n]
  if too_many:
    raise ValueError(
      f'GMMConfig.n_components {list(too_many)} exceeds the {n} training rows; '
      'each component needs at least one row.'
    )
  return x


def choose_k(config: GMMConfig, x_train, key, candidates=None):
  """Fits each candidate number of components and keeps the lowest BIC.

  Args:
    config: :class:`GMMConfig` (its ``n_components`` is the default list).
    x_train: (n, D) rows, n >= 2 and n >= every candidate.
    key: PRNG key; candidate k uses ``fold_in(key, k)``.
    candidates: optional iterable of positive ints overriding
      ``config.n_components``.

  Returns:
    (state, k, bics): the chosen :class:`GMMState`, its k, and a dict
    k -> BIC (Python floats).
  """
  if candidates is not None:
    config = dataclasses.replace(config, n_components=tuple(candidates))
  x = _check_rows(config, x_train)
  best, bics = None, {}
  for k in config.n_components:
    state = _fit_k(config, x, jax.random.fold_in(key, k), k, None)
    bics[k] = float(state.bic)
    if best is None or bics[k] < bics[best[1]]:
      best = (state, k)
  return best[0], best[1], bics


def fit(config: GMMConfig, x_train, key, init: GMMParams | None = None) -> GMMState:
  """Fits the mixture by EM (choosing k by BIC when several are configured).

  Args:
    config: :class:`GMMConfig`.
    x_train: (n, D) training rows, finite, n >= 2 and n >= k. float64 rows
      (under x64) are fitted in float64, anything else in float32.
    key: PRNG key for the k-means++ initialisation (unused with ``init``).
    init: optional explicit initial :class:`GMMParams` (then
      ``config.n_components`` must be that single k).

  Returns:
    :class:`GMMState`.

  Raises:
    ValueError: bad rows, k > n, bad ``init``, or a covariance that is not
      positive definite (``reg_covar`` too small).
  """
  if not isinstance(config, GMMConfig):
    raise ValueError(f'config must be a GMMConfig, got {type(config).__name__}.')
  if init is not None:
    x = _check_rows(config, x_train)
    init = _check_init(init, config.n_components, x.shape[1], x.dtype)
    return _fit_k(config, x, key, config.n_components[0], init)
  return choose_k(config, x_train, key)[0]


def score(state: GMMState, x) -> Array:
  """Negative log-likelihood ``-log sum_k w_k N(x | mu_k, C_k)`` of each row, (n,)."""
  if not isinstance(state, GMMState):
    raise ValueError(f'state must be a GMMState, got {type(state).__name__}.')
  x = core.check_features(
    x, 'x', min_samples=0, width=state.means.shape[1], dtype=state.means.dtype
  )
  return _score_jit(state, x)


def log_likelihood(state: GMMState, x) -> Array:
  """Log-likelihood of each row, (n,)."""
  return -score(state, x)


def describe(state: GMMState) -> dict:
  """What a fit chose: ``n_components`` (k; by BIC when there were candidates),
  ``n_iter`` and ``converged``."""
  return {
    'n_components': int(np.shape(state.weights)[0]),
    'n_iter': int(state.n_iter),
    'converged': bool(state.converged),
  }


DENSITY = densities.register(
  densities.Density(
    name='gmm',
    config=GMMConfig,
    fit=fit,
    scorers={'nll': score},
    default_scorer='nll',
    describe=describe,
  )
)
