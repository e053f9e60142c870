"""Tests for jax_gad.files.atomic_write."""

import os
import stat

import numpy as np
import pytest

from jax_gad import files


def test_writes_bytes_str_and_callables(tmp_path):
  files.atomic_write(tmp_path / "a.bin", b"\x00\x01")
  files.atomic_write(tmp_path / "b.txt", "ü")
  files.atomic_write(tmp_path / "c.npz", lambda f: np.savez(f, x=np.arange(3)))
  assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
  assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "ü"
  with np.load(tmp_path / "c.npz") as z:
    np.testing.assert_array_equal(z["x"], np.arange(3))
  mode = stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode)
  assert mode & 0o044, "readable by group/others as with a plain open(), not mkstemp's 0600"


@pytest.mark.parametrize("where", ["replace", "writer"])
def test_failure_leaves_old_file_and_no_temporary(tmp_path, monkeypatch, where):
  target = tmp_path / "f.txt"
  files.atomic_write(target, "old")

  def boom(*args, **kwargs):
    raise OSError("disk full")

  if where == "replace":
    monkeypatch.setattr(os, "replace", boom)
    data = "new"
  else:
    data = boom
  with pytest.raises(OSError, match="disk full"):
    files.atomic_write(target, data)
  assert target.read_text() == "old"
  assert os.listdir(tmp_path) == ["f.txt"]
