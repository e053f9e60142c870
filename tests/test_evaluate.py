"""Tests for jax_gad.evaluate against scikit-learn / scipy as independent references."""

import json
import os

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics

from jax_gad import evaluate
from references import independent_aurocs


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 60)
  labels[:2] = [0, 1]
  scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
  assert evaluate.auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores),
                                                         abs=1e-12)


def test_roc_curve_matches_sklearn():
  rng = np.random.default_rng(0)
  labels = np.r_[np.zeros(30, int), np.ones(20, int)]
  scores = np.round(rng.normal(size=50) + labels, 1)
  fpr, tpr = evaluate.roc_curve(scores, labels)
  ref_fpr, ref_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr)
  np.testing.assert_allclose(tpr, ref_tpr)
  assert np.trapezoid(tpr, fpr) == pytest.approx(evaluate.auroc(scores, labels))


def test_auroc_rejects_bad_input():
  with pytest.raises(ValueError, match="both 0"):
    evaluate.auroc([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match="NaN"):
    evaluate.auroc([np.nan, 0.2], [0, 1])
  with pytest.raises(ValueError, match="same length"):
    evaluate.auroc([0.1, 0.2, 0.3], [0, 1])


def test_mean_sem_matches_scipy():
  v = np.random.default_rng(1).normal(size=75)
  mean, sem = evaluate.mean_sem(v)
  assert mean == pytest.approx(v.mean())
  assert sem == pytest.approx(scipy.stats.sem(v, ddof=1))
  assert evaluate.mean_sem([3.0]) == (3.0, None)


def _toy_features(seed=0, n_train=40, n_test=30, widths=(6, 10, 5)):
  rng = np.random.default_rng(seed)
  labels = np.r_[np.zeros(n_test // 2, int), np.ones(n_test - n_test // 2, int)]
  train, test = [], []
  for w in widths:
    mix = rng.normal(size=(w, w))
    train.append((rng.normal(size=(n_train, w)) @ mix).astype(np.float32))
    shift = rng.normal(size=w) * 0.8
    test.append(((rng.normal(size=(n_test, w)) + np.outer(labels, shift)) @ mix).astype(np.float32))
  return train, test, labels


@pytest.mark.parametrize("reduction", [None, evaluate.Reduction("pca", 0.9),
                                       evaluate.Reduction("npca", 0.9)])
def test_evaluate_category_equals_independent_computation(reduction):
  train, test, labels = _toy_features()
  folds = [np.arange(0, 32), np.arange(8, 40)]
  res = evaluate.evaluate_category("toy", train, test, labels, folds, levels=[0, 1, 2],
                                   distances=["l2", "sed", "mahalanobis"], reduction=reduction)
  assert len(res.runs) == 2 * (3 + 1) * 3
  for fold, idx in enumerate(folds):
    ref = independent_aurocs(train, test, labels, idx, reduction)
    got = {(r.level, r.distance): r.auroc for r in res.runs if r.fold == fold}
    assert got.keys() == ref.keys()
    for k in ref:
      assert got[k] == pytest.approx(ref[k], abs=1e-6), k


def test_write_reports(tmp_path):
  train, test, labels = _toy_features(seed=3)
  folds = [np.arange(0, 32), np.arange(8, 40)]
  results = {c: evaluate.evaluate_category(c, train, test, labels, folds, levels=[0, 1, 2],
                                           distances=["l2", "mahalanobis"])
             for c in ("a", "b")}
  doc = evaluate.report(config={"x": 1}, results=results, levels=[0, 1, 2],
                        distances=["l2", "mahalanobis"])
  evaluate.write_reports(str(tmp_path), doc, results, ["l2", "mahalanobis"])
  names = set(os.listdir(tmp_path))
  assert {"results.json", "table1.csv", "table1.md", "per_category.csv", "per_category.md",
          "thresholds.csv", "thresholds.md", "roc_a.png", "roc_b.png",
          "auroc_per_level.png"} <= names
  assert not [n for n in names if n.startswith(".tmp-")]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(doc))
  assert len(on_disk["runs"]) == 2 * 2 * 4 * 2
  sum_row = on_disk["table1"][-1]
  assert sum_row["level"] == "sum"
  sums = [100 * r["auroc"] for r in on_disk["runs"]
          if r["level"] == "sum" and r["distance"] == "mahalanobis"]
  assert sum_row["mahalanobis_mean"] == pytest.approx(np.mean(sums))
  assert sum_row["mahalanobis_sem"] == pytest.approx(scipy.stats.sem(sums))
  md = (tmp_path / "table1.md").read_text()
  assert md.count("\n") == 2 + 4 and "| Sum |" in md
  assert (tmp_path / "roc_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Thresholds: rates in [0, 1], one row per (level, sigma).
  assert len(on_disk["thresholds"]) == 3 * 8
  assert all(0 <= r["tpr"] <= 1 and 0 <= r["fpr"] <= 1 for r in on_disk["thresholds"])


def test_errors_name_category_fold_and_level():
  train, test, labels = _toy_features()
  train[1][5, 2] = np.nan
  with pytest.raises(ValueError, match="toy, fold 0, level 1: .*NaN"):
    evaluate.evaluate_category("toy", train, test, labels, [np.arange(0, 32)], levels=[0, 1, 2],
                               distances=["mahalanobis"])
