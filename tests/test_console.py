"""What a newcomer sees: the demo's console holds jax_gad's lines and the table, no noise."""

import logging
import os
import re
import subprocess
import sys

from fakes import write_mvtec
import pytest

from jax_gad import console, data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines the libraries below jax_gad print on a first run, none of which a user needs.
NOISE = {
  "JAX's probe of an absent TPU": "Unable to initialize backend",
  "TFDS checking a folder it has not built yet": "has no dataset_info.json",
  "TFDS's download banner, for data generated locally": "Downloading and preparing",
  "TFDS's closing banner": "downloaded and prepared",
  "TFDS's build bars, naming its temporary files": "Shuffling",
  "TFDS's split bars": "Generating splits",
  "TFDS's build steps": "Done writing",
  "matplotlib building its font cache": "fontManager",
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  """The demo command on a small configuration, everything built afresh as on a fresh clone."""
  tmp = tmp_path_factory.mktemp("demo")
  # An empty matplotlib config folder, so that matplotlib builds its font cache in this run.
  env = dict(os.environ, MPLCONFIGDIR=str(tmp / "mpl"))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.main",
      "--flagfile=experiments/demo.cfg",
      "--categories=texture",
      "--folds=0",
      "--levels=7,8",
      "--image_size=64",
      f"--tfds_dir={tmp / 'tfds'}",
      f"--cache_dir={tmp / 'cache'}",
      f"--checkpoint_dir={tmp / 'checkpoints'}",
      f"--workdir={tmp / 'run'}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout + proc.stderr


@pytest.mark.parametrize("what", sorted(NOISE))
def test_demo_console_has_no_library_noise(first_run, what):
  assert NOISE[what] not in first_run, f"{what}:\n{first_run[-3000:]}"


def test_demo_console_shows_the_table_and_jax_gads_own_lines(first_run):
  assert "| Sum | " in first_run and "Sum row per category:" in first_run
  assert re.search(r"preparing synthetic_ad/texture in .+ \(first use only\)", first_run)
  assert "compiled LevelExtractor" in first_run
  assert "texture/train: 100%" in first_run


def test_quiet_third_party_logs_keeps_warnings_and_jax_gads_info(caplog):
  names = ("jax._src.xla_bridge", "absl", "matplotlib.font_manager")
  before = {n: logging.getLogger(n).level for n in console.THIRD_PARTY_LOGGERS}
  try:
    console.quiet_third_party_logs()
    with caplog.at_level(logging.INFO):
      for name in names:
        logging.getLogger(name).info("library info %s", name)
        logging.getLogger(name).warning("library warning %s", name)
      logging.getLogger("jax_gad.features").info("own info")
      logging.getLogger("jax_gad.data.loader").warning("own warning")
  finally:
    for n, level in before.items():
      logging.getLogger(n).setLevel(level)
  shown = [r.getMessage() for r in caplog.records]
  assert [m for m in shown if m.startswith("library info")] == []
  assert [m for m in shown if m.startswith("library warning")] == [
    f"library warning {n}" for n in names
  ]
  assert "own info" in shown and "own warning" in shown


def test_preparing_and_reloading_a_folder_dataset_logs_no_tfds_warnings(tmp_path, caplog, capsys):
  raw = write_mvtec(tmp_path / "raw", categories=(("parts", "rgb"),), n_train=6)
  with caplog.at_level(logging.INFO):
    data.load("folder", "parts", "train", data_dir=raw, tfds_dir=tmp_path / "tfds")
    data.load("folder", "parts", "test", data_dir=raw, tfds_dir=tmp_path / "tfds")
  tfds_warnings = [
    r.getMessage()
    for r in caplog.records
    if "tensorflow_datasets" in r.pathname and r.levelno >= logging.WARNING
  ]
  assert tfds_warnings == []
  printed = capsys.readouterr()
  assert "Downloading and preparing" not in printed.out + printed.err
  # Prepared once, announced once, by jax_gad.
  assert caplog.text.count("preparing folder/parts in ") == 1


def test_convert_check_image_console_has_no_tpu_probe(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.convert",
      "--arch=efficientnet-lite0",
      f"--checkpoint_dir={tmp_path}",
      "--check_image",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "check:       ok" in proc.stdout
  assert NOISE["JAX's probe of an absent TPU"] not in proc.stdout + proc.stderr
