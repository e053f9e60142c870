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


def test_replace_dir_without_an_atomic_exchange_keeps_the_new_folder(tmp_path, monkeypatch):
  # Where renameat2(RENAME_EXCHANGE) is missing (not Linux), two renames do the swap.
  monkeypatch.setattr(files, "_exchange", lambda a, b: False)
  path, new = tmp_path / "work", tmp_path / "new"
  path.mkdir()
  (path / "old.txt").write_text("old")
  new.mkdir()
  (new / "results.json").write_text("new")
  files.replace_dir(new, path)
  assert sorted(os.listdir(path)) == ["results.json"]
  assert (path / "results.json").read_text() == "new"
  assert sorted(os.listdir(tmp_path)) == ["work"]  # the old content is gone, nothing left over


def test_outputs_that_are_inputs_are_refused(tmp_path):
  image = tmp_path / "a.png"
  image.write_bytes(b"x")
  data = tmp_path / "data"
  data.mkdir()
  (tmp_path / "alias.png").symlink_to(image)
  check = files.check_not_an_input
  with pytest.raises(ValueError, match=r"--output=.*alias.png is the input image .*a.png"):
    check("output", tmp_path / "alias.png", [("the input image", image)])
  with pytest.raises(ValueError, match=r"lies inside the data"):
    check("output", data / "sub" / "x.csv", [("the data", data)])
  with pytest.raises(ValueError, match=r"--workdir=.* holds --data_dir"):
    check("workdir", tmp_path, [], kept=[("--data_dir", data)])
  # Beside an input, or a kept folder that holds the output: fine.
  check("output", tmp_path / "scores.csv", [("the input image", image), ("the data", data)])
  check("workdir", data / "run", [], kept=[("--cache_dir", tmp_path)])
