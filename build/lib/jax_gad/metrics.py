"""Metrics: AUROC, ROC curves, mean ± SEM, chi-squared thresholds.

All host-side numpy / scipy. AUROC is computed here (Mann-Whitney U with
mid-ranks for ties), not borrowed from scikit-learn, so that the tests can
check it against scikit-learn as an independent reference. The thresholds
follow docs/method.md, "Thresholds": for Gaussian data the squared
Mahalanobis distance in k dimensions is chi-squared(k).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
from scipy import special as _special
from scipy import stats as _stats

SIGMAS = tuple(range(1, 9))


class SigmaRates(NamedTuple):
  """TPR and FPR at each sigma threshold, both (len(sigmas),) float64."""

  tpr: np.ndarray
  fpr: np.ndarray


# ---------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------


def _check_scores_labels(scores, labels):
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(
      f"scores and labels must be 1-D arrays of the same length, got shapes "
      f"{scores.shape} and {labels.shape}."
    )
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf; AUROC is undefined.")
  values = set(np.unique(labels).tolist())
  if not values <= {0, 1} or len(values) != 2:
    raise ValueError(
      f"labels must contain both 0 (good) and 1 (defect) and nothing else, "
      f"got the values {sorted(values)}."
    )
  return scores, labels.astype(bool)


def _midranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x, tied values sharing the mean of their ranks."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Boundaries of runs of equal values in the sorted order.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
  ranks = np.empty(len(x), dtype=np.float64)
  ranks[order] = np.repeat(mean_rank, ends - starts)
  return ranks


def auroc(scores, labels) -> float:
  """Area under the ROC curve; higher scores mean "more anomalous".

  Equals the probability that a random defect image scores higher than a random
  good one, ties counting one half (the Mann-Whitney U statistic / (n_pos n_neg)).

  Args:
    scores: (n,) anomaly scores.
    labels: (n,) 0 for good, 1 for defect; both must occur.
  """
  scores, positive = _check_scores_labels(scores, labels)
  n_pos = int(positive.sum())
  n_neg = len(positive) - n_pos
  ranks = _midranks(scores)
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
  scores, positive = _check_scores_labels(scores, labels)
  order = np.argsort(-scores, kind="mergesort")
  s, p = scores[order], positive[order]
  last_of_run = np.r_[s[1:] != s[:-1], True]
  tp = np.cumsum(p)[last_of_run]
  fp = np.cumsum(~p)[last_of_run]
  tpr = np.r_[0.0, tp / p.sum()]
  fpr = np.r_[0.0, fp / (~p).sum()]
  return fpr, tpr


def mean_sem(values) -> tuple[float, float | None]:
  """Mean and standard error of the mean (std with ddof=1 / sqrt(n)).

  The SEM is None for fewer than two values, where it is undefined.
  """
  v = np.asarray(list(values), dtype=np.float64)
  if v.size == 0:
    raise ValueError("mean_sem needs at least one value.")
  mean = float(v.mean())
  if v.size < 2:
    return mean, None
  return mean, float(v.std(ddof=1) / math.sqrt(v.size))


# ---------------------------------------------------------------------------
# Chi-squared thresholds of the Mahalanobis distance
# ---------------------------------------------------------------------------


def sigma_threshold(n_sigma, k: int):
  """Mahalanobis distance at which a k-dim Gaussian has the n-sigma tail mass.

  ``sqrt(chi2.ppf(erf(n / sqrt 2), k))``, computed as
  ``sqrt(chi2.isf(erfc(n / sqrt 2), k))``, which is the same number but keeps
  its precision at large n, where erf rounds to 1.

  Args:
    n_sigma: scalar or array of positive sigma multiples.
    k: degrees of freedom (feature width), integer >= 1.

  Returns:
    float64 scalar or array shaped like ``n_sigma``.
  """
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f'k must be a positive integer, got {k!r}.')
  n = np.asarray(n_sigma, dtype=np.float64)
  if not np.isfinite(n).all() or (n <= 0).any():
    raise ValueError(f'n_sigma must be finite and positive, got {n_sigma!r}.')
  out = np.sqrt(_stats.chi2.isf(_special.erfc(n / math.sqrt(2.0)), int(k)))
  return float(out) if out.ndim == 0 else out


def tpr_fpr_at_sigmas(distances, labels, k: int, sigmas=range(1, 9)) -> SigmaRates:
  """True and false positive rates when flagging distances above n-sigma thresholds.

  A row counts as flagged when its (non-squared) Mahalanobis distance is
  strictly above :func:`sigma_threshold` (n, k).

  Args:
    distances: (n,) Mahalanobis distances, finite.
    labels: (n,) 0 = normal, 1 = anomalous (bool accepted).
    k: degrees of freedom (the feature width the Gaussian was fitted on).
    sigmas: the sigma multiples, default 1..8.

  Returns:
    :class:`SigmaRates` (tpr, fpr), float64 arrays of len(sigmas). TPR is NaN
    when there are no anomalous rows, FPR when there are no normal rows.
  """
  d = np.asarray(distances, dtype=np.float64)
  y = np.asarray(labels)
  if d.ndim != 1 or y.shape != d.shape:
    raise ValueError(
      f'distances and labels must be 1-D of equal length, got shapes {d.shape} and {y.shape}.'
    )
  if not np.isfinite(d).all():
    raise ValueError('distances contain NaN or inf.')
  if y.size and not np.isin(y, (0, 1)).all():
    raise ValueError(f'labels must be 0 or 1, got values {np.unique(y)[:5].tolist()}.')
  thresholds = np.atleast_1d(sigma_threshold(np.asarray(list(sigmas), dtype=np.float64), k))
  flagged = d[None, :] > thresholds[:, None]
  pos = y == 1
  neg = ~pos
  nan = np.full(thresholds.shape, np.nan)
  tpr = flagged[:, pos].mean(axis=1) if pos.any() else nan
  fpr = flagged[:, neg].mean(axis=1) if neg.any() else nan.copy()
  return SigmaRates(tpr=tpr, fpr=fpr)
