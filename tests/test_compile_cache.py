"""jax_gad.compile_cache: folder checks and the counts it reports (the cache: test_predict)."""

import os

import pytest

from jax_gad import compile_cache


def test_a_file_is_refused(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match=r"--compile_cache=.*/f is a file"):
    compile_cache.enable(tmp_path / "f")


def test_a_folder_that_cannot_be_created_is_refused(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match=r"--compile_cache=.*/f/sub cannot be created"):
    compile_cache.enable(tmp_path / "f" / "sub")


def test_a_folder_that_is_not_writable_is_refused(tmp_path, monkeypatch):
  # Tests run as root here, for whom every folder is writable: the check is what is tested.
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(ValueError, match=r"--compile_cache=.*/c is not writable"):
    compile_cache.enable(tmp_path / "c")


def test_stats_count_jax_cache_events_and_summarise():
  stats = compile_cache.Stats("/cache")
  for event in ["/jax/compilation_cache/compile_requests_use_cache"] * 3 + [
    "/jax/compilation_cache/cache_hits",
    "/jax/compilation_cache/cache_misses",
    "/jax/other",
  ]:
    stats(event)
  assert (stats.requests, stats.hits, stats.writes) == (3, 1, 1)
  assert stats.summary() == "compile cache /cache: 1 programs loaded, 2 compiled (1 stored)"
  off = compile_cache.Stats(None)
  off("/jax/compilation_cache/cache_hits")
  assert off.hits == 0 and "compile cache off" in off.summary()
