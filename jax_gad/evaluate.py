"""Evaluation: per-fold fits and scores, AUROC, mean ± SEM tables, thresholds, plots.

This module is the last stage of the pipeline. It receives pooled level features
(one ``(n_images, width)`` array per level, computed by :mod:`jax_gad.features`)
and turns them into the rows of the paper's tables:

1. :func:`evaluate_category` fits one density model per (fold, level) on the
   fold's training features, scores the test images with every requested
   distance, averages the per-level scores into the "sum" score (the poster's
   "Sum" row is the *mean* over levels, design.md §2) and yields one
   :class:`Run` per (fold, level or ``"sum"``, distance) with its AUROC.
2. :func:`summarize` aggregates runs into mean ± SEM over (category, fold):
   Table 1 (rows: levels and Sum; columns: distances) and a per-category table.
3. :func:`report` assembles the results.json document and :func:`write_reports` writes ``results.json``, ``table1.csv``, ``table1.md``,
   ``per_category.{csv,md}``, ``thresholds.{csv,md}`` and the ROC / level plots,
   every file atomically.

AUROC is computed here in numpy (Mann-Whitney U with mid-ranks for ties), not
borrowed from scikit-learn, so that the tests can check it against
scikit-learn as an independent reference.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from jax_gad import files, gaussian

SUM = "sum"
SIGMAS = tuple(range(1, 9))


class Reduction(NamedTuple):
  """Optional PCA / NPCA before the Gaussian fit (design.md §2).

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
    thresholds: rows ``(category, fold, level, dim, sigma, tpr, fpr)`` for the
      Mahalanobis distance (chi-squared thresholds, design.md §2).
  """
  runs: list
  scores: list
  labels: np.ndarray
  thresholds: list


# ---------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------


def _check_scores_labels(scores, labels):
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(
        f"scores and labels must be 1-D arrays of the same length, got shapes "
        f"{scores.shape} and {labels.shape}.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf; AUROC is undefined.")
  values = set(np.unique(labels).tolist())
  if not values <= {0, 1} or len(values) != 2:
    raise ValueError(
        f"labels must contain both 0 (good) and 1 (defect) and nothing else, "
        f"got the values {sorted(values)}.")
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
# The protocol for one category.
# ---------------------------------------------------------------------------


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
    progress=None,
) -> CategoryResult:
  """Fits a Gaussian per (fold, level) and scores the whole test split.

  Args:
    category: name used in the returned runs.
    train_features: per requested level, the pooled features of the
      category's full train/good list, (n_train, width_l).
    test_features: per requested level, (n_test, width_l).
    test_labels: (n_test,) 0 = good, 1 = defect.
    fold_indices: per fold, the indices into the train list it fits on.
    levels: the level index of each entry of ``train_features`` (used in the
      run records; the features are already selected).
    distances: names in :data:`jax_gad.gaussian.DISTANCES`.
    reduction: optional PCA / NPCA applied per (fold, level) before the fit.
    progress: optional callable invoked once per finished (fold, level).

  Returns:
    A :class:`CategoryResult`.
  """
  if len(train_features) != len(levels) or len(test_features) != len(levels):
    raise ValueError(
        f"expected one feature array per level ({len(levels)} levels), got "
        f"{len(train_features)} train and {len(test_features)} test arrays.")
  unknown = [d for d in distances if d not in gaussian.DISTANCES]
  if unknown:
    raise ValueError(f"unknown distance(s) {unknown}; valid: {sorted(gaussian.DISTANCES)}.")
  labels = np.asarray(test_labels).astype(np.int64)

  runs, fold_scores, threshold_rows = [], [], []
  for fold, idx in enumerate(fold_indices):
    per_level = {d: [] for d in distances}
    for level, x_train_all, x_test in zip(levels, train_features, test_features):
      try:
        x_train = np.asarray(x_train_all)[np.asarray(idx)]
        x_test = np.asarray(x_test)
        if reduction is not None:
          pca = gaussian.fit_pca(x_train)
          projection = gaussian.reduce(pca, reduction.mode, reduction.threshold)
          x_train = gaussian.project(projection, x_train)
          x_test = gaussian.project(projection, x_test)
        state = gaussian.fit_gaussian(x_train)
        for d in distances:
          scores = np.asarray(gaussian.DISTANCES[d](state, x_test), dtype=np.float64)
          per_level[d].append(scores)
          runs.append(Run(category, fold, int(level), d, auroc(scores, labels)))
          if d == "mahalanobis":
            dim = int(np.shape(x_train)[1])
            tpr, fpr = gaussian.tpr_fpr_at_sigmas(scores, labels, dim, SIGMAS)
            for s, t, f in zip(SIGMAS, np.asarray(tpr), np.asarray(fpr)):
              threshold_rows.append((category, fold, int(level), dim, s, float(t), float(f)))
      except ValueError as err:  # say where: NaN features, say, come from one level
        raise ValueError(f"{category}, fold {fold}, level {level}: {err}") from err
      if progress is not None:
        progress()
    sums = {}
    for d in distances:
      sums[d] = np.mean(np.stack(per_level[d]), axis=0)
      runs.append(Run(category, fold, SUM, d, auroc(sums[d], labels)))
    fold_scores.append(sums)
  return CategoryResult(runs, fold_scores, labels, threshold_rows)


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
      mean, sem = mean_sem(100 * r.auroc for r in runs if r.level == key and r.distance == d)
      row[f"{d}_mean"], row[f"{d}_sem"] = mean, sem
    table1.append(row)
  for c in categories:
    for key in _row_keys(levels):
      row = {"category": c, "level": key}
      for d in distances:
        mean, sem = mean_sem(100 * r.auroc for r in runs
                             if r.category == c and r.level == key and r.distance == d)
        row[f"{d}_mean"], row[f"{d}_sem"] = mean, sem
      per_category.append(row)
  return table1, per_category


def summarize_thresholds(rows: Iterable[tuple]) -> list[dict]:
  """Mean TPR / FPR over runs per (level, sigma) for the chi-squared thresholds."""
  rows = list(rows)
  out = []
  for level in sorted({r[2] for r in rows}):
    for s in SIGMAS:
      sel = [r for r in rows if r[2] == level and r[4] == s]
      if not sel:
        continue
      out.append({
          "level": level,
          "sigma": s,
          "dim": int(round(np.mean([r[3] for r in sel]))),
          "tpr": float(np.mean([r[5] for r in sel])),
          "fpr": float(np.mean([r[6] for r in sel])),
      })
  return out


def _fmt(mean, sem) -> str:
  return f"{mean:.1f} ± {sem:.1f}" if sem is not None else f"{mean:.1f}"


def _label(level) -> str:
  # The poster numbers levels 1..9; we index them 0..8 (design.md §2).
  return "Sum" if level == SUM else str(level)


def table1_markdown(table1: list[dict], distances: Sequence[str], title: str = "") -> str:
  """Table 1 as markdown: one row per level and Sum, one column per distance."""
  names = {"l2": "L2", "sed": "SED", "mahalanobis": "Mahalanobis"}
  head = "| Level | " + " | ".join(names.get(d, d) for d in distances) + " |"
  sep = "|---|" + "---|" * len(distances)
  lines = ([f"{title}", ""] if title else []) + [head, sep]
  for row in table1:
    cells = [_fmt(row[f"{d}_mean"], row[f"{d}_sem"]) for d in distances]
    lines.append(f"| {_label(row['level'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  if rows:
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
  return buf.getvalue()


def per_category_markdown(per_category: list[dict], distances: Sequence[str]) -> str:
  """Per-category AUROC of the Sum row (mean ± SEM over folds)."""
  lines = ["| Category | " + " | ".join(distances) + " |", "|---|" + "---|" * len(distances)]
  for row in per_category:
    if row["level"] != SUM:
      continue
    cells = [_fmt(row[f"{d}_mean"], row[f"{d}_sem"]) for d in distances]
    lines.append(f"| {row['category']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def thresholds_markdown(rows: list[dict]) -> str:
  lines = ["| Level | dim | sigma | TPR | FPR |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['level']} | {r['dim']} | {r['sigma']} | {r['tpr']:.3f} | {r['fpr']:.3f} |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Files: every write is atomic (jax_gad.files.atomic_write).
# ---------------------------------------------------------------------------


def _plot_roc(result_by_category: dict, distances: Sequence[str]) -> dict[str, bytes]:
  """One PNG per category: the Sum-score ROC curve of every fold and distance."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pngs = {}
  for category, res in sorted(result_by_category.items()):
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for j, d in enumerate(distances):
      mean = np.mean([auroc(sums[d], res.labels) for sums in res.scores])
      for fold, sums in enumerate(res.scores):
        fpr, tpr = roc_curve(sums[d], res.labels)
        ax.plot(fpr, tpr, color=f"C{j}", alpha=0.6, lw=1.2,
                label=f"{d} (mean AUROC {mean:.3f})" if fold == 0 else None)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate",
           title=f"{category}: ROC of the Sum score, all folds", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    pngs[f"roc_{category}.png"] = buf.getvalue()
  return pngs


def _plot_levels(table1: list[dict], distances: Sequence[str]) -> bytes:
  """AUROC mean ± SEM per level and distance (Table 1 as a picture)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  xs = np.arange(len(table1))
  for j, d in enumerate(distances):
    means = np.array([r[f"{d}_mean"] for r in table1])
    sems = np.array([r[f"{d}_sem"] or 0.0 for r in table1])
    ax.errorbar(xs + (j - (len(distances) - 1) / 2) * 0.12, means, yerr=sems,
                marker="o", ms=4, capsize=3, lw=1.2, label=d)
  ax.set_xticks(xs, [_label(r["level"]) for r in table1])
  ax.set(xlabel="level", ylabel="image AUROC (%)", title="AUROC per level, mean ± SEM")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  plt.close(fig)
  return buf.getvalue()


def report(*, config: dict, results: dict, levels: Sequence[int],
           distances: Sequence[str]) -> dict:
  """The results.json document of an experiment.

  Args:
    config: the experiment's settings, stored verbatim.
    results: category -> :class:`CategoryResult`.
    levels, distances: as evaluated.

  Returns:
    ``{"config", "runs", "table1", "per_category", "thresholds"}``; plain JSON types.
  """
  runs = [r for res in results.values() for r in res.runs]
  table1, per_category = summarize(runs, levels, distances)
  thresholds = summarize_thresholds(row for res in results.values() for row in res.thresholds)
  return {
      "config": config,
      "runs": [r._asdict() for r in runs],
      "table1": table1,
      "per_category": per_category,
      "thresholds": thresholds,
  }


def write_reports(workdir: str, doc: dict, results: dict, distances: Sequence[str],
                  plots: bool = True) -> None:
  """Writes results.json, the tables and (optionally) the plots into ``workdir``.

  Args:
    workdir: existing folder.
    doc: the document made by :func:`report`.
    results: category -> :class:`CategoryResult` (for the ROC plots).
    distances: as evaluated.
    plots: also write the PNG plots.
  """
  outputs = {
      "table1.csv": _csv(doc["table1"]),
      "table1.md": table1_markdown(doc["table1"], distances),
      "per_category.csv": _csv(doc["per_category"]),
      "per_category.md": per_category_markdown(doc["per_category"], distances),
      "thresholds.csv": _csv(doc["thresholds"]),
      "thresholds.md": thresholds_markdown(doc["thresholds"]),
  }
  if plots:
    outputs.update(_plot_roc(results, distances))
    outputs["auroc_per_level.png"] = _plot_levels(doc["table1"], distances)
  for name, data in outputs.items():
    files.atomic_write(os.path.join(workdir, name), data)
  # results.json last: its presence means the run finished.
  files.atomic_write(os.path.join(workdir, "results.json"),
               json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
