"""Tests for jax_gad.report: the files a run writes and what they hold."""

import json
import os

import numpy as np
import pytest
import scipy.stats
from test_protocol import _toy_features

from jax_gad import protocol, report


def test_write_reports(tmp_path):
  train, test, labels = _toy_features(seed=3)
  folds = [np.arange(0, 32), np.arange(8, 40)]
  results = {
    c: protocol.evaluate_category(
      c, train, test, labels, folds, levels=[0, 1, 2], distances=["l2", "mahalanobis"]
    )
    for c in ("a", "b")
  }
  doc = report.report(
    config={"x": 1}, results=results, levels=[0, 1, 2], distances=["l2", "mahalanobis"]
  )
  report.write_reports(str(tmp_path), doc, results, ["l2", "mahalanobis"], plots=True)
  names = set(os.listdir(tmp_path))
  assert {
    "results.json",
    "table1.csv",
    "table1.md",
    "per_category.csv",
    "per_category.md",
    "thresholds.csv",
    "thresholds.md",
    "roc_a.png",
    "roc_b.png",
    "auroc_per_level.png",
  } <= names
  assert not [n for n in names if n.startswith(".tmp-")]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(doc))
  assert len(on_disk["runs"]) == 2 * 2 * 4 * 2
  sum_row = on_disk["table1"][-1]
  assert sum_row["level"] == "sum"
  sums = [
    100 * r["auroc"]
    for r in on_disk["runs"]
    if r["level"] == "sum" and r["distance"] == "mahalanobis"
  ]
  assert sum_row["mahalanobis_mean"] == pytest.approx(np.mean(sums))
  assert sum_row["mahalanobis_sem"] == pytest.approx(scipy.stats.sem(sums))
  md = (tmp_path / "table1.md").read_text()
  assert md.count("\n") == 2 + 4 and "| Sum |" in md
  assert (tmp_path / "roc_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Thresholds: rates in [0, 1], one row per (level, sigma).
  assert len(on_disk["thresholds"]) == 3 * 8
  assert all(0 <= r["tpr"] <= 1 and 0 <= r["fpr"] <= 1 for r in on_disk["thresholds"])
