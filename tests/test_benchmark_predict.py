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


def test_predict_calls_time_fresh_processes_and_the_warm_one_loads(tmp_path):
  from jax_gad import backbone as backbone_lib
  from jax_gad.benchmark import predict_calls

  backbone_lib.ensure_checkpoint("efficientnet-lite0", str(tmp_path))
  row = predict_calls.measure_predict_calls(
    "efficientnet-lite0", str(tmp_path), n_images=4, repeats=1, image_size=64, levels=(8,)
  )  # small: what is tested is the procedure, not the times
  for name in ("one", "many"):
    r = row[name]
    assert len(r["first_all"]) == len(r["second_all"]) == 1
    assert r["first_s"] == r["first_all"][0] > 0 and r["second_s"] > 0
    assert r["second_loaded"] >= 1  # at least the extractor came from the cache
  text = predict_calls.format_predict_calls({"predict_calls": row})
  assert predict_calls.format_predict_calls({"predict_calls": None}) is None
  assert f"1 image {row['one']['first_s']:.1f} s first call" in text
  assert row["image_size"] == 64 and len(row["one"]["second_cpu"]) == 1
  assert f"4 images {row['many']['first_s']:.1f} s first" in text
  assert f"{row['one']['second_loaded']} programs loaded" in text
