"""The accuracy studies in experiments/, run as scripts on tiny inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_gad import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, *args):
  proc = subprocess.run(
    [sys.executable, os.path.join("experiments", name), *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=900,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_feature_difference_bf16_vs_f32_on_real_lite0_weights(tmp_path):
  out = tmp_path / "fd.json"
  stdout = _script(
    "feature_difference.py",
    "--arch=efficientnet-lite0",
    f"--checkpoint_dir={tmp_path}",
    "--n_train=6",
    "--n_test=4",
    "--batch_size=4",
    "--image_size=64",
    "--folds=2",
    "--categories=object",
    f"--json={out}",
  )
  result = json.loads(out.read_text())
  assert result["image_size"] == 64 and "lite0" in result["checkpoint"]
  assert set(result["categories"]) == {"object"}
  for cat in result["categories"].values():
    assert [r["level"] for r in cat["levels"]] == list(range(9))
    for r in cat["levels"]:
      # bfloat16 keeps 8 significand bits: differences are small but not zero.
      assert 0 < r["rel_diff"] < 0.2 and 0 < r["max_abs_diff_rel"] < 0.5
    for d in ("l2", "sed", "mahalanobis"):
      a = cat["auroc"][d]
      assert 0 <= a["float32"] <= 100 and 0 <= a["bfloat16"] <= 100
      assert a["difference"] == pytest.approx(a["bfloat16"] - a["float32"])
  level0 = result["categories"]["object"]["levels"][0]["rel_diff"]
  assert f"| 0 | {level0:.2e} |" in stdout
  mahalanobis = result["categories"]["object"]["auroc"]["mahalanobis"]
  assert f"| object | mahalanobis | {mahalanobis['float32']:.2f} |" in stdout


@pytest.mark.parametrize(
  "script, args, message",
  [
    (
      "feature_difference.py",
      ["--n_train=3"],
      "--folds must be >= 2 and <= --n_train, got 5 and 3",
    ),
    ("feature_difference.py", ["--folds=1"], "--folds must be >= 2 and <= --n_train, got 1 and 60"),
    ("feature_difference.py", ["--n_test=1"], "--n_test must be >= 2"),
    ("calibration_study.py", ["--target_fprs=0.1,1"], "--target_fprs must lie in (0, 1)"),
    ("calibration_study.py", ["--heldout_images=0"], "--heldout_images must be >= 1, got 0"),
  ],
)
def test_scripts_reject_bad_arguments_before_work(script, args, message):
  proc = subprocess.run(
    [sys.executable, os.path.join("experiments", script), *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_tiny_calibration_table(tmp_path):
  path = ckpt.ensure_checkpoint("efficientnet-lite0", str(tmp_path / "ckpt"))
  out = tmp_path / "rows.json"
  text = _script(
    "calibration_study.py",
    "--arch=efficientnet-lite0",
    f"--checkpoint={path}",
    f"--tfds_dir={tmp_path / 'tfds'}",
    "--image_size=64",
    "--batch_size=8",
    "--target_fprs=0.1,0.3",
    "--heldout_images=6",
    "--categories=object",
    "--n_train=10",
    "--n_test=6",
    "--size=64",
    f"--json={out}",
  )
  rows = json.loads(out.read_text())
  assert [r["target_fpr"] for r in rows] == [0.1, 0.3]
  for r in rows:
    # The construction: at most the target fraction of out-of-fold scores above the threshold.
    assert r["oof_fpr"] <= r["target_fpr"]
    assert r["n_train"] == 10 and r["n_heldout"] == 6 and r["n_test_good"] == 3
    for key in ("test_good_fpr", "heldout_fpr", "tpr", "sigma3_heldout_fpr", "sigma3_tpr"):
      assert 0.0 <= r[key] <= 1.0
  # A lower target never gives a lower threshold.
  assert rows[0]["threshold"] >= rows[1]["threshold"]
  table = text[text.index("| category |") :].strip()
  assert table.count("\n") == 1 + len(rows) and "| object | 0.10 |" in table
  assert np.isfinite([r["threshold"] for r in rows]).all()
