"""jax_gad.benchmark.calibration: the calibrated threshold's FPR, measured as documented."""

import numpy as np

from jax_gad import backbone as backbone_lib
from jax_gad.benchmark import calibration


def test_tiny_calibration_table(tmp_path):
  path = backbone_lib.ensure_checkpoint("efficientnet-lite0", str(tmp_path / "ckpt"))
  rows = calibration.measure(
    "efficientnet-lite0",
    checkpoint=path,
    tfds_dir=str(tmp_path / "tfds"),
    image_size=64,
    batch_size=8,
    targets=(0.1, 0.3),
    heldout_images=6,
    categories=("object",),
    n_train=10,
    n_test=6,
    size=64,
  )
  assert [r["target_fpr"] for r in rows] == [0.1, 0.3]
  for r in rows:
    # The construction: at most the target fraction of out-of-fold scores above the threshold.
    assert r["oof_fpr"] <= r["target_fpr"]
    assert r["n_train"] == 10 and r["n_heldout"] == 6 and r["n_test_good"] == 3
    for key in ("test_good_fpr", "heldout_fpr", "tpr", "sigma3_heldout_fpr", "sigma3_tpr"):
      assert 0.0 <= r[key] <= 1.0
  # A lower target never gives a lower threshold.
  assert rows[0]["threshold"] >= rows[1]["threshold"]
  text = calibration.table(rows)
  assert text.count("\n") == 1 + len(rows) and "| object | 0.10 |" in text
  assert np.isfinite([r["threshold"] for r in rows]).all()
