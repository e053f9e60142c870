"""The operating-point view: CSV rows, rates per defect type, the score histogram and its PNG."""

import io
import math

import numpy as np
from PIL import Image
import pytest

from jax_gad import operating_point as op
from jax_gad import report


def test_header_has_truth_columns_only_when_labelled():
  assert op.csv_header((3, 5), False) == [
    "path",
    "level_3",
    "level_5",
    "total",
    "decision",
    "threshold",
    "error",
  ]
  assert op.csv_header((3,), True) == [
    "path",
    "level_3",
    "total",
    "decision",
    "threshold",
    "label",
    "defect_type",
    "error",
  ]


def test_row_decision_is_strictly_above_the_threshold():
  at = op.csv_row("a.png", 2, 2.5, scores=([1.0, 4.0], 2.5))
  above = op.csv_row("b.png", 2, 2.5, scores=([1.0, 4.0], np.nextafter(2.5, 3.0)))
  assert at == ["a.png", "1.0", "4.0", "2.5", "normal", "2.5", ""]
  assert above[4] == "anomalous"
  assert float(above[3]) > 2.5 and float(above[5]) == 2.5


def test_error_row_keeps_threshold_and_truth():
  row = op.csv_row("c.png", 3, 7.25, error="c.png: cannot decode", truth=(1, "crack"))
  assert row == ["c.png", "", "", "", "", "error", "7.25", "1", "crack", "c.png: cannot decode"]


def test_rates_per_type_against_numpy():
  rng = np.random.default_rng(0)
  types = rng.choice(["good", "crack", "burr"], size=60)
  total = rng.normal(size=60) + (types != "good")
  total[[3, 17]] = np.nan  # unreadable images: not scored
  threshold = 0.4
  got = {r.defect_type: r for r in op.rates(total, threshold, types)}
  assert [r.defect_type for r in op.rates(total, threshold, types)] == ["good", "burr", "crack"]
  for t in ("good", "crack", "burr"):
    sel = (types == t) & ~np.isnan(total)
    assert got[t].scored == sel.sum()
    assert got[t].flagged == np.sum(total[sel] > threshold)
    assert got[t].rate == pytest.approx(np.mean(total[sel] > threshold))


def test_rates_count_a_score_equal_to_the_threshold_as_not_flagged():
  (r,) = op.rates([1.0, 2.0, 3.0], 2.0, ["good"] * 3)
  assert (r.scored, r.flagged) == (3, 1)
  (empty,) = op.rates([math.nan], 2.0, ["crack"])
  assert empty.scored == 0 and math.isnan(empty.rate)
  with pytest.raises(ValueError, match="2 defect types for 3 scores"):
    op.rates([1.0, 2.0, 3.0], 2.0, ["good", "crack"])


def test_rate_lines_name_fpr_for_good_and_tpr_for_defects():
  lines = op.rate_lines([op.Rate("good", 4, 1), op.Rate("crack", 3, 2)], 1.5)
  assert lines == [
    "at threshold 1.5000, per folder:",
    "  good   FPR 0.250  (1 of 4 flagged)",
    "  crack  TPR 0.667  (2 of 3 flagged)",
  ]


def test_histogram_bins_hold_every_finite_score_once():
  rng = np.random.default_rng(1)
  scores = rng.gamma(3.0, size=50)
  labels = (rng.random(50) < 0.4).astype(int)
  scores[0] = np.nan
  h = op.histogram(scores, 2.0, labels, bins=12)
  assert len(h.edges) == 13 and np.all(np.diff(h.edges) > 0)
  ok = np.isfinite(scores)
  for name, value in (("good", 0), ("defect", 1)):
    chosen = scores[ok & (labels == value)]
    assert h.counts[name].sum() == len(chosen)
    # Each score lies in the bin it is counted in (numpy's rule: the last bin is closed).
    idx = np.clip(np.searchsorted(h.edges, chosen, side="right") - 1, 0, 11)
    np.testing.assert_array_equal(np.bincount(idx, minlength=12), h.counts[name])
  assert h.edges[0] == np.nanmin(scores) and h.edges[-1] == np.nanmax(scores)


@pytest.mark.parametrize("threshold", [-5.0, 50.0])
def test_histogram_range_includes_a_threshold_outside_the_scores(threshold):
  h = op.histogram([1.0, 2.0, 3.0], threshold)
  assert list(h.counts) == ["scores"] and h.counts["scores"].sum() == 3
  assert h.edges[0] == min(1.0, threshold) and h.edges[-1] == max(3.0, threshold)


def test_histogram_of_equal_scores_and_of_nothing():
  h = op.histogram([2.0, 2.0], 2.0, bins=4)
  assert h.edges[0] == 1.5 and h.edges[-1] == 2.5 and h.counts["scores"].sum() == 2
  with pytest.raises(ValueError, match="no finite score"):
    op.histogram([math.nan], 1.0)


def test_histogram_path_replaces_the_extension():
  assert op.histogram_path("/x/scores.csv") == "/x/scores_histogram.png"
  assert op.histogram_path("det") == "det_histogram.png"


def _red_columns(png: bytes) -> np.ndarray:
  image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
  red = np.array([int(report.THRESHOLD_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
  close = np.abs(image - red).sum(axis=-1) < 40
  _, height = report.HISTOGRAM_SIZE
  axes_height = report.HISTOGRAM_AXES[3] * height
  return np.flatnonzero(close.sum(axis=0) > 0.8 * axes_height)


@pytest.mark.parametrize("threshold", [3.0, 7.5])
def test_png_has_its_size_and_the_threshold_line_where_the_threshold_is(threshold):
  rng = np.random.default_rng(2)
  scores = rng.uniform(1.0, 9.0, 40)
  h = op.histogram(scores, threshold, (np.arange(40) % 2))
  png = report.score_histogram_png(h, "test")
  image = Image.open(io.BytesIO(png))
  assert image.format == "PNG" and image.size == report.HISTOGRAM_SIZE
  width, _ = report.HISTOGRAM_SIZE
  left, _, axes_w, _ = report.HISTOGRAM_AXES
  expected = width * (left + axes_w * (threshold - h.edges[0]) / (h.edges[-1] - h.edges[0]))
  columns = _red_columns(png)
  assert columns.size and np.all(np.abs(columns - expected) <= 2.5), (columns, expected)
