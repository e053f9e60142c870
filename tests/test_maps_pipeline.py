"""The anomaly-map path of `jax_gad.main --maps` on a tiny generated MVTec-shaped folder."""

import json

from fakes import write_mvtec
import jax
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from jax_gad import checkpoint as ckpt
from jax_gad import config, data, experiment, features, gaussian
from jax_gad.data import preprocess
from jax_gad.maps import pipeline as mp
from jax_gad.maps import report as maps_report
from jax_gad.models import efficientnet

ARCH = "efficientnet-lite0"
SIZE = 64
LEVELS = (3, 4, 5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return ckpt.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
  return write_mvtec(tmp_path_factory.mktemp("mvtec"), categories=(("bottle", "rgb"),))


def test_fold_parts_cover_each_fold_once():
  folds = data.folds(12)
  part, per_fold = mp.fold_parts(12, folds)
  for idx, parts in zip(folds, per_fold):
    assert sorted(np.flatnonzero(np.isin(part, parts)).tolist()) == sorted(idx.tolist())
  part, per_fold = mp.fold_parts(12, folds[:1])  # one fold: its held-out images are unused
  assert set(np.flatnonzero(part == -1).tolist()) == set(range(12)) - set(folds[0].tolist())


def test_main_maps_equal_independent_computation(tmp_path, mvtec, checkpoint):
  cfg = config.from_flat(
    config.Experiment,
    dict(
      workdir=str(tmp_path / "work"),
      dataset="mvtec_ad",
      data_dir=mvtec,
      tfds_dir=str(tmp_path / "tfds"),
      arch=ARCH,
      checkpoint=checkpoint,
      image_size=SIZE,
      batch_size=4,
      cache_dir=None,
      plots=False,
      categories=("bottle",),
      folds=(0, 3),
      distances=("mahalanobis",),
      maps=True,
      save_maps=True,
      map_levels=LEVELS,
    ),
  )
  doc = experiment.run(cfg)
  work = tmp_path / "work"
  assert json.loads((work / "results.json").read_text()) == doc
  assert (work / "maps.md").exists() and (work / "maps.csv").exists()
  overlays = doc["maps"]["overlays"]["bottle"]
  assert len(overlays) == 6  # 2 per defect type: good, crack, hole
  for rel in overlays:
    assert (work / rel).stat().st_size > 1000
  runs = {r["fold"]: r for r in doc["maps"]["runs"]}
  assert sorted(runs) == [0, 3] and doc["maps"]["no_masks"] == []

  # Independently: unpooled maps from the model, one fit_gaussian per location,
  # numpy/scipy postprocessing, scikit-learn AUROC.
  variables, meta = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  model = efficientnet.create(ARCH)
  splits = {
    s: data.load("mvtec_ad", "bottle", s, data_dir=mvtec, tfds_dir=cfg.data.tfds_dir)
    for s in ("train", "test")
  }
  levels = {}
  for s, src in splits.items():
    x = np.stack(
      [
        preprocess.prepare_image(src[i]["image"], SIZE, meta["mean"], meta["std"])
        for i in range(len(src))
      ]
    )
    out = model.apply(variables, x)
    levels[s] = [np.asarray(out[l], np.float32) for l in LEVELS]
  test = splits["test"]
  masks = [test[i]["mask"] > 0 for i in range(len(test))]
  with np.load(work / "maps_bottle.npz") as saved:
    for fold in (0, 3):
      idx = data.folds(len(splits["train"]))[fold]
      total = 0.0
      for tr, te in zip(levels["train"], levels["test"]):
        _, h, w, _ = tr.shape
        dist = np.zeros(te.shape[:3])
        for i in range(h):
          for j in range(w):
            state = gaussian.fit_gaussian(tr[idx, i, j])
            dist[:, i, j] = gaussian.mahalanobis(state, te[:, i, j])
        total = total + np.stack([preprocess.resize_bilinear(d, SIZE) for d in dist])
      ref = np.stack([ndimage.gaussian_filter(m / len(LEVELS), 4.0, mode="reflect") for m in total])
      got = saved[f"fold_{fold}"]
      np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
      full = [preprocess.resize_bilinear(m, g.shape) for m, g in zip(got, masks)]
      flat = np.concatenate([m.ravel() for m in full])
      labels = np.concatenate([g.ravel() for g in masks])
      assert runs[fold]["pixel_auroc"] == pytest.approx(roc_auc_score(labels, flat), abs=1e-6)
      image = roc_auc_score(test.labels, [m.max() for m in full])
      assert runs[fold]["image_auroc"] == pytest.approx(image, abs=1e-6)
      assert 0.0 <= runs[fold]["aupro"] <= 1.0


def test_category_without_masks_reports_image_metrics_only():
  class Source(list):
    pass

  rng = np.random.default_rng(0)
  source = Source(
    {"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 8), np.uint8), "label": i % 2}
    for i in range(4)
  )
  maps = rng.uniform(size=(1, 4, 8, 8)).astype(np.float32)
  runs, _, _ = mp.evaluate_category("c", maps, [0], source, lambda s, y: roc_auc_score(y, s))
  assert runs[0].pixel_auroc is None and runs[0].aupro is None
  rows = maps_report.summarize(runs)
  assert "no masks" in maps_report.table_markdown(rows)


def test_save_maps_needs_maps(tmp_path):
  cfg = config.from_flat(
    config.Experiment, dict(workdir=str(tmp_path / "w"), save_maps=True, maps=False)
  )
  with pytest.raises(ValueError, match="--save_maps needs --maps"):
    experiment.run(cfg)


def test_map_extractor_returns_unpooled_levels(checkpoint):
  variables, _ = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  model = efficientnet.create(ARCH)
  ex = features.MapExtractor(
    model, variables, image_size=SIZE, levels=(4, 6), batch_size=2, channels=((0, 5, 7), None)
  )
  x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  got = ex(x)
  ref = model.apply(variables, x)
  np.testing.assert_allclose(got[0], np.asarray(ref[4])[..., [0, 5, 7]], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[1], ref[6], rtol=1e-4, atol=1e-4)
  assert ex.map_shapes() == [(4, 4, 3), (2, 2, 192)]
  assert jax.tree_util.tree_structure(got).num_leaves == 2
  with pytest.raises(ValueError, match=r"one entry per level \(2\), got 1"):
    features.MapExtractor(model, variables, image_size=SIZE, levels=(4, 6), channels=((0,),))


def test_synthetic_set_end_to_end_writes_pixel_metrics_and_overlays(tmp_path, checkpoint, capfd):
  """The demo's dataset (small inputs): pixel AUROC and AUPRO computed and written."""
  cfg = config.from_flat(
    config.Experiment,
    dict(
      workdir=str(tmp_path / "work"),
      dataset="synthetic_ad",
      tfds_dir=str(tmp_path / "tfds"),
      arch=ARCH,
      checkpoint=checkpoint,
      image_size=SIZE,
      batch_size=8,
      cache_dir=None,
      plots=False,
      categories=("texture",),
      folds=(0,),
      distances=("mahalanobis",),
      maps=True,
    ),
  )
  doc = experiment.run(cfg)
  (run,) = doc["maps"]["runs"]
  assert run["category"] == "texture" and run["fold"] == 0
  for name in ("image_auroc", "pixel_auroc", "aupro"):
    assert 0.0 <= run[name] <= 1.0, name
  assert doc["maps"]["no_masks"] == []
  on_disk = json.loads((tmp_path / "work" / "results.json").read_text())
  assert on_disk["maps"] == doc["maps"]
  assert "AUPRO" in (tmp_path / "work" / "maps.md").read_text()
  overlays = doc["maps"]["overlays"]["texture"]
  assert overlays and all((tmp_path / "work" / p).is_file() for p in overlays)
  # The map fit, the per-fold Gaussians, the test maps and the metrics each show a bar that
  # counts to the end.
  err = capfd.readouterr().err
  n = doc["data"]["texture"]
  assert "texture/maps fit (1 folds): 100%" in err and f"{n['train']}/{n['train']} [" in err
  assert "texture/maps Gaussians: 100%" in err and "1/1 [" in err
  n_test = n["test_good"] + n["test_defect"]
  assert "texture/maps test: 100%" in err and f"{n_test}/{n_test} [" in err
  assert "texture/maps metrics: 100%" in err
