"""The evaluation protocol: per-fold fits and scores, AUROC per run, mean ± SEM.

It receives pooled level features (one ``(n_images, width)`` array per level,
computed by :mod:`jax_gad.features`) and turns them into the numbers of the
paper's tables (docs/method.md):

0. :func:`folds` splits the sorted train/good list into the five folds.
1. :func:`evaluate_category` fits one density per (fold, level) on the
   fold's training features (after an optional PCA / NPCA), through
   ``densities.fit_levels``: the paper's Gaussian by default, or any model of
   :mod:`jax_gad.densities` (GMM, flow; :class:`DensitySpec`);
   it scores the test images with every requested distance (the density's
   scorers: L2 / SED / Mahalanobis for the Gaussian, ``nll`` for the others),
   averages the per-level scores into the "sum" score (the poster's "Sum" row
   is the *mean* over levels) and
   records one :class:`Run` per (fold, level or ``"sum"``, distance) with its
   AUROC, plus the chi-squared threshold rates.
2. :func:`summarize` aggregates runs into mean ± SEM over (category, fold):
   Table 1 (rows: levels and Sum; columns: distances) and a per-category table.

Formatting and writing the tables is :mod:`jax_gad.report`'s job.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence
import warnings

import jax
import numpy as np

from jax_gad import densities, gaussian, metrics, pca

SUM = "sum"


class DegenerateFeaturesWarning(UserWarning):
  """A level's training features have zero variance everywhere (see :class:`Degenerate`)."""


class Reduction(NamedTuple):
  """Optional PCA / NPCA before the Gaussian fit (docs/method.md, "PCA and NPCA").

  Attributes:
    mode: ``"pca"`` (keep the high-variance components) or ``"npca"`` (keep the
      low-variance ones).
    threshold: cumulative explained-variance threshold t in (0, 1).
  """

  mode: str
  threshold: float

  @property
  def name(self) -> str:
    return f"{self.mode}@{self.threshold:g}"


def reduction_from(pca: float | None, npca: float | None) -> Reduction | None:
  """The :class:`Reduction` that ``--pca`` / ``--npca`` ask for (at most one), or None."""
  if pca is not None and npca is not None:
    raise ValueError("--pca and --npca are mutually exclusive: request one reduction, not both.")
  for mode, t in (("pca", pca), ("npca", npca)):
    if t is not None:
      if not 0.0 < float(t) < 1.0:
        raise ValueError(f"--{mode} must be a cumulative variance threshold in (0, 1), got {t}.")
      return Reduction(mode, float(t))
  return None


class Run(NamedTuple):
  """One AUROC: a (category, fold, level, distance) cell of the experiment."""

  category: str
  fold: int
  level: int | str  # an int level index, or SUM
  distance: str
  auroc: float


class CategoryResult(NamedTuple):
  """Everything :func:`evaluate_category` computes for one category.

  Attributes:
    runs: one :class:`Run` per (fold, level or sum, distance).
    scores: ``scores[fold][distance]`` is the (n_test,) sum score; kept for ROC plots.
    labels: (n_test,) 0 = good, 1 = defect.
    thresholds: one :class:`ThresholdRow` per (fold, level, sigma) for the
      Mahalanobis distance (chi-squared thresholds, docs/method.md).
    degenerate: one :class:`Degenerate` per (fold, level) whose training
      features all have zero variance.
    fits: one :class:`Fit` per (fold, level) when the density describes its
      fits (``Density.describe``; the GMM and the flow do, the Gaussian does not).
  """

  runs: list
  scores: list
  labels: np.ndarray
  thresholds: list
  degenerate: list = []
  fits: list = []


class Fit(NamedTuple):
  """What the density fit of one (category, fold, level) chose or reached (``Density.describe``)."""

  category: str
  fold: int
  level: int
  info: dict


class Degenerate(NamedTuple):
  """A (category, fold, level) whose training features all have zero variance.

  Every test image is then at the same L2 / SED distance pattern a constant
  fit allows, the Mahalanobis distance ignores every dimension, and the AUROC
  is that of a constant score (50 %) or of raw offsets: not a measurement of
  the method. Reported in results.json under ``warnings``.
  """

  category: str
  fold: int
  level: int
  message: str


class ThresholdRow(NamedTuple):
  """TPR and FPR of the Mahalanobis distance at one chi-squared sigma threshold."""

  category: str
  fold: int
  level: int
  dim: int  # degrees of freedom: the width the Gaussian was fitted on
  sigma: int
  tpr: float
  fpr: float


def folds(n_train: int, n_splits: int = 5, seed: int = 0) -> list[np.ndarray]:
  """Index arrays of the fitting part of each fold (docs/method.md, "Folds").

  Exactly the train parts of ``KFold(n_splits, shuffle=True,
  random_state=seed).split`` over ``range(n_train)``, i.e. over the sorted
  train/good list.

  Returns:
    ``n_splits`` sorted int64 arrays.
  """
  for name, value, low in (("n_train", n_train, 1), ("n_splits", n_splits, 2)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  if n_splits > n_train:
    raise ValueError(
      f"n_splits={n_splits} folds need at least as many training images, got n_train={n_train}"
    )
  # scikit-learn only here: importing jax_gad (and the benchmark) stays free of it.
  from sklearn.model_selection import KFold  # the folds are scikit-learn's, by definition

  kfold = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
  return [np.sort(train).astype(np.int64) for train, _ in kfold.split(np.arange(n_train))]


# ---------------------------------------------------------------------------
# The protocol for one category.
# ---------------------------------------------------------------------------


class DensitySpec(NamedTuple):
  """The density fitted per (fold, level), its hyper-parameters and its PRNG seed.

  Attributes:
    name: a name in :data:`jax_gad.densities.DENSITIES`.
    config: its config; None for ``densities.get(name).config()``.
    seed: (fold, level) is fitted with the key ``fold_in(fold_in(key(seed), fold), level)``
      (``densities.fit_levels``' key per level, from one key per fold).
  """

  name: str = "gaussian"
  config: Any = None
  seed: int = 0


def _model_and_config(density: DensitySpec):
  model = densities.get(density.name)
  config = model.config() if density.config is None else density.config
  if not isinstance(config, model.config):
    raise ValueError(
      f"density_config must be a {model.config.__name__} for density {density.name!r}, got "
      f"{type(config).__name__}."
    )
  return model, config


def _degenerate(category: str, fold: int, level: int, x_train) -> list:
  """``[Degenerate]`` (and a warning) when every training feature is constant, else ``[]``."""
  if not gaussian.has_no_variance(x_train):
    return []
  note = Degenerate(
    category,
    fold,
    level,
    (
      f"{category}, fold {fold}, level {level}: every training feature has zero "
      "variance (constant images or only dead channels); its distances carry no "
      "information and its AUROC is not meaningful"
    ),
  )
  warnings.warn(note.message, DegenerateFeaturesWarning, stacklevel=3)
  return [note]


def _score_level(model, name: str, state, x_test, labels, distances, where):
  """({distance: (n_test,) scores}, [Run], [ThresholdRow]) of one fitted (fold, level).

  ``where`` is ``(category, fold, level, dim)``; ``dim`` is the width the state was fitted on.
  """
  category, fold, level, dim = where
  scores, runs, rows = {}, [], []
  for d in distances:
    s = np.asarray(model.scorers[d](state, x_test), dtype=np.float64)
    if not np.all(np.isfinite(s)):
      raise ValueError(
        f"the {name} {d} scores of {int(np.sum(~np.isfinite(s)))} test image(s) are not finite"
      )
    scores[d] = s
    runs.append(Run(category, fold, level, d, metrics.auroc(s, labels)))
    if d == "mahalanobis":
      tpr, fpr = metrics.tpr_fpr_at_sigmas(s, labels, dim, metrics.SIGMAS)
      for sigma, t, f in zip(metrics.SIGMAS, tpr, fpr):
        rows.append(ThresholdRow(category, fold, level, dim, sigma, float(t), float(f)))
  return scores, runs, rows


def evaluate_category(
  category: str,
  train_features: Sequence[np.ndarray],
  test_features: Sequence[np.ndarray],
  test_labels,
  fold_indices: Sequence[np.ndarray],
  *,
  levels: Sequence[int],
  distances: Sequence[str],
  reduction: Reduction | None = None,
  density: DensitySpec = DensitySpec(),
  progress=None,
) -> CategoryResult:
  """Fits the density per (fold, level) and scores the whole test split.

  Args:
    category: name used in the returned runs.
    train_features: per requested level, the pooled features of the
      category's full train/good list, (n_train, width_l).
    test_features: per requested level, (n_test, width_l).
    test_labels: (n_test,) 0 = good, 1 = defect.
    fold_indices: per fold, the indices into the train list it fits on.
    levels: the level index of each entry of ``train_features`` (used in the
      run records and the PRNG keys; the features are already selected).
    distances: names of the density's scorers (``densities.get(name).scorers``;
      for the Gaussian, :data:`jax_gad.gaussian.DISTANCES`).
    reduction: optional PCA / NPCA applied per (fold, level) before the fit.
    density: which density, its config and seed (:class:`DensitySpec`).
    progress: optional callable invoked once per finished (fold, level).

  Returns:
    A :class:`CategoryResult`.
  """
  model, config = _model_and_config(density)
  if len(train_features) != len(levels) or len(test_features) != len(levels):
    raise ValueError(
      f"expected one feature array per level ({len(levels)} levels), got "
      f"{len(train_features)} train and {len(test_features)} test arrays."
    )
  unknown = [d for d in distances if d not in model.scorers]
  if unknown:
    raise ValueError(
      f"unknown distance(s) {unknown} for density {density.name!r}; valid: {sorted(model.scorers)}."
    )
  labels = np.asarray(test_labels).astype(np.int64)
  levels = [int(level) for level in levels]
  runs, fold_scores, threshold_rows, degenerate, fits = [], [], [], [], []
  for fold, idx in enumerate(fold_indices):
    fitted = densities.fit_levels(
      model,
      config,
      [np.asarray(x)[np.asarray(idx)] for x in train_features],
      jax.random.fold_in(jax.random.key(density.seed), fold),
      levels,
      reduction=reduction,
      where=f"{category}, fold {fold}",
    )
    per_level = {d: [] for d in distances}
    for level, x_train, x_test, state, projection in zip(
      levels, fitted.xs, test_features, fitted.states, fitted.projections
    ):
      if model.describe is not None:
        fits.append(Fit(category, fold, level, model.describe(state)))
      degenerate += _degenerate(category, fold, level, x_train)
      try:
        x_test = np.asarray(x_test)
        if projection is not None:
          x_test = pca.project(projection, x_test)
        where = (category, fold, level, int(np.shape(x_train)[1]))
        scores, level_runs, rows = _score_level(
          model, density.name, state, x_test, labels, distances, where
        )
      except ValueError as err:  # say where: NaN features, say, come from one level
        raise ValueError(f"{category}, fold {fold}, level {level}: {err}") from err
      for d in distances:
        per_level[d].append(scores[d])
      runs += level_runs
      threshold_rows += rows
      if progress is not None:
        progress()
    sums = {d: np.mean(np.stack(per_level[d]), axis=0) for d in distances}
    runs += [Run(category, fold, SUM, d, metrics.auroc(sums[d], labels)) for d in distances]
    fold_scores.append(sums)
  return CategoryResult(runs, fold_scores, labels, threshold_rows, degenerate, fits)


# ---------------------------------------------------------------------------
# Aggregation into tables.
# ---------------------------------------------------------------------------


def _row_keys(levels: Sequence[int]) -> list:
  return [int(l) for l in levels] + [SUM]


def summarize(runs: Iterable[Run], levels: Sequence[int], distances: Sequence[str]):
  """Mean ± SEM (x100) over all (category, fold) runs per (level, distance).

  Returns:
    ``table1``: a list of rows ``{"level": 0..8 or "sum", "<distance>_mean": ..,
    "<distance>_sem": ..}``, and ``per_category``: rows ``{"category", "level",
    "<distance>_mean", "<distance>_sem"}`` (mean ± SEM over that category's folds).
  """
  runs = list(runs)
  table1, per_category = [], []
  categories = sorted({r.category for r in runs})
  for key in _row_keys(levels):
    row = {"level": key}
    for d in distances:
      mean, sem = metrics.mean_sem(
        100 * r.auroc for r in runs if r.level == key and r.distance == d
      )
      row[f"{d}_mean"], row[f"{d}_sem"] = mean, sem
    table1.append(row)
  for c in categories:
    for key in _row_keys(levels):
      row = {"category": c, "level": key}
      for d in distances:
        mean, sem = metrics.mean_sem(
          100 * r.auroc for r in runs if r.category == c and r.level == key and r.distance == d
        )
        row[f"{d}_mean"], row[f"{d}_sem"] = mean, sem
      per_category.append(row)
  return table1, per_category


def summarize_thresholds(rows: Iterable[ThresholdRow]) -> list[dict]:
  """Mean TPR / FPR over runs per (level, sigma) for the chi-squared thresholds."""
  rows = list(rows)
  out = []
  for level in sorted({r.level for r in rows}):
    for s in metrics.SIGMAS:
      sel = [r for r in rows if r.level == level and r.sigma == s]
      if not sel:
        continue
      out.append(
        {
          "level": level,
          "sigma": s,
          "dim": int(round(np.mean([r.dim for r in sel]))),
          "tpr": float(np.mean([r.tpr for r in sel])),
          "fpr": float(np.mean([r.fpr for r in sel])),
        }
      )
  return out
