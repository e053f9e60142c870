"""Tests for jax_gad.detector / jax_gad.fit: fit, calibration, save/load, refusals."""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys

from fakes import extract_features, write_mvtec
import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import KFold

import jax_gad
from jax_gad import backbone as backbone_lib
from jax_gad import checkpoint as ckpt
from jax_gad import config, data, fitting
from jax_gad import detector as detector_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCH = "efficientnet-lite0"
SIZE = 64
LEVELS = (2, 4, 6, 8)
CATEGORY = "widget_7"  # custom name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return backbone_lib.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """A folder dataset with a custom category name and no masks."""
  root = tmp_path_factory.mktemp("raw")
  write_mvtec(
    root,
    categories=((CATEGORY, "rgb"),),
    n_train=12,
    n_good_test=5,
    defects=(("dent", 5),),
    size=48,
  )
  shutil.rmtree(root / CATEGORY / "ground_truth")
  return root


@pytest.fixture(scope="module")
def fitted(raw, checkpoint, tmp_path_factory):
  tfds_dir = tmp_path_factory.mktemp("tfds")
  det = jax_gad.fit_detector(
    config.from_flat(
      config.Fit,
      dict(
        category=CATEGORY,
        dataset="folder",
        data_dir=raw,
        tfds_dir=tfds_dir,
        arch=ARCH,
        checkpoint=checkpoint,
        image_size=SIZE,
        levels=LEVELS,
        batch_size=8,
        cache_dir="",
      ),
    ),
    progress=False,
  )
  return det, tfds_dir


def _features(split, det):
  b = det.backbone
  return extract_features(
    b.module,
    b.variables,
    split,
    image_size=SIZE,
    mean=det.mean,
    std=det.std,
    batch_size=8,
    levels=LEVELS,
  )


def _independent_scores(train_feats, test_feats):
  """Mean over levels of sqrt(LedoitWolf Mahalanobis) (scikit-learn, float64)."""
  per = [
    np.sqrt(LedoitWolf().fit(tr.astype(np.float64)).mahalanobis(te.astype(np.float64)))
    for tr, te in zip(train_feats, test_feats)
  ]
  return np.mean(per, axis=0)


def test_fit_equals_independent_fit_and_oof_calibration(fitted, raw):
  det, tfds_dir = fitted
  assert det.levels == LEVELS and det.image_size == SIZE and det.arch == ARCH
  assert det.info["category"] == CATEGORY and det.info["n_train"] == 12
  train = data.load("folder", CATEGORY, "train", data_dir=raw, tfds_dir=tfds_dir)
  test = data.load("folder", CATEGORY, "test", data_dir=raw, tfds_dir=tfds_dir)
  ftr, fte = _features(train, det), _features(test, det)
  # Scores of the fit on ALL training images vs scikit-learn.
  got = det.score_features(fte)
  np.testing.assert_allclose(got.total, _independent_scores(ftr, fte), rtol=2e-4)
  # Out-of-fold construction recomputed independently: KFold(5, shuffle, seed 0).
  oof = np.empty(len(train))
  for fit_idx, held in KFold(5, shuffle=True, random_state=0).split(np.arange(len(train))):
    oof[held] = _independent_scores([f[fit_idx] for f in ftr], [f[held] for f in ftr])
  np.testing.assert_allclose(det.calibration_scores, oof, rtol=2e-4)
  # The threshold: smallest t with at most a fraction target_fpr of OOF scores above it.
  ranked = np.sort(oof)
  candidates = [t for t in ranked if np.mean(oof > t) <= det.target_fpr]
  assert det.threshold == pytest.approx(candidates[0], rel=2e-4)
  # Chi-squared thresholds: scipy, per level width; total = their mean. (ppf of erf loses
  # precision beyond ~5 sigma, where erf rounds to 1: compared up to 5.)
  from scipy import special, stats

  widths = [f.shape[1] for f in ftr]
  ref = [
    [np.sqrt(stats.chi2.ppf(special.erf(n / np.sqrt(2)), k)) for n in det.sigmas] for k in widths
  ]
  np.testing.assert_allclose(
    np.asarray(det.sigma_thresholds)[:, :5], np.asarray(ref)[:, :5], rtol=1e-6
  )
  assert det.threshold_for(3) == pytest.approx(np.mean([r[2] for r in ref]), rel=1e-6)


def test_save_load_scores_identical(fitted, raw, checkpoint, tmp_path):
  det, tfds_dir = fitted
  path = tmp_path / "sub" / "det.jgd"
  det.save(path)
  again = jax_gad.load_detector(path, checkpoint=checkpoint)
  assert isinstance(again, jax_gad.Detector)
  for name in (
    "arch",
    "checkpoint_sha256",
    "image_size",
    "mean",
    "std",
    "levels",
    "threshold",
    "target_fpr",
    "sigma_thresholds",
    "reduction",
    "info",
  ):
    assert getattr(again, name) == getattr(det, name), name
  test = data.load("folder", CATEGORY, "test", data_dir=raw, tfds_dir=tfds_dir)
  images = [ex["image"] for ex in test]
  a, b = det.score(images), again.score(images)
  np.testing.assert_allclose(b.per_level, a.per_level, rtol=1e-6)
  np.testing.assert_allclose(b.total, a.total, rtol=1e-6)
  np.testing.assert_array_equal(again.decide(b.total), det.decide(a.total))
  # A pytree: the fitted arrays are leaves, the identity and thresholds static.
  import jax

  leaves = jax.tree_util.tree_leaves(again)
  assert len(leaves) == 1 + 6 * len(LEVELS)  # calibration scores + 6 arrays per GaussianState
  doubled = jax.tree_util.tree_map(lambda x: x, again)
  assert doubled.threshold == again.threshold and doubled.levels == again.levels
  # Saving is deterministic: the same detector gives the same bytes.
  again.save(tmp_path / "again.jgd")
  assert (tmp_path / "again.jgd").read_bytes() == path.read_bytes()


def test_reduction_round_trip(fitted, raw, checkpoint, tmp_path):
  det, tfds_dir = fitted
  npca = jax_gad.fit_detector(
    config.from_flat(
      config.Fit,
      dict(
        category=CATEGORY,
        dataset="folder",
        data_dir=raw,
        tfds_dir=tfds_dir,
        arch=ARCH,
        checkpoint=checkpoint,
        image_size=SIZE,
        levels=(6, 8),
        npca=0.9,
        batch_size=8,
        cache_dir="",
      ),
    ),
    progress=False,
  )
  assert npca.reduction == {"mode": "npca", "threshold": 0.9}
  npca.save(tmp_path / "n.jgd")
  again = jax_gad.load_detector(tmp_path / "n.jgd", checkpoint=checkpoint)
  rng = np.random.default_rng(0)
  feats = [rng.normal(size=(3, p.mean.shape[0])).astype(np.float32) for p in npca.projections]
  np.testing.assert_allclose(
    again.score_features(feats).total, npca.score_features(feats).total, rtol=1e-6
  )


def test_calibrated_fpr_on_synthetic_set(checkpoint, tmp_path):
  """Synthetic texture: the calibrated threshold's FPR on held-out normal images vs the target."""
  cfg = data.synthetic_ad.SyntheticAdConfig(
    name="cal_texture", category="texture", n_train=30, n_test=20, size=64
  )
  builder = data.synthetic_ad.SyntheticAd(
    config=cfg, data_dir=str(tmp_path), file_format="array_record"
  )
  builder.download_and_prepare()
  train = data.Split.from_builder(builder, "train")
  test = data.Split.from_builder(builder, "test")
  backbone, meta, sha = backbone_lib.load_backbone(ARCH, checkpoint)
  kw = dict(image_size=SIZE, mean=meta["mean"], std=meta["std"], batch_size=8, levels=LEVELS)
  ftr = extract_features(backbone.module, backbone.variables, train, **kw)
  fte = extract_features(backbone.module, backbone.variables, test, **kw)
  target = 0.1
  det = detector_lib.fit_features(
    ftr, levels=LEVELS, target_fpr=target, arch=ARCH, checkpoint_sha256=sha, image_size=SIZE
  )
  # Independent OOF construction and quantile.
  oof = np.empty(len(train))
  for fit_idx, held in KFold(5, shuffle=True, random_state=0).split(np.arange(len(train))):
    oof[held] = _independent_scores([f[fit_idx] for f in ftr], [f[held] for f in ftr])
  t = np.quantile(oof, 1 - target, method="inverted_cdf")
  assert det.threshold == pytest.approx(t, rel=2e-4)
  assert np.mean(det.calibration_scores > det.threshold) <= target
  # Held-out normal images (the test split's good ones): FPR measured, reported, sane.
  total = det.score_features(fte).total
  good = test.labels == 0
  fpr = float(np.mean(total[good] > det.threshold))
  tpr = float(np.mean(total[~good] > det.threshold))
  print(f"synthetic texture: target FPR {target}, held-out FPR {fpr:.3f}, TPR {tpr:.3f}")
  assert 0.0 <= fpr <= 0.5  # 10 held-out normal images: a loose sanity bound, not a benchmark


# --- bad input -------------------------------------------------------------------------


def _saved(fitted, tmp_path):
  det, _ = fitted
  path = tmp_path / "det.jgd"
  det.save(path)
  return path


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
  "kind",
  [
    "truncated",
    "corrupt payload",
    "other version",
    "other format",
    "checkpoint file",
    "pickle",
    "empty",
    "missing",
    "folder",
  ],
)
def test_bad_detector_files_refused(kind, fitted, checkpoint, tmp_path):
  path = _saved(fitted, tmp_path)
  blob = path.read_bytes()
  head, payload = blob.split(b"\n", 1)
  marker = tmp_path / "PWNED"
  if kind == "truncated":
    path.write_bytes(blob[:-100])
    expect = "truncated"
  elif kind == "corrupt payload":
    b = bytearray(blob)
    b[len(head) + 50] ^= 1
    path.write_bytes(bytes(b))
    expect = "corrupt"
  elif kind == "other version":
    h = json.loads(head)
    h["format_version"] = 99
    path.write_bytes(json.dumps(h).encode() + b"\n" + payload)
    expect = "format_version 99"
  elif kind == "other format":
    h = json.loads(head)
    h["format"] = "something.else"
    path.write_bytes(json.dumps(h).encode() + b"\n" + payload)
    expect = "not a jax_gad detector"
  elif kind == "checkpoint file":
    path = checkpoint
    expect = "not a jax_gad detector"
  elif kind == "pickle":
    path.write_bytes(pickle.dumps(_Evil(marker)))
    expect = "not a jax_gad detector"
  elif kind == "empty":
    path.write_bytes(b"")
    expect = "not a jax_gad detector"
  elif kind == "missing":
    path = tmp_path / "nope.jgd"
    expect = "does not exist"
  elif kind == "folder":
    path = tmp_path
    expect = "is a folder"
  with pytest.raises(ValueError) as err:
    jax_gad.load_detector(path, checkpoint=checkpoint)
  msg = str(err.value)
  assert expect in msg and str(path) in msg and "\n" not in msg
  assert not marker.exists()


def test_detector_for_another_checkpoint_refused(fitted, checkpoint, tmp_path):
  path = _saved(fitted, tmp_path)
  variables, meta = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  meta = dict(meta, source="a different conversion")
  other = tmp_path / "other.msgpack"
  ckpt.save_checkpoint(other, variables, meta)
  with pytest.raises(ValueError, match="sha256") as err:
    jax_gad.load_detector(path, checkpoint=other)
  assert str(path) in str(err.value) and str(other) in str(err.value)


@pytest.mark.parametrize("fpr", [0.0, 1.0, 1.5, -0.1])
def test_fit_bad_target_fpr_writes_nothing(fpr, raw, checkpoint, tmp_path):
  out = tmp_path / "det.jgd"
  with pytest.raises(ValueError, match="--target_fpr") as err:
    fitting.fit_and_save(
      config.from_flat(
        config.Fit,
        dict(
          output=out,
          category=CATEGORY,
          dataset="folder",
          data_dir=raw,
          arch=ARCH,
          checkpoint=checkpoint,
          target_fpr=fpr,
          tfds_dir=tmp_path / "tfds",
        ),
      )
    )
  assert "\n" not in str(err.value)
  assert not out.exists() and not (tmp_path / "tfds").exists()


def test_fit_category_without_train_good(tmp_path, checkpoint):
  (tmp_path / "raw" / "thing" / "train" / "ok").mkdir(parents=True)
  out = tmp_path / "det.jgd"
  with pytest.raises(ValueError, match="train/good"):
    fitting.fit_and_save(
      config.from_flat(
        config.Fit,
        dict(
          output=out,
          category="thing",
          dataset="folder",
          data_dir=tmp_path / "raw",
          arch=ARCH,
          checkpoint=checkpoint,
          tfds_dir=tmp_path / "tfds",
        ),
      )
    )
  assert not out.exists()


def test_fit_cli_exit_code_and_one_line_error(tmp_path, raw, checkpoint):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = tmp_path / "det.jgd"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.fit",
      "--dataset=folder",
      f"--data_dir={raw}",
      f"--category={CATEGORY}",
      f"--arch={ARCH}",
      f"--checkpoint={checkpoint}",
      f"--output={out}",
      "--target_fpr=1.5",
      f"--tfds_dir={tmp_path / 'tfds'}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("jax_gad.fit: error: --target_fpr")
  assert not out.exists()


# --- calibration and decision rules ------------------------------------------------


def _small_detector(n=40, target_fpr=0.05, levels=(2, 4), reduction=None, seed=0):
  """A detector fitted on random features of the lite0 widths of ``levels`` (no backbone)."""
  from jax_gad.models import efficientnet

  rng = np.random.default_rng(seed)
  widths = efficientnet.level_widths(ARCH)
  feats = [rng.normal(size=(n, widths[l])) @ rng.normal(size=(widths[l],) * 2) for l in levels]
  return detector_lib.fit_features(
    feats,
    levels=levels,
    target_fpr=target_fpr,
    reduction=reduction,
    arch=ARCH,
    checkpoint_sha256="0" * 64,
    image_size=SIZE,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    info={"n_train": n},
  )


def test_decide_is_strictly_above_the_threshold():
  det = _small_detector(n=40, target_fpr=0.05)
  assert not det.decide(np.array([det.threshold]))[0]
  assert det.decide(np.array([np.nextafter(det.threshold, np.inf)]))[0]
  # On the out-of-fold scores the FPR is at most the target: 2 of 40 here (3 with >=).
  assert det.decide(det.calibration_scores).sum() == 2


def test_calibrated_threshold_is_the_exact_ceil_rank():
  # Independent: the rank ceil(n (1 - a)) in exact rational arithmetic.
  from fractions import Fraction

  numpy_differs = []
  for n in range(1, 201):
    scores = np.arange(1.0, n + 1.0)[::-1].copy()  # unsorted input
    for a in [round(0.01 * i, 2) for i in range(1, 51)] + [0.001, 0.005, 0.025, 0.075]:
      rank = max(1, math.ceil(n * (1 - Fraction(str(a)))))
      assert detector_lib.calibrated_threshold(scores, a) == rank, (n, a)
      if np.quantile(scores, 1 - a, method="inverted_cdf") != rank:
        numpy_differs.append((n, a))
  # What the module docstring says: numpy's inverted_cdf is one rank off for some (n, a).
  assert (25, 0.44) in numpy_differs


def test_fit_honours_calibration_folds(raw, checkpoint, tmp_path, monkeypatch):
  from jax_gad.data import pipeline

  rng = np.random.default_rng(0)
  fake = {}

  def pooled(extractor, split, **kwargs):  # features without extraction: the folds are under test
    fake["feats"] = [rng.normal(size=(len(split), 6)) for _ in extractor.levels]
    return fake["feats"]

  monkeypatch.setattr(pipeline, "pooled_features", pooled)
  options = dict(
    category=CATEGORY,
    dataset="folder",
    data_dir=str(raw),
    tfds_dir=str(tmp_path / "tfds"),
    arch=ARCH,
    checkpoint=checkpoint,
    image_size=SIZE,
    levels=(2, 8),
    calibration_folds=3,
    cache_dir="",  # no feature cache: the features must be the fake ones above
  )
  det = jax_gad.fit_detector(config.from_flat(config.Fit, options), progress=False)
  assert det.n_folds == 3
  three = detector_lib.out_of_fold_scores(fake["feats"], 3)
  np.testing.assert_array_equal(det.calibration_scores, three)
  assert not np.allclose(three, detector_lib.out_of_fold_scores(fake["feats"], 5))


def _bad_fields(det):
  """(changes, expected message) per check of check_detector."""
  bad_scores = np.asarray(det.calibration_scores).copy()
  bad_scores[0] = np.nan
  return [
    (dict(arch="resnet50"), "'arch': 'resnet50' is not one of"),
    (dict(image_size=8), "'image_size': 8 is not an integer >= 16"),
    (dict(image_size=64.5), "'image_size': 64.5 is not an integer"),
    (dict(mean=(0.5, 0.5)), "'mean': [0.5, 0.5] is not 3 finite numbers"),
    (dict(std=(0.2, 0.0, 0.2)), "'std': [0.2, 0.0, 0.2] has a value <= 0"),
    (dict(dtype="float16"), "'dtype': 'float16' is not float32 or bfloat16"),
    (dict(levels=(2, 2)), "'levels': [2, 2] is not a list of distinct level indices"),
    (dict(levels=(2, 9)), "'levels': [2, 9] is not a list of distinct level indices"),
    (dict(levels=(2,)), "'levels': 1 levels but the arrays hold 2"),
    (dict(levels=(4, 2)), "'levels': level 4 has 80 features in efficientnet-lite0, but its "),
    (dict(reduction={"mode": "pca", "threshold": 0.5}), "'reduction': {'mode': 'pca'"),
    (dict(aggregation="max"), "'aggregation': 'max' is not 'mean'"),
    (dict(target_fpr=1.5), "'target_fpr': 1.5 is not in (0, 1)"),
    (dict(threshold=float("inf")), "'threshold': inf is not a finite number"),
    (dict(threshold=det.threshold + 1.0), "is not the target_fpr=0.05 quantile"),
    (dict(n_folds=1), "'n_folds': 1 is not an integer >= 2"),
    (dict(calibration_scores=bad_scores), "'calibration_scores': shape (40,) is not n >= 5"),
    (dict(info={"n_train": 39}), "'info': n_train 39 differs from the 40 out-of-fold scores"),
    (dict(sigmas=()), "'sigmas': [] is not a list of positive integers"),
    (dict(sigma_thresholds=((1.0,),) * 2), "'sigma_thresholds': expected 2 rows of 8"),
  ]


def test_every_header_check_names_the_field():
  det = _small_detector()
  detector_lib.check_detector(det, where="d.jgd")  # a consistent detector passes
  for changes, message in _bad_fields(det):
    with pytest.raises(ValueError) as err:
      detector_lib.check_detector(det.replace(**changes), where="d.jgd")
    assert str(err.value).startswith("d.jgd: header field ") and message in str(err.value), changes
  # With PCA, a projection fitted on another level's width is caught too.
  pca = _small_detector(reduction={"mode": "pca", "threshold": 0.9})
  detector_lib.check_detector(pca, where="d.jgd")
  with pytest.raises(ValueError, match=r"level 4 has 80 channels .* projection is for 24"):
    detector_lib.check_detector(pca.replace(levels=(4, 2)), where="d.jgd")
  with pytest.raises(ValueError, match=r"'reduction': None does not match"):
    detector_lib.check_detector(pca.replace(reduction=None), where="d.jgd")


def test_header_checked_against_the_checkpoint():
  det = _small_detector()
  meta = {"arch": ARCH, "mean": det.mean, "std": det.std}
  detector_lib.check_backbone(det, meta, "w.msgpack", "d.jgd")
  with pytest.raises(ValueError, match=r"d.jgd is for efficientnet-lite0, but w.msgpack holds"):
    detector_lib.check_backbone(det, dict(meta, arch="efficientnet-b0"), "w.msgpack", "d.jgd")
  with pytest.raises(ValueError, match=r"d.jgd: header field 'std' is .* the checkpoint w.msgpack"):
    detector_lib.check_backbone(det, dict(meta, std=(0.5, 0.5, 0.5)), "w.msgpack", "d.jgd")
