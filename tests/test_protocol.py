"""Tests for jax_gad.protocol against an independent numpy + scikit-learn computation."""

import numpy as np
import pytest
from references import independent_aurocs
from sklearn.model_selection import KFold

from jax_gad import protocol


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


@pytest.mark.parametrize(
  "reduction", [None, protocol.Reduction("pca", 0.9), protocol.Reduction("npca", 0.9)]
)
def test_evaluate_category_equals_independent_computation(reduction):
  train, test, labels = _toy_features()
  folds = [np.arange(0, 32), np.arange(8, 40)]
  res = protocol.evaluate_category(
    "toy",
    train,
    test,
    labels,
    folds,
    levels=[0, 1, 2],
    distances=["l2", "sed", "mahalanobis"],
    reduction=reduction,
  )
  assert len(res.runs) == 2 * (3 + 1) * 3
  for fold, idx in enumerate(folds):
    ref = independent_aurocs(train, test, labels, idx, reduction)
    got = {(r.level, r.distance): r.auroc for r in res.runs if r.fold == fold}
    assert got.keys() == ref.keys()
    for k in ref:
      assert got[k] == pytest.approx(ref[k], abs=1e-6), k


def test_errors_name_category_fold_and_level():
  train, test, labels = _toy_features()
  train[1][5, 2] = np.nan
  with pytest.raises(ValueError, match="toy, fold 0, level 1: .*NaN"):
    protocol.evaluate_category(
      "toy", train, test, labels, [np.arange(0, 32)], levels=[0, 1, 2], distances=["mahalanobis"]
    )


def test_other_densities_score_nll_with_keys_per_fold_and_level():
  from sklearn.metrics import roc_auc_score

  from jax_gad.densities import flow, gmm

  train, test, labels = _toy_features()
  folds = [np.arange(0, 32), np.arange(8, 40)]
  config = gmm.GMMConfig(n_components=(1, 2), max_iter=20)
  run = lambda levels, seed: protocol.evaluate_category(
    "toy",
    [train[i] for i in levels],
    [test[i] for i in levels],
    labels,
    folds,
    levels=levels,
    distances=["nll"],
    density=protocol.DensitySpec("gmm", config, seed),
  )
  res = run([0, 1, 2], 0)
  assert len(res.runs) == 2 * (3 + 1) and {r.distance for r in res.runs} == {"nll"}
  assert res.thresholds == []
  # The per-level AUROC of the sum score agrees with scikit-learn's.
  for fold in range(2):
    (auc,) = [r.auroc for r in res.runs if r.fold == fold and r.level == protocol.SUM]
    assert auc == pytest.approx(roc_auc_score(labels, res.scores[fold]["nll"]), abs=1e-12)
  # (fold, level) keys do not depend on the other levels selected; reruns are identical.
  alone = run([2], 0)
  assert [r.auroc for r in alone.runs if r.level == 2] == [
    r.auroc for r in res.runs if r.level == 2
  ]
  again = run([0, 1, 2], 0)
  assert again.runs == res.runs
  with pytest.raises(ValueError, match="unknown distance.*'mahalanobis'.*'gmm'"):
    protocol.evaluate_category(
      "toy",
      train,
      test,
      labels,
      folds,
      levels=[0, 1, 2],
      distances=["mahalanobis"],
      density=protocol.DensitySpec("gmm"),
    )
  with pytest.raises(ValueError, match="must be a FlowConfig"):
    protocol.evaluate_category(
      "toy",
      train,
      test,
      labels,
      folds,
      levels=[0, 1, 2],
      distances=["nll"],
      density=protocol.DensitySpec("flow", config),
    )
  bad = flow.FlowConfig(epochs=2, learning_rate=1e30, hidden=8, n_layers=2, vmap_levels=True)
  with pytest.raises(ValueError, match=r"toy, fold 0: flow .* at epoch 1 of level \d"):
    protocol.evaluate_category(
      "toy",
      train,
      test,
      labels,
      folds,
      levels=[0, 1, 2],
      distances=["nll"],
      density=protocol.DensitySpec("flow", bad),
    )


# --- folds -------------------------------------------------------------------


@pytest.mark.parametrize("n_train", [5, 7, 60, 209, 391])
def test_folds_equal_sklearn_kfold(n_train):
  names = sorted(f"{i:03d}.png" for i in range(n_train))
  ref = KFold(n_splits=5, shuffle=True, random_state=0)
  ours = protocol.folds(n_train)
  assert len(ours) == 5
  for fold, (train, test) in zip(ours, ref.split(names)):
    assert fold.dtype == np.int64
    assert np.array_equal(fold, np.sort(fold))
    assert set(fold.tolist()) == set(train.tolist())
    assert not set(fold.tolist()) & set(test.tolist())


def test_folds_other_settings_and_errors():
  ref = KFold(n_splits=3, shuffle=True, random_state=4).split(np.arange(10))
  for fold, (train, _) in zip(protocol.folds(10, n_splits=3, seed=4), ref):
    assert np.array_equal(fold, np.sort(train))
  with pytest.raises(ValueError, match="n_train"):
    protocol.folds(0)
  with pytest.raises(ValueError, match="at least"):
    protocol.folds(4, n_splits=5)
  with pytest.raises(ValueError, match="n_splits"):
    protocol.folds(10, n_splits=1)
