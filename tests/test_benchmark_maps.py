"""The anomaly-map section of the benchmark (jax_gad.benchmark.maps), on tiny inputs."""

import pytest

from jax_gad.benchmark import maps as bench_maps
from jax_gad.benchmark import report, run


def test_speed_section_agrees_with_sklearn_and_formats(monkeypatch):
  monkeypatch.setitem(bench_maps.SHAPES, "tiny", [(3, 2, 5), (2, 2, 7)])
  speed = bench_maps.speed("tiny", n_train=20, n_test=4)
  # The numpy + scikit-learn reference and jax_gad.maps score the same maps alike.
  assert speed["max_relative_difference"] < 1e-4
  mem = bench_maps.fit_stream("tiny", 5)
  assert mem["n_images"] == 5 and mem["peak_rss_mb"] > 0
  section = {"memory": [mem], "speed": [speed]}
  text = bench_maps.format_report(section)
  assert "tiny" in text and "peak RSS" in text
  # The benchmark report carries the section when it ran, and nothing when it did not.
  assert report.format_maps({"maps": section}) == text.rstrip("\n")
  assert report.format_maps({"maps": None}) is None


def test_section_is_off_by_default_and_checks_archs():
  assert run.Config().map_fit is False
  with pytest.raises(ValueError, match="unknown"):
    bench_maps.run_section(archs=("efficientnet-b9",))
