"""Reports: the results.json document, markdown / CSV tables and plots, written atomically.

:func:`report` assembles the results.json document from the protocol's
results; :func:`write_reports` writes ``results.json``, ``table1.{csv,md}``,
``per_category.{csv,md}``, ``thresholds.{csv,md}`` and the ROC / per-level
plots into a folder, every file atomically, ``results.json`` last.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

import numpy as np

from jax_gad import files, metrics
from jax_gad.protocol import SUM, summarize, summarize_thresholds


def fmt_cell(mean, sem) -> str:
  """``mean ± sem`` with one decimal; the mean alone when there is no SEM (one run)."""
  return f"{mean:.1f} ± {sem:.1f}" if sem is not None else f"{mean:.1f}"


def _label(level) -> str:
  # The poster numbers levels 1..9; we index them 0..8 (docs/method.md, "Levels").
  return "Sum" if level == SUM else str(level)


def table1_markdown(table1: list[dict], distances: Sequence[str], title: str = "") -> str:
  """Table 1 as markdown: one row per level and Sum, one column per distance."""
  names = {"l2": "L2", "sed": "SED", "mahalanobis": "Mahalanobis"}
  head = "| Level | " + " | ".join(names.get(d, d) for d in distances) + " |"
  sep = "|---|" + "---|" * len(distances)
  lines = ([f"{title}", ""] if title else []) + [head, sep]
  for row in table1:
    cells = [fmt_cell(row[f"{d}_mean"], row[f"{d}_sem"]) for d in distances]
    lines.append(f"| {_label(row['level'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
  """Rows of equal keys as CSV text; None becomes an empty cell."""
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
    cells = [fmt_cell(row[f"{d}_mean"], row[f"{d}_sem"]) for d in distances]
    lines.append(f"| {row['category']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def thresholds_markdown(rows: list[dict]) -> str:
  lines = ["| Level | dim | sigma | TPR | FPR |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['level']} | {r['dim']} | {r['sigma']} | {r['tpr']:.3f} | {r['fpr']:.3f} |")
  return "\n".join(lines) + "\n"


def _plot_roc(result_by_category: dict, distances: Sequence[str]) -> dict[str, bytes]:
  """One PNG per category: the Sum-score ROC curve of every fold and distance."""
  import matplotlib  # only plotting needs it: a slow import that --noplots never pays

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use('Agg'): no display needed

  pngs = {}
  for category, res in sorted(result_by_category.items()):
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for j, d in enumerate(distances):
      mean = np.mean([metrics.auroc(sums[d], res.labels) for sums in res.scores])
      for fold, sums in enumerate(res.scores):
        fpr, tpr = metrics.roc_curve(sums[d], res.labels)
        ax.plot(
          fpr,
          tpr,
          color=f"C{j}",
          alpha=0.6,
          lw=1.2,
          label=f"{d} (mean AUROC {mean:.3f})" if fold == 0 else None,
        )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(
      xlabel="false-positive rate",
      ylabel="true-positive rate",
      title=f"{category}: ROC of the Sum score, all folds",
      xlim=(0, 1),
      ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    pngs[f"roc_{category}.png"] = buf.getvalue()
  return pngs


def _plot_levels(table1: list[dict], distances: Sequence[str]) -> bytes:
  """AUROC mean ± SEM per level and distance (Table 1 as a picture)."""
  import matplotlib  # only plotting needs it: a slow import that --noplots never pays

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use('Agg'): no display needed

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  xs = np.arange(len(table1))
  for j, d in enumerate(distances):
    means = np.array([r[f"{d}_mean"] for r in table1])
    sems = np.array([r[f"{d}_sem"] or 0.0 for r in table1])
    ax.errorbar(
      xs + (j - (len(distances) - 1) / 2) * 0.12,
      means,
      yerr=sems,
      marker="o",
      ms=4,
      capsize=3,
      lw=1.2,
      label=d,
    )
  ax.set_xticks(xs, [_label(r["level"]) for r in table1])
  ax.set(xlabel="level", ylabel="image AUROC (%)", title="AUROC per level, mean ± SEM")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  plt.close(fig)
  return buf.getvalue()


# The score histogram's figure: size in pixels (at HISTOGRAM_DPI) and the axes' box in figure
# fractions (left, bottom, width, height), fixed so that a score maps to a known pixel column.
HISTOGRAM_SIZE = (640, 400)
HISTOGRAM_DPI = 100
HISTOGRAM_AXES = (0.1, 0.13, 0.86, 0.77)
HISTOGRAM_COLORS = {"good": "#1f77b4", "defect": "#ff7f0e", "scores": "#7f7f7f"}
THRESHOLD_COLOR = "#d62728"


def score_histogram_png(hist, title: str, names: dict | None = None) -> bytes:
  """The score histogram as a PNG: one filled series per group, the threshold a vertical line.

  Args:
    hist: a :class:`jax_gad.operating_point.Histogram` (``edges``, ``counts``, ``threshold``).
    title: the figure's title.
    names: legend names of the series (default: their keys, with their counts).

  The x axis spans exactly ``hist.edges[0] .. hist.edges[-1]`` inside the axes
  box :data:`HISTOGRAM_AXES`; the threshold is drawn in :data:`THRESHOLD_COLOR`.
  """
  import matplotlib  # only plotting needs it: a slow import that --noplots never pays

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use('Agg'): no display needed

  w, h = HISTOGRAM_SIZE
  fig = plt.figure(figsize=(w / HISTOGRAM_DPI, h / HISTOGRAM_DPI), dpi=HISTOGRAM_DPI)
  ax = fig.add_axes(HISTOGRAM_AXES)
  for name, counts in hist.counts.items():
    label = (names or {}).get(name, name)
    ax.stairs(
      counts,
      hist.edges,
      fill=True,
      alpha=0.5,
      color=HISTOGRAM_COLORS.get(name),
      label=f"{label} ({int(np.sum(counts))})",
    )
  ax.axvline(hist.threshold, color=THRESHOLD_COLOR, lw=2, label=f"threshold {hist.threshold:.4g}")
  ax.set_xlim(hist.edges[0], hist.edges[-1])
  ax.set(xlabel="total score", ylabel="images", title=title)
  ax.legend(fontsize=8)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=HISTOGRAM_DPI, metadata={"Software": None})
  plt.close(fig)
  return buf.getvalue()


def report(
  *,
  config: dict,
  results: dict,
  levels: Sequence[int],
  distances: Sequence[str],
  data: dict | None = None,
  versions: dict | None = None,
) -> dict:
  """The results.json document of an experiment.

  Args:
    config: the experiment's settings, stored verbatim.
    results: category -> :class:`CategoryResult`.
    levels, distances: as evaluated.
    data: optional, per category: what was evaluated (image counts, data
      fingerprint), stored verbatim.
    versions: optional package versions, stored verbatim.

  Returns:
    ``{"config", "data", "versions", "runs", "table1", "per_category",
    "thresholds", "warnings"}``, plus ``"fits"`` when the density describes
    its fits (one ``{"category", "fold", "level", "info"}`` per fit, e.g. the
    GMM's chosen number of components); plain JSON types. ``warnings`` lists
    the (category, fold, level) fits whose features were degenerate.
  """
  runs = [r for res in results.values() for r in res.runs]
  table1, per_category = summarize(runs, levels, distances)
  thresholds = summarize_thresholds(row for res in results.values() for row in res.thresholds)
  doc = {
    "config": config,
    "data": data or {},
    "versions": versions or {},
    "runs": [r._asdict() for r in runs],
    "table1": table1,
    "per_category": per_category,
    "thresholds": thresholds,
    "warnings": [d._asdict() for res in results.values() for d in res.degenerate],
  }
  fits = [f._asdict() for res in results.values() for f in res.fits]
  if fits:
    doc["fits"] = fits
  return doc


def write_reports(
  workdir: str, doc: dict, results: dict, distances: Sequence[str], *, plots: bool
) -> None:
  """Writes results.json, the tables and (optionally) the plots into ``workdir``.

  Args:
    workdir: existing folder.
    doc: the document made by :func:`report`.
    results: category -> :class:`CategoryResult` (for the ROC plots).
    distances: as evaluated.
    plots: also write the PNG plots.
  """
  outputs = {
    "table1.csv": csv_text(doc["table1"]),
    "table1.md": table1_markdown(doc["table1"], distances),
    "per_category.csv": csv_text(doc["per_category"]),
    "per_category.md": per_category_markdown(doc["per_category"], distances),
    "thresholds.csv": csv_text(doc["thresholds"]),
    "thresholds.md": thresholds_markdown(doc["thresholds"]),
  }
  if plots:
    outputs.update(_plot_roc(results, distances))
    outputs["auroc_per_level.png"] = _plot_levels(doc["table1"], distances)
  for name, data in outputs.items():
    files.atomic_write(os.path.join(workdir, name), data)
  # results.json last: its presence means the run finished.
  files.atomic_write(
    os.path.join(workdir, "results.json"),
    json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n",
  )
