"""The operating point of a detector on scored images: CSV rows, rates per defect type, histogram.

``jax_gad.predict`` writes one CSV row per image (:func:`csv_header`,
:func:`csv_row`): ``path``, ``level_<l>`` per level, ``total``, ``decision``
(``anomalous`` when ``total`` is strictly above the threshold, else
``normal``; ``error`` for an unreadable image), ``threshold`` (the one the
decision used), then, where the input folder gives labels (sub-folders
``good`` and defect types), ``label`` (0 good, 1 defect) and ``defect_type``
(the sub-folder's name), and ``error`` last. :func:`rates` gives the share of
images flagged per defect type (the TPR; for ``good`` the FPR) and
:func:`histogram` the bins of the score histogram that ``fit`` and ``predict``
draw (:func:`jax_gad.report.score_histogram_png`). All host-side numpy.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np

from jax_gad import files

GOOD = "good"


def csv_header(levels: Sequence[int], labelled: bool) -> list[str]:
  """The CSV's columns; ``label`` and ``defect_type`` only when the input gives labels."""
  truth = ["label", "defect_type"] if labelled else []
  return (
    ["path"]
    + [f"level_{l}" for l in levels]
    + ["total", "decision", "threshold"]
    + truth
    + ["error"]
  )


def csv_row(path, n_levels: int, threshold: float, scores=None, error: str = "", truth=()) -> list:
  """One image's CSV row.

  Args:
    path: the image's path.
    n_levels: number of ``level_<l>`` columns.
    threshold: the decision threshold of the total score.
    scores: ``(per_level, total)``, or None for an image that could not be read.
    error: the reason it could not be read ('' when scored).
    truth: ``()``, or ``(label, defect_type)`` when the input gives labels.
  """
  if scores is None:
    cells = [""] * n_levels + ["", "error"]
  else:
    per_level, total = scores
    decision = "anomalous" if total > threshold else "normal"
    cells = [repr(float(v)) for v in per_level] + [repr(float(total)), decision]
  return [path] + cells + [repr(float(threshold))] + [str(t) for t in truth] + [error]


class Rate(NamedTuple):
  """Images of one defect type scored, and how many of them were flagged anomalous."""

  defect_type: str
  scored: int
  flagged: int

  @property
  def rate(self) -> float:
    """flagged / scored (NaN when none was scored): the TPR, or for ``good`` the FPR."""
    return self.flagged / self.scored if self.scored else float("nan")


def rates(total, threshold: float, defect_types: Sequence[str]) -> list[Rate]:
  """Per defect type (``good`` first, then by name): images scored and flagged at ``threshold``.

  An image is scored when its total is finite (an unreadable image has NaN)
  and flagged when its total is strictly above the threshold.
  """
  total = np.asarray(total, np.float64)
  types = np.asarray(defect_types, dtype=object)
  if types.shape != total.shape:
    raise ValueError(f"{len(types)} defect types for {len(total)} scores")
  ok = np.isfinite(total)
  names = sorted(set(types.tolist()), key=lambda t: (t != GOOD, t))
  out = []
  for name in names:
    chosen = ok & (types == name)
    out.append(Rate(name, int(chosen.sum()), int((total[chosen] > threshold).sum())))
  return out


def rate_lines(found: Sequence[Rate], threshold: float) -> list[str]:
  """The summary's lines: FPR of ``good`` and TPR of each defect type at the threshold."""
  width = max(len(r.defect_type) for r in found)
  lines = [f"at threshold {threshold:.4f}, per folder:"]
  for r in found:
    what = "FPR" if r.defect_type == GOOD else "TPR"
    lines.append(
      f"  {r.defect_type:<{width}}  {what} {r.rate:.3f}  ({r.flagged} of {r.scored} flagged)"
    )
  return lines


class Histogram(NamedTuple):
  """Bins of a score histogram: ``edges`` (bins + 1,), ``counts`` name -> (bins,), threshold."""

  edges: np.ndarray
  counts: dict
  threshold: float


def histogram(scores, threshold: float, labels=None, bins: int = 40) -> Histogram:
  """Equal-width bins over the finite scores and the threshold (the line is always inside).

  Args:
    scores: (n,) scores; non-finite ones (unreadable images) are left out.
    threshold: the decision threshold, drawn as a line.
    labels: None (one series, ``scores``), or (n,) 0 / 1: series ``good`` and ``defect``.
    bins: number of bins.
  """
  scores = np.asarray(scores, np.float64)
  ok = np.isfinite(scores)
  if not ok.any():
    raise ValueError("no finite score to draw a histogram of")
  low = min(float(scores[ok].min()), threshold)
  high = max(float(scores[ok].max()), threshold)
  if high == low:
    low, high = low - 0.5, high + 0.5
  edges = np.linspace(low, high, bins + 1)
  if labels is None:
    groups = {"scores": ok}
  else:
    labels = np.asarray(labels)
    groups = {GOOD: ok & (labels == 0), "defect": ok & (labels == 1)}
  counts = {name: np.histogram(scores[chosen], edges)[0] for name, chosen in groups.items()}
  return Histogram(edges, counts, float(threshold))


def histogram_path(output) -> str:
  """Where ``fit`` / ``predict`` write the histogram: ``<output minus extension>_histogram.png``."""
  return os.path.splitext(os.fspath(output))[0] + "_histogram.png"


def check_histogram_path(output, inputs) -> None:
  """Refuses a histogram (:func:`histogram_path` of ``output``) that would overwrite an input.

  ``inputs`` as in :func:`jax_gad.files.check_not_an_input`. Raises ValueError:
  one line naming the histogram, the input, ``--output`` and ``--noplots``.
  """
  path = histogram_path(output)
  try:
    files.check_not_an_input("output", path, inputs)
  except ValueError as err:
    raise ValueError(f"{err} (the histogram of --output={output}; --noplots skips it)") from None
