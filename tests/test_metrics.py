"""Tests for jax_gad.metrics against scikit-learn and scipy as independent references."""

import math

import numpy as np
import pytest
from scipy import stats
import scipy.stats
from sklearn import metrics as sk_metrics

from jax_gad import metrics


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 60)
  labels[:2] = [0, 1]
  scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
  assert metrics.auroc(scores, labels) == pytest.approx(
    sk_metrics.roc_auc_score(labels, scores), abs=1e-12
  )


def test_roc_curve_matches_sklearn():
  rng = np.random.default_rng(0)
  labels = np.r_[np.zeros(30, int), np.ones(20, int)]
  scores = np.round(rng.normal(size=50) + labels, 1)
  fpr, tpr = metrics.roc_curve(scores, labels)
  ref_fpr, ref_tpr, _ = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr)
  np.testing.assert_allclose(tpr, ref_tpr)
  assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(scores, labels))


def test_auroc_rejects_bad_input():
  with pytest.raises(ValueError, match="both 0"):
    metrics.auroc([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match="NaN"):
    metrics.auroc([np.nan, 0.2], [0, 1])
  with pytest.raises(ValueError, match="same length"):
    metrics.auroc([0.1, 0.2, 0.3], [0, 1])


def test_mean_sem_matches_scipy():
  v = np.random.default_rng(1).normal(size=75)
  mean, sem = metrics.mean_sem(v)
  assert mean == pytest.approx(v.mean())
  assert sem == pytest.approx(scipy.stats.sem(v, ddof=1))
  assert metrics.mean_sem([3.0]) == (3.0, None)


def test_sigma_threshold_closed_forms():
  sigmas = np.arange(1, 9, dtype=np.float64)
  # One dimension: |z| > n sigma exactly, so the threshold is n itself.
  np.testing.assert_allclose(metrics.sigma_threshold(sigmas, 1), sigmas, rtol=1e-10)
  # Two dimensions: chi2(2) is exponential with mean 2; isf(p) = -2 log p.
  tail = np.array([math.erfc(s / math.sqrt(2)) for s in sigmas])
  np.testing.assert_allclose(
    metrics.sigma_threshold(sigmas, 2), np.sqrt(-2 * np.log(tail)), rtol=1e-10
  )
  # The design's formula, where erf has not rounded to 1 yet.
  for k in (5, 448, 1792):
    for s in (1.0, 2.0, 3.0, 4.0):
      ref = math.sqrt(stats.chi2.ppf(math.erf(s / math.sqrt(2)), k))
      assert metrics.sigma_threshold(s, k) == pytest.approx(ref, rel=1e-8)
  with pytest.raises(ValueError, match='k must be a positive integer'):
    metrics.sigma_threshold(1.0, 0)
  with pytest.raises(ValueError, match='n_sigma'):
    metrics.sigma_threshold(-1.0, 3)


def test_tpr_fpr_at_sigmas():
  rng = np.random.default_rng(0)
  k = 6
  normal = np.sqrt(np.sum(rng.normal(size=(20000, k)) ** 2, axis=1))
  anomalous = np.sqrt(np.sum((rng.normal(size=(500, k)) * 3.0) ** 2, axis=1))
  dist = np.r_[normal, anomalous]
  labels = np.r_[np.zeros(20000, int), np.ones(500, int)]
  tpr, fpr = metrics.tpr_fpr_at_sigmas(dist, labels, k)
  assert tpr.shape == fpr.shape == (8,)
  thresholds = [math.sqrt(stats.chi2.ppf(math.erf(s / math.sqrt(2)), k)) for s in (1, 2, 3)]
  for i, thr in enumerate(thresholds):
    assert fpr[i] == pytest.approx(np.mean(normal > thr))
    assert tpr[i] == pytest.approx(np.mean(anomalous > thr))
  # For Gaussian data the FPR is the two-sided normal tail mass.
  np.testing.assert_allclose(fpr[:2], [math.erfc(s / math.sqrt(2)) for s in (1, 2)], atol=0.01)
  assert np.all(np.diff(tpr) <= 0) and np.all(np.diff(fpr) <= 0)
  tpr_only, fpr_none = metrics.tpr_fpr_at_sigmas(anomalous, np.ones(500, int), k, [1, 2])
  assert np.isnan(fpr_none).all() and np.isfinite(tpr_only).all()
  with pytest.raises(ValueError, match='labels must be 0 or 1'):
    metrics.tpr_fpr_at_sigmas(dist, labels * 2, k)
  with pytest.raises(ValueError, match='equal length'):
    metrics.tpr_fpr_at_sigmas(dist, labels[:-1], k)
  with pytest.raises(ValueError, match='NaN or inf'):
    metrics.tpr_fpr_at_sigmas(np.r_[np.nan, dist[1:]], labels, k)
