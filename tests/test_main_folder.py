"""main on a folder dataset (custom name, no masks): AUROC, staleness, and agreement with fit."""

import csv
import json
import os
import shutil

from fakes import extract_features, write_mvtec
import numpy as np
from PIL import Image
import pytest
from references import independent_aurocs

from jax_gad import checkpoint as ckpt
from jax_gad import config, data, experiment, fitting, predict, protocol
from jax_gad.models import efficientnet

ARCH = "efficientnet-lite0"
SIZE = 64
CATEGORY = "gasket-A"  # not an MVTec name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return ckpt.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


def _raw(root):
  write_mvtec(
    root,
    categories=((CATEGORY, "rgb"),),
    n_train=10,
    n_good_test=4,
    defects=(("nick", 4),),
    size=40,
    seed=5,
  )
  shutil.rmtree(root / CATEGORY / "ground_truth")
  return root


def _config(tmp_path, raw, checkpoint, **kw):
  base = dict(
    workdir=str(tmp_path / "work"),
    dataset="folder",
    data_dir=str(raw),
    tfds_dir=str(tmp_path / "tfds"),
    arch=ARCH,
    checkpoint=checkpoint,
    image_size=SIZE,
    batch_size=8,
    cache_dir=str(tmp_path / "cache"),
    plots=False,
    categories=(CATEGORY,),
    distances=("mahalanobis", "l2", "sed"),
  )
  base.update(kw)
  return config.from_flat(config.Experiment, base)


def _pooled(raw, tfds_dir, checkpoint):
  variables, meta = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  model = efficientnet.create(ARCH)
  out = {}
  for split in ("train", "test"):
    src = data.load("folder", CATEGORY, split, data_dir=raw, tfds_dir=tfds_dir)
    out[split] = extract_features(
      model, variables, src, image_size=SIZE, mean=meta["mean"], std=meta["std"], batch_size=8
    )
    out[split + "_labels"] = src.labels
  return out


def test_main_on_folder_equals_independent_auroc(tmp_path, checkpoint):
  raw = _raw(tmp_path / "raw")
  levels = (3, 6, 8)  # a subset keeps the test short; the protocol is the same for every level
  cfg = _config(tmp_path, raw, checkpoint, levels=levels)
  doc = experiment.run(cfg)
  assert doc["data"][CATEGORY]["train"] == 10
  assert doc["data"][CATEGORY]["test_good"] == 4 and doc["data"][CATEGORY]["test_defect"] == 4
  assert doc["data"][CATEGORY]["has_masks"] is False
  assert set(doc["versions"]) >= {"jax_gad", "jax", "flax"}
  pooled = _pooled(raw, cfg.data.tfds_dir, checkpoint)
  train = [pooled["train"][l] for l in levels]
  test = [pooled["test"][l] for l in levels]
  for fold, idx in enumerate(data.folds(10)):
    ref = independent_aurocs(train, test, pooled["test_labels"], idx)
    ref = {(k if k == "sum" else levels[k], d): v for (k, d), v in ref.items()}
    got = {
      (r["level"], r["distance"]): r["auroc"]
      for r in doc["runs"]
      if r["category"] == CATEGORY and r["fold"] == fold
    }
    assert got.keys() == ref.keys()
    for key, value in ref.items():
      assert got[key] == pytest.approx(value, abs=1e-6), (fold, key)


def test_main_without_categories_for_folder(tmp_path, checkpoint):
  cfg = _config(tmp_path, tmp_path, checkpoint, categories=())
  with pytest.raises(ValueError, match="--categories is required"):
    experiment.run(cfg)


def test_changed_raw_folder_changes_the_next_run(tmp_path, checkpoint):
  raw = _raw(tmp_path / "raw")
  run = lambda: experiment.run(_config(tmp_path, raw, checkpoint))
  first = run()["data"][CATEGORY]
  cat = raw / CATEGORY
  rng = np.random.default_rng(9)
  # Add a training image.
  Image.fromarray(rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)).save(
    cat / "train" / "good" / "100.png"
  )
  added = run()["data"][CATEGORY]
  assert added["train"] == first["train"] + 1
  assert added["fingerprint"]["train"] != first["fingerprint"]["train"]
  # Remove a defect image.
  os.remove(cat / "test" / "nick" / "000.png")
  removed = run()["data"][CATEGORY]
  assert removed["test_defect"] == first["test_defect"] - 1
  # Replace a good test image by another one (same name).
  Image.fromarray(rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)).save(
    cat / "test" / "good" / "000.png"
  )
  replaced = run()
  assert replaced["data"][CATEGORY]["test_good"] == removed["test_good"]
  assert replaced["data"][CATEGORY]["fingerprint"]["test"] != removed["fingerprint"]["test"]
  on_disk = json.loads((tmp_path / "work" / "results.json").read_text())
  assert on_disk["data"][CATEGORY] == replaced["data"][CATEGORY]


def test_fit_predict_scores_equal_mains_fit_on_all_training_images(tmp_path, checkpoint):
  raw = _raw(tmp_path / "raw")
  tfds_dir = tmp_path / "tfds"
  det_path = tmp_path / "det.jgd"
  fitting.fit_and_save(
    config.from_flat(
      config.Fit,
      dict(
        output=det_path,
        category=CATEGORY,
        dataset="folder",
        data_dir=raw,
        tfds_dir=tfds_dir,
        arch=ARCH,
        checkpoint=checkpoint,
        image_size=SIZE,
        batch_size=8,
        cache_dir="",
      ),
    ),
    progress=False,
  )
  out = tmp_path / "scores.csv"
  options = dict(detector=det_path, input=raw / CATEGORY / "test", output=out)
  predict.command(
    config.from_flat(config.Predict, dict(options, checkpoint=checkpoint, batch_size=8)),
    progress=False,
  )
  with open(out, newline="") as f:
    rows = {r["path"]: float(r["total"]) for r in csv.DictReader(f)}
  # main's route: the same pooled features, protocol.evaluate_category with one "fold" that
  # holds every training image.
  pooled = _pooled(raw, tfds_dir, checkpoint)
  result = protocol.evaluate_category(
    CATEGORY,
    pooled["train"],
    pooled["test"],
    pooled["test_labels"],
    [np.arange(len(pooled["train_labels"]))],
    levels=list(range(9)),
    distances=("mahalanobis",),
  )
  test = data.load("folder", CATEGORY, "test", data_dir=raw, tfds_dir=tfds_dir)
  got = np.array([rows[str(raw / CATEGORY / name)] for name in test.file_names])
  np.testing.assert_allclose(got, result.scores[0]["mahalanobis"], rtol=1e-6)
