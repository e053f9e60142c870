"""Tests for jax_gad.pca against scikit-learn's PCA as the independent reference."""

from gaussian_data import _decaying
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA

from jax_gad import gaussian, pca

SHAPES = [(500, 64), (48, 1792), (200, 448)]
THRESHOLDS = (0.95, 0.99, 0.999, 0.9999)


@pytest.mark.parametrize('shape', SHAPES + [(800, 48)], ids=str)  # (800, 48): covariance route
def test_pca_matches_sklearn_and_selection_rule(shape):
  n, d = shape
  x = _decaying(n, d)
  ref = PCA(svd_solver='full').fit(x)
  k = min(n, d)
  with jax.enable_x64(True):
    fitted = jax.tree.map(np.asarray, pca.fit_pca(x))
  assert fitted.components.shape == (k, d) and fitted.explained_variance_ratio.shape == (k,)
  np.testing.assert_allclose(fitted.mean, ref.mean_, rtol=1e-12, atol=1e-12)
  top = ref.explained_variance_[0]
  np.testing.assert_allclose(
    fitted.explained_variance, ref.explained_variance_, rtol=1e-7, atol=1e-12 * top
  )
  np.testing.assert_allclose(
    fitted.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-7, atol=1e-12
  )
  # Components up to sign, where the direction is numerically defined: an
  # eigendecomposition of the covariance resolves variances down to about
  # eps * top, and a direction needs a gap to both neighbours.
  var = ref.explained_variance_
  gaps = np.minimum(np.abs(np.diff(var, prepend=np.inf)), np.abs(np.diff(var, append=-np.inf)))
  defined = (var > 1e-10 * top) & (gaps > 1e-10 * top)
  cum = np.cumsum(ref.explained_variance_ratio_)
  assert defined[: int(np.flatnonzero(cum > max(THRESHOLDS))[0]) + 2].all()
  dots = np.abs(np.sum(fitted.components[defined] * ref.components_[defined], axis=1))
  np.testing.assert_allclose(dots, 1.0, atol=1e-9)
  # Our sign convention is scikit-learn's: largest-magnitude entry positive.
  rows = fitted.components[defined]
  assert (rows[np.arange(len(rows)), np.abs(rows).argmax(1)] > 0).all()
  np.testing.assert_allclose(rows, ref.components_[defined], atol=1e-6)

  for t in THRESHOLDS:
    assert np.abs(cum - t).min() > 1e-9, 'test data too close to a threshold'
    last = int(np.flatnonzero(cum > t)[0])
    assert pca.select_components(fitted.explained_variance_ratio, 'pca', t) == (0, last + 1)
    assert pca.select_components(fitted.explained_variance_ratio, 'npca', t) == (last - 1, k)
    with jax.enable_x64(True):
      kept_pca = pca.reduce(pca.PCAState(*fitted), 'pca', t).components.shape[0]
      kept_npca = pca.reduce(pca.PCAState(*fitted), 'npca', t).components.shape[0]
    assert (kept_pca, kept_npca) == (last + 1, k - last + 1)


def test_project_matches_sklearn_transform():
  x = _decaying(150, 24)
  x_test = _decaying(10, 24, seed=9)
  ref = PCA(svd_solver='full').fit(x)
  with jax.enable_x64(True):
    fitted = pca.fit_pca(x)
    for mode, t in [('pca', 0.99), ('npca', 0.99)]:
      start, stop = pca.select_components(fitted.explained_variance_ratio, mode, t)
      proj = np.asarray(pca.project(pca.reduce(fitted, mode, t), x_test))
      expect = ref.transform(x_test)[:, start:stop]
      assert proj.shape == expect.shape
      np.testing.assert_allclose(np.abs(proj), np.abs(expect), rtol=1e-6, atol=1e-9)


def test_pca_float32_close_to_sklearn():
  x = _decaying(200, 64)
  ref = PCA(svd_solver='full').fit(x)
  fitted = pca.fit_pca(x.astype(np.float32))
  assert fitted.components.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(fitted.explained_variance_ratio)[:20], ref.explained_variance_ratio_[:20], rtol=1e-3
  )


def test_pca_from_moments_equals_fit_pca():
  x = _decaying(90, 16)
  with jax.enable_x64(True):
    m = gaussian.empty_moments(16, jnp.float64)
    for batch in np.array_split(x, [10, 55]):
      m = gaussian.accumulate(m, batch)
    a = pca.pca_from_moments(m)
    b = pca.fit_pca(x)
    np.testing.assert_allclose(a.explained_variance, b.explained_variance, rtol=1e-9)
    np.testing.assert_allclose(a.components[:10], b.components[:10], atol=1e-8)
    assert pca.pca_from_moments(m, 3).components.shape == (3, 16)
    with pytest.raises(ValueError, match='n_components'):
      pca.pca_from_moments(m, 17)


def test_select_components_edges_and_validation():
  ratio = np.array([0.6, 0.3, 0.06, 0.03, 0.01])
  assert pca.select_components(ratio, 'pca', 0.5) == (0, 1)
  assert pca.select_components(ratio, 'npca', 0.5) == (0, 5)  # last - 1 clipped at 0
  assert pca.select_components(ratio, 'pca', 0.95) == (0, 3)
  assert pca.select_components(ratio, 'npca', 0.95) == (1, 5)  # one component of overlap
  short = np.array([0.5, 0.4999])  # cumsum never above t
  assert pca.select_components(short, 'pca', 0.99995) == (0, 2)
  for bad in (0, 1, 1.0, -0.5, 2, True, '0.9', float('nan')):
    with pytest.raises(ValueError, match='threshold'):
      pca.select_components(ratio, 'pca', bad)
  with pytest.raises(ValueError, match="mode must be 'pca' or 'npca'"):
    pca.select_components(ratio, 'PCA', 0.9)
  with pytest.raises(ValueError, match='1-D'):
    pca.select_components(ratio[None], 'pca', 0.9)


def test_cut_at_an_exact_tie_takes_the_first_ratio_above_t():
  """A cumulative ratio equal to t does not end the PCA part: the rule is 'first c > t'."""
  ratio = np.array([0.5, 0.25, 0.125, 0.125])  # cumulative 0.5, 0.75, 0.875, 1.0, all exact
  # scikit-learn's PCA(n_components=t) keeps searchsorted(c, t, side='right') + 1 components.
  kept = int(np.searchsorted(np.cumsum(ratio), 0.75, side='right')) + 1
  assert kept == 3
  assert pca.select_components(ratio, 'pca', 0.75) == (0, kept)
  assert pca.select_components(ratio, 'npca', 0.75) == (kept - 2, 4)  # one component of overlap
