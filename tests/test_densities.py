"""Tests for jax_gad.densities against scikit-learn, scipy and autodiff as references."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf
from sklearn.datasets import make_moons
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from jax_gad import densities
from jax_gad import gaussian as core
from jax_gad.densities import flow, gmm


def _blobs(n=90, d=3, seed=0):
  """Three correlated clusters in d dims (float64)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0.0, 4.0, (3, d))
  parts = []
  for c in range(3):
    a = rng.normal(size=(d, d)) / math.sqrt(d) + np.eye(d) * 0.5
    parts.append(rng.normal(size=(n // 3, d)) @ a + centres[c])
  return np.concatenate(parts)[rng.permutation(n)]


def _init_params(x, k, seed=1):
  """Deliberately rough initial parameters (so that EM moves a lot in 10 iterations)."""
  rng = np.random.default_rng(seed)
  means = x[rng.choice(len(x), k, replace=False)] + rng.normal(0.0, 0.5, (k, x.shape[1]))
  covs = np.stack([np.cov(x.T) * rng.uniform(0.5, 1.5) for _ in range(k)])
  w = rng.uniform(0.5, 1.5, k)
  return w / w.sum(), means, covs


# ---------------------------------------------------------------------------
# Registry and interface
# ---------------------------------------------------------------------------


def test_registry_lists_the_three_densities_and_rejects_unknown_names():
  assert {'gaussian', 'gmm', 'flow'} <= set(densities.DENSITIES)
  with pytest.raises(ValueError, match=r"density must be one of .*'nope'"):
    densities.get('nope')
  with pytest.raises(ValueError, match='already registered'):
    densities.register(
      densities.Density(
        name='gmm',
        config=gmm.GMMConfig,
        fit=gmm.fit,
        scorers={'nll': gmm.score},
        default_scorer='nll',
      )
    )


def test_gaussian_streaming_equals_fit_on_rows():
  x = _blobs(120, 6)
  model = densities.get('gaussian')
  config = model.config()
  with jax.enable_x64(True):
    whole = model.fit(config, x, jax.random.key(0))
    streamed = densities.fit_batches(model, config, [x[:50], x[50:51], x[51:]])
    stats = model.streaming.merge(
      config,
      model.streaming.accumulate(config, model.streaming.init(config, 6, np.float64), x[:70]),
      core.moments(x[70:]),
    )
    merged = model.streaming.finalize(config, stats)
    for state in (streamed, merged):
      np.testing.assert_allclose(model.score(state, x), model.score(whole, x), rtol=1e-9)
    np.testing.assert_array_equal(model.score(whole, x), core.mahalanobis(core.fit_gaussian(x), x))
  assert set(model.scorers) == {'l2', 'sed', 'mahalanobis'}
  with pytest.raises(ValueError, match='no streaming fit'):
    densities.fit_batches(densities.get('gmm'), gmm.GMMConfig(), [x])


# ---------------------------------------------------------------------------
# Gaussian mixture
# ---------------------------------------------------------------------------


def test_gmm_em_iterates_equal_scikit_learn():
  """After each of 10 iterations (tol=0), weights, means, covariances match within 1e-5."""
  x = _blobs()
  k = 3
  w0, m0, c0 = _init_params(x, k)
  config = gmm.GMMConfig(n_components=k, regularization='reg_covar', reg_covar=1e-3, tol=0.0)
  init = gmm.GMMParams(w0, m0, c0)
  moved = 0.0
  with jax.enable_x64(True):
    for it in range(1, 11):
      ours = gmm.fit(
        gmm.GMMConfig(**{**config.__dict__, 'max_iter': it}), x, jax.random.key(0), init=init
      )
      ref = GaussianMixture(
        k,
        covariance_type='full',
        reg_covar=1e-3,
        tol=0.0,
        max_iter=it,
        weights_init=w0,
        means_init=m0,
        precisions_init=np.linalg.inv(c0),
        random_state=0,
      )
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', ConvergenceWarning)
        ref.fit(x)
      assert int(ours.n_iter) == ref.n_iter_ == it
      assert ours.weights.dtype == jnp.float64
      np.testing.assert_allclose(ours.weights, ref.weights_, rtol=1e-5)
      np.testing.assert_allclose(ours.means, ref.means_, rtol=1e-5, atol=1e-8)
      np.testing.assert_allclose(ours.covariances, ref.covariances_, rtol=1e-5, atol=1e-8)
      moved = max(moved, float(np.abs(ref.means_ - m0).max()))
    # The comparison is not vacuous: EM moved the means well beyond the tolerance.
    assert moved > 0.1
    # BIC and log-likelihood as scikit-learn computes them for the same parameters.
    np.testing.assert_allclose(float(ours.bic), ref.bic(x), rtol=1e-8)
    np.testing.assert_allclose(float(ours.log_likelihood), ref.score(x), rtol=1e-8)
    np.testing.assert_allclose(gmm.score(ours, x), -ref.score_samples(x), rtol=1e-8)


def test_gmm_one_component_ledoit_wolf_ranks_as_mahalanobis():
  rng = np.random.default_rng(3)
  d = 8
  a = rng.normal(size=(d, d))
  train = rng.normal(size=(60, d)) @ a
  test = np.concatenate(
    [rng.normal(size=(30, d)) @ a, rng.normal(size=(30, d)) @ a * 1.3 + rng.normal(0, 1.0, d)]
  )
  labels = np.r_[np.zeros(30), np.ones(30)]
  with jax.enable_x64(True):
    state = gmm.fit(gmm.GMMConfig(n_components=1, reg_covar=0.0), train, jax.random.key(0))
    nll = np.asarray(gmm.score(state, test))
    maha = np.asarray(core.mahalanobis(core.fit_gaussian(train), test))
  np.testing.assert_allclose(state.covariances[0], sk_ledoit_wolf(train)[0], rtol=1e-10)
  np.testing.assert_array_equal(stats.rankdata(nll), stats.rankdata(maha))
  auc_gmm, auc_gauss = roc_auc_score(labels, nll), roc_auc_score(labels, maha)
  assert auc_gmm == auc_gauss
  assert 0.6 < auc_gmm < 1.0  # informative and not trivially separable


def test_gmm_choose_k_by_bic_and_deterministic_for_a_key():
  x = _blobs(90, 2, seed=4)
  config = gmm.GMMConfig(n_components=(1, 2, 3))
  state, k, bics = gmm.choose_k(config, x, jax.random.key(7))
  assert k == min(bics, key=bics.get)
  assert k >= 2  # three separated clusters: one Gaussian is not the best by BIC
  for kk, value in bics.items():
    single = gmm.fit(gmm.GMMConfig(n_components=kk), x, jax.random.key(7))
    assert float(single.bic) == value
  again = gmm.fit(config, x, jax.random.key(7))
  for a, b in zip(state, again):
    np.testing.assert_array_equal(a, b)
  # What results.json records per fit: the k that BIC chose.
  info = densities.get('gmm').describe(again)
  assert info['n_components'] == k and info['n_iter'] == int(again.n_iter)
  assert info['converged'] == bool(again.converged)
  other = gmm.fit(gmm.GMMConfig(n_components=3), x, jax.random.key(8))
  assert np.all(np.isfinite(np.asarray(other.means)))


def test_gmm_components_without_rows_stay_finite():
  # Two distinct rows repeated: k-means++ can seed at most two distinct centres,
  # so two of the four components get no rows.
  x = np.repeat(np.array([[0.0, 1.0], [3.0, -1.0]], np.float32), 5, axis=0)
  state = gmm.fit(gmm.GMMConfig(n_components=4), x, jax.random.key(0))
  for leaf in state:
    assert np.all(np.isfinite(np.asarray(leaf)))
  np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(gmm.score(state, x + 0.5))))


def test_gmm_components_without_rows_keep_a_positive_weight():
  # N_k = sum_i r_ik + 10 eps: a component that gets no rows keeps a tiny positive weight
  # (log w_k finite), so it can pick rows up again.
  x = np.repeat(np.array([[0.0, 1.0], [3.0, -1.0]], np.float32), 5, axis=0)
  state = gmm.fit(gmm.GMMConfig(n_components=4), x, jax.random.key(0))
  w = np.asarray(state.weights)
  assert np.sum(w < 1e-3) == 2  # two components without rows, as the test above says
  assert np.all(w > 0) and np.all(np.isfinite(np.log(w)))


def test_gmm_weighted_ledoit_wolf_uses_kish_effective_size():
  # Equal responsibilities (0.5 for every row) weigh nothing: the weighted Ledoit-Wolf
  # coefficient must be scikit-learn's on the unweighted rows. Kish's effective size is
  # (sum r)^2 / sum r^2 = n here; N_k = n / 2 in its place gives another coefficient.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6))
  resp = np.full(30, 0.5)
  with jax.enable_x64(True):
    mean = jnp.asarray(x.mean(axis=0))
    cov, shrink = gmm._weighted_cov(
      jnp.asarray(x), jnp.asarray(resp), mean, jnp.asarray(resp.sum()), 'ledoit_wolf'
    )
  ref_cov, ref_shrink = sk_ledoit_wolf(x)
  assert 0.05 < ref_shrink < 0.95  # a coefficient that n changes
  np.testing.assert_allclose(float(shrink), ref_shrink, rtol=1e-8)
  np.testing.assert_allclose(np.asarray(cov), ref_cov, rtol=1e-8, atol=1e-12)


def test_gmm_convergence_is_on_the_size_of_the_change():
  # With Ledoit-Wolf covariances EM's log-likelihood may drop; EM stops when it changes by
  # less than tol either way, not at the first drop. The trajectory comes from fits of
  # 1, 2, ... iterations (tol=0): iteration t compares the log-likelihoods after t-1 and t-2.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 6)).astype(np.float32) * rng.uniform(0.5, 3, 6).astype(np.float32)
  tol, key = 1e-3, jax.random.key(3)
  config = gmm.GMMConfig(n_components=2, tol=tol, max_iter=100)
  state = gmm.fit(config, x, key)
  n = int(state.n_iter)
  ll = {
    t: float(gmm.fit(gmm.GMMConfig(n_components=2, tol=0.0, max_iter=t), x, key).log_likelihood)
    for t in range(1, n)
  }
  drops = [t for t in range(2, n) if ll[t] - ll[t - 1] < -tol]
  assert drops, 'the case under test: the log-likelihood drops by more than tol before the end'
  assert bool(state.converged) and n < 100
  assert abs(ll[n - 1] - ll[n - 2]) < tol
  assert all(abs(ll[t - 1] - ll[t - 2]) >= tol for t in range(3, n))


@pytest.mark.parametrize('value', [0, -2, (2, 0), (), 1.5, True])
def test_gmm_rejects_non_positive_components(value):
  with pytest.raises(ValueError, match='n_components'):
    gmm.GMMConfig(n_components=value)


def test_gmm_rejects_more_components_than_rows_and_bad_settings():
  x = _blobs(9, 2)
  with pytest.raises(ValueError, match=r'n_components \[10\] exceeds the 9 training rows'):
    gmm.fit(gmm.GMMConfig(n_components=(2, 10)), x, jax.random.key(0))
  with pytest.raises(ValueError, match='regularization'):
    gmm.GMMConfig(regularization='diag')
  with pytest.raises(ValueError, match='reg_covar'):
    gmm.GMMConfig(reg_covar=-1.0)
  with pytest.raises(ValueError, match='init.weights'):
    gmm.fit(
      gmm.GMMConfig(n_components=2),
      x,
      jax.random.key(0),
      init=gmm.GMMParams(np.array([0.9, 0.9]), x[:2], np.stack([np.eye(2)] * 2)),
    )


def test_gmm_singular_covariance_without_regularisation_is_reported():
  x = np.zeros((6, 3), np.float32)  # zero covariance, nothing to shrink towards
  with pytest.raises(ValueError, match='not positive definite.*reg_covar'):
    gmm.fit(gmm.GMMConfig(n_components=1, reg_covar=0.0), x, jax.random.key(0))


# ---------------------------------------------------------------------------
# Normalizing flow
# ---------------------------------------------------------------------------

_MOONS_CONFIG = flow.FlowConfig(
  n_layers=6, hidden=64, epochs=60, batch_size=128, learning_rate=3e-3, patience=10
)


@pytest.fixture(scope='module')
def moons():
  x, _ = make_moons(900, noise=0.08, random_state=0)
  x = (x * np.array([2.0, 3.0]) + np.array([5.0, -1.0])).astype(np.float32)  # off unit scale
  train, test = x[:600], x[600:]
  state = flow.fit(_MOONS_CONFIG, train, jax.random.key(0), name='moons')
  return train, test, state


def _perturbed(state, scale=0.3, seed=0):
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  return state.replace(params=jax.tree.unflatten(tree, noisy))


def _check_log_det(state, x):
  y, log_det = flow.forward(state, x)
  jac = jax.vmap(jax.jacfwd(lambda r: flow.forward(state, r[None])[0][0]))(jnp.asarray(x))
  assert jac.shape == (x.shape[0], x.shape[1], x.shape[1])
  sign, logabs = jnp.linalg.slogdet(jac)
  np.testing.assert_array_equal(sign, 1.0)
  np.testing.assert_allclose(log_det, logabs, rtol=1e-9, atol=1e-9)
  # The log-likelihood is the base log-density of y plus the log-determinant.
  base = stats.multivariate_normal(np.zeros(x.shape[1])).logpdf(np.asarray(y))
  np.testing.assert_allclose(flow.log_prob(state, x), base + np.asarray(log_det), rtol=1e-9)


def _random_state(x, width, seed):
  """An untrained flow with random (non-identity) weights, padded to ``width``."""
  d = x.shape[1]
  module = flow.RealNVP(n_layers=4, hidden=16, depth=2, scale_bound=3.0)
  mask = (np.arange(width) < d).astype(x.dtype)
  params = module.init(jax.random.key(seed), np.zeros((1, width), x.dtype), mask)
  state = flow.FlowState(
    params=params,
    mean=x.mean(0),
    std=x.std(0),
    dim_mask=mask,
    held_out_nll=np.float64(0.0),
    epochs=np.int32(0),
    n_layers=4,
    hidden=16,
    depth=2,
    scale_bound=3.0,
  )
  return _perturbed(state, scale=0.15, seed=seed)


@pytest.mark.parametrize('width', [5, 8], ids=['unpadded', 'padded'])
def test_flow_log_det_equals_slogdet_of_autodiff_jacobian(width):
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = rng.normal(size=(40, 5)) * np.array([1.0, 2.0, 0.5, 3.0, 1.0]) + 1.0
    state = _random_state(x, width, seed=width)
    _check_log_det(state, x[:4])
    # The map is far from the identity, so the check is not vacuous.
    z = (x[:4] - state.mean) / state.std
    assert np.abs(np.asarray(flow.forward(state, x[:4])[0]) - z).max() > 0.1


def test_flow_density_integrates_to_one(moons):
  train, _, state = moons
  lo, hi = train.min(0) - 3 * train.std(0), train.max(0) + 3 * train.std(0)
  gx, gy = np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300)
  grid = np.stack(np.meshgrid(gx, gy, indexing='ij'), -1).reshape(-1, 2).astype(np.float32)
  p = np.exp(np.asarray(flow.log_prob(state, grid), np.float64))
  mass = p.sum() * (gx[1] - gx[0]) * (gy[1] - gy[0])
  assert abs(mass - 1.0) < 0.03, mass


def test_flow_beats_the_best_gaussian_on_two_moons(moons):
  train, test, state = moons
  gauss = stats.multivariate_normal(train.mean(0), np.cov(train.T, bias=True))
  ll_gauss = float(np.mean(gauss.logpdf(test)))
  ll_flow = float(np.mean(np.asarray(flow.log_prob(state, test))))
  assert ll_flow > ll_gauss + 0.5, (ll_flow, ll_gauss)
  assert 0 < int(state.epochs) <= _MOONS_CONFIG.epochs
  assert np.isfinite(float(state.held_out_nll))


def test_flow_training_is_deterministic_for_a_key():
  x = np.asarray(make_moons(200, noise=0.1, random_state=1)[0], np.float32)
  config = flow.FlowConfig(n_layers=2, hidden=16, epochs=5, batch_size=32)
  a = flow.fit(config, x, jax.random.key(5))
  b = flow.fit(config, x, jax.random.key(5))
  c = flow.fit(config, x, jax.random.key(6))
  same = jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a.params, b.params)
  assert all(jax.tree.leaves(same))
  np.testing.assert_array_equal(flow.score(a, x), flow.score(b, x))
  assert not np.array_equal(np.asarray(flow.score(a, x)), np.asarray(flow.score(c, x)))
  # Levels trained together in one vmapped program (padded to the widest level).
  vconfig = flow.FlowConfig(**{**config.__dict__, 'vmap_levels': True})
  levels = [x[:, :1], x]
  first = flow.fit_many(vconfig, levels, [jax.random.key(1), jax.random.key(2)], ['a', 'b'])
  second = flow.fit_many(vconfig, levels, [jax.random.key(1), jax.random.key(2)], ['a', 'b'])
  for s1, s2, xl in zip(first, second, levels):
    assert s1.dim_mask.shape == (2,) and int(s1.epochs) > 0
    np.testing.assert_array_equal(flow.score(s1, xl), flow.score(s2, xl))
    assert np.all(np.isfinite(np.asarray(flow.score(s1, xl))))


def test_flow_non_finite_loss_names_epoch_and_level():
  x = np.asarray(make_moons(100, noise=0.1, random_state=2)[0], np.float32)
  config = flow.FlowConfig(n_layers=2, hidden=8, epochs=5, batch_size=16, learning_rate=1e30)
  model = densities.get('flow')
  with pytest.raises(ValueError, match=r'non-finite .* at epoch \d+ of level head'):
    densities.fit_levels(model, config, [x, x[:, :1]], jax.random.key(0), names=['head', 'x'])


@pytest.mark.parametrize(
  'field,value', [('epochs', 0), ('val_fraction', 1.0), ('learning_rate', -1.0), ('hidden', 2.5)]
)
def test_flow_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f'FlowConfig.{field}'):
    flow.FlowConfig(**{field: value})


def _held_out(x, key, config):
  """The held-out rows of flow.fit(config, x, key): the split the fit draws from its key."""
  n = len(x)
  n_val = min(max(1, int(round(config.val_fraction * n))), n - 1)
  k_split = jax.random.split(key, 3)[0]
  return x[np.asarray(jax.random.permutation(k_split, n))[:n_val]]


def test_flow_early_stopping_counts_ties_as_no_improvement():
  # A learning rate far below float32 resolution: the parameters, hence the held-out loss,
  # never change. Epoch 1 improves on +inf; each later epoch ties, which is no improvement,
  # so training stops after exactly 1 + patience epochs.
  x = np.asarray(make_moons(80, noise=0.1, random_state=3)[0], np.float32)
  config = flow.FlowConfig(
    n_layers=2, hidden=8, epochs=30, batch_size=32, learning_rate=1e-30, patience=4
  )
  state = flow.fit(config, x, jax.random.key(0))
  assert int(state.epochs) == 1 + config.patience


def test_flow_keeps_the_parameters_of_the_best_held_out_epoch():
  # Small data, a large learning rate and little patience: training stops early, after
  # epochs that were worse than the best. The state's held-out NLL (the best one seen) must
  # be that of the parameters it returns, recomputed on the held-out rows.
  x = np.asarray(make_moons(120, noise=0.1, random_state=4)[0], np.float32)
  config = flow.FlowConfig(
    n_layers=4, hidden=32, epochs=200, batch_size=16, learning_rate=3e-2, patience=3
  )
  key = jax.random.key(1)
  state = flow.fit(config, x, key)
  assert int(state.epochs) < config.epochs  # stopped early: the last epoch is not the best
  nll = -float(np.mean(np.asarray(flow.log_prob(state, _held_out(x, key, config)), np.float64)))
  np.testing.assert_allclose(float(state.held_out_nll), nll, rtol=1e-4, atol=1e-4)


def test_flow_held_out_nll_is_in_raw_units():
  # Rows 10x off unit scale (sum log std = D log 10 > 0): the held-out NLL in raw units is
  # the standardised one plus sum log std, i.e. minus the mean log-density of those rows.
  x = np.asarray(make_moons(80, noise=0.1, random_state=5)[0], np.float32) * 10.0
  config = flow.FlowConfig(n_layers=2, hidden=8, epochs=3, batch_size=32, learning_rate=1e-30)
  key = jax.random.key(2)
  state = flow.fit(config, x, key)
  nll = -float(np.mean(np.asarray(flow.log_prob(state, _held_out(x, key, config)), np.float64)))
  assert nll > 0  # in standardised units it would be about 2.8 less per dimension
  np.testing.assert_allclose(float(state.held_out_nll), nll, rtol=1e-4)


def test_gmm_components_up_to_the_rows_of_a_fit():
  densities.check_rows(gmm.GMMConfig(n_components=(2, 8)), 8)  # one row per component: fine
  with pytest.raises(ValueError, match=r'--gmm_components=2,9: \[9\] exceed the 8 training rows'):
    densities.check_rows(gmm.GMMConfig(n_components=(2, 9)), 8)
  densities.check_rows(flow.FlowConfig(), 2)  # no components: nothing to check
