"""The benchmark's optional predict section: throughput and single-image latency, reported."""

import jax

from jax_gad.benchmark import measure, report
from jax_gad.models import efficientnet


def test_bench_predict_tiny_and_reported():
  variables = efficientnet.init("efficientnet-b0", jax.random.key(0))
  row = measure.bench_predict(
    "efficientnet-b0",
    32,
    1,
    variables,
    n_images=5,
    side=48,
    num_workers=2,
    repeats=1,
    budget_s=5.0,
  )  # batch 1: one compilation serves throughput and latency (keeps the test short)
  assert row["n_images"] == 5 and row["batch_size"] == 1 and row["side"] == 48
  assert row["images_per_s"] > 0 and row["latency_s"] > 0
  text = report.format_report(_minimal_result(row))
  assert "Predict (efficientnet-b0 32px" in text and "img/s at batch 1" in text


def _minimal_result(row):
  """A benchmark result with only the predict section filled in."""
  return {
    "schema": "jax_gad.benchmark/1",
    "machine": measure.machine_info(),
    "config": {"arch": "efficientnet-b0"},
    "extraction": [],
    "torch": [],
    "torch_skipped": "n/a",
    "kernel": None,
    "kernel_skipped": "n/a",
    "sklearn_skipped": "n/a",
    "sweep_d": [],
    "sweep_n": [],
    "host_preprocess_s_per_image": None,
    "estimate": None,
    "peak_host_memory_mb_after": {},
    "peak_host_memory_mb": 0.0,
    "sweeps_other_cpu": None,
    "pipeline": None,
    "predict": row,
    "wall_s": 0.0,
  }


def test_bench_predict_maps_tiny_and_reported():
  variables = efficientnet.init("efficientnet-b0", jax.random.key(0))
  row = measure.bench_predict_maps(
    "efficientnet-b0", 32, 2, variables, n_images=4, side=48, num_workers=2
  )
  assert row["n_images"] == 4 and row["batch_size"] == 2 and row["map_levels"]
  assert row["images_per_s"] > 0 and row["maps_images_per_s"] > 0
  result = _minimal_result(None)
  result["predict_maps"] = row
  text = report.format_report(result)
  assert "Predict with `--maps_dir` (efficientnet-b0 32px" in text
  assert "img/s without maps (batch 2)" in text
