"""Anomaly maps from a saved detector: fit --maps, predict --maps_dir, overlay scale, ridge."""

import csv
import os

from fakes import write_synthetic_mvtec
import numpy as np
from PIL import Image
import pytest

from jax_gad import backbone as backbone_lib
from jax_gad import checkpoint as ckpt
from jax_gad import config, data, features, fitting, predict, protocol
from jax_gad import detector as detector_lib
from jax_gad.data import pipeline as data_pipeline
from jax_gad.data import synthetic_ad
from jax_gad.maps import deploy, overlay, postprocess
from jax_gad.maps import fit as mfit
from jax_gad.maps import metrics as mmetrics
from jax_gad.maps import pipeline as mp
from jax_gad.models import efficientnet

ARCH = "efficientnet-lite0"
SIZE = 64
MAP_LEVELS = (2, 3, 4)
MAP_OPTIONS = {
  "maps": True,
  "map_levels": MAP_LEVELS,
  "map_ridge": 0.01,
  "map_sigma": 4.0,
  "map_combine": "mean",
  "map_channels": None,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return backbone_lib.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, checkpoint):
  """A synthetic 'object' category as a folder, fitted with --maps as the fit command does."""
  root = tmp_path_factory.mktemp("raw")
  write_synthetic_mvtec(root, "object", "nut", n_train=20, n_test=12, size=SIZE)
  work = tmp_path_factory.mktemp("work")
  det = fitting.fit_and_save(_fit_config(root, work, checkpoint), progress=False)
  return root, work, det


def _fit_config(root, work, checkpoint, **overrides):
  options = dict(
    output=work / "det.jgd",
    category="nut",
    dataset="folder",
    data_dir=root,
    arch=ARCH,
    checkpoint=checkpoint,
    image_size=SIZE,
    levels=(4, 5),
    batch_size=8,
    tfds_dir=work / "tfds",
    **MAP_OPTIONS,
  )
  return config.from_flat(config.Fit, {**options, **overrides})


def _predict(detector, input, output, checkpoint, **options):
  """predict.command as the CLI runs it."""
  options = dict(detector=detector, input=input, output=output, checkpoint=checkpoint, **options)
  return predict.command(config.from_flat(config.Predict, options), progress=False)


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_predict_maps_match_main_on_all_training_images(fitted, checkpoint, tmp_path):
  root, work, det = fitted
  test_dir = root / "nut" / "test"
  maps_dir = tmp_path / "maps"
  _predict(
    work / "det.jgd", test_dir, tmp_path / "scores.csv", checkpoint, batch_size=8, maps_dir=maps_dir
  )
  rows = _rows(tmp_path / "scores.csv")
  test = data.load("folder", "nut", "test", data_dir=root, tfds_dir=work / "tfds")
  assert len(rows) == len(test)
  maps, masks = [], []
  for row in rows:
    rel = os.path.relpath(row["path"], test_dir)
    assert row["map_file"] == str(maps_dir / rel) + ".npy"
    amap = np.load(row["map_file"])
    image = np.asarray(Image.open(row["path"]).convert("RGB"))
    assert amap.dtype == np.float32 and amap.shape == image.shape[:2]
    assert float(row["map_max"]) == pytest.approx(float(amap.max()), rel=1e-6)
    assert os.path.getsize(str(maps_dir / rel) + ".png") > 1000
    maps.append(amap)
    mask_path = root / "nut" / "ground_truth" / (os.path.splitext(rel)[0] + "_mask.png")
    masks.append(np.asarray(Image.open(mask_path)) if mask_path.exists() else np.zeros_like(amap))
  got = mmetrics.pixel_metrics(maps, masks)

  # main --maps' steps, with one "fold" that fits on every training image.
  train = data.load("folder", "nut", "train", data_dir=root, tfds_dir=work / "tfds")
  settings = mp.settings_for(ARCH, MAP_LEVELS, None, "mean", 4.0, 0.01)
  extractor = features.MapExtractor(
    det.backbone.module,
    det.backbone.variables,
    image_size=SIZE,
    levels=MAP_LEVELS,
    batch_size=8,
  )
  pre = data_pipeline.image_preprocessor(SIZE, det.mean, det.std)
  states = deploy.fit_states(
    extractor, train, [np.arange(len(train))], preprocess=pre, settings=settings
  )
  main_maps = mp.score_folds(extractor, test, states, preprocess=pre, settings=settings)
  runs, _, _ = mp.evaluate_category("nut", main_maps, [0], test, lambda s, y: 0.0)
  want = runs[0]
  assert abs(100 * got.pixel_auroc - 100 * want.pixel_auroc) < 0.5
  assert abs(100 * got.aupro - 100 * want.aupro) < 0.5


def test_detector_file_keeps_the_map_statistics(fitted):
  _, work, det = fitted
  back = detector_lib.read_detector(work / "det.jgd")
  assert back.has_maps and back.map_settings == det.map_settings
  assert back.map_settings["levels"] == list(MAP_LEVELS) and back.map_settings["ridge"] == 0.01
  assert back.map_threshold == det.map_threshold and back.map_scale == det.map_scale
  for a, b in zip(back.map_states, det.map_states):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The pixel threshold sits inside the colour scale drawn from the same normal maps.
  assert det.map_scale[0] < det.map_threshold < det.map_scale[1]


def test_calibration_is_out_of_fold(fitted, checkpoint):
  """Threshold and scale equal an independent computation from per-fold fits."""
  root, work, det = fitted
  train = data.load("folder", "nut", "train", data_dir=root, tfds_dir=work / "tfds")
  extractor = features.MapExtractor(
    det.backbone.module,
    det.backbone.variables,
    image_size=SIZE,
    levels=MAP_LEVELS,
    batch_size=len(train),
  )
  pre = data_pipeline.image_preprocessor(SIZE, det.mean, det.std)
  images = np.stack([pre(train[i]["image"]) for i in range(len(train))])
  level_maps = [np.asarray(m) for m in extractor(images)]
  oof = np.zeros((len(train), SIZE, SIZE), np.float32)
  for fit_idx in protocol.folds(len(train), det.n_folds):
    held = np.setdiff1d(np.arange(len(train)), fit_idx)
    states = [mfit.fit(m[fit_idx], ridge=0.01) for m in level_maps]
    dists = [np.asarray(mfit.score(s, m[held])) for s, m in zip(states, level_maps)]
    oof[held] = np.asarray(postprocess.combine(dists, SIZE))
  values = np.sort(oof.ravel())
  k = int(np.ceil(values.size * (1 - det.target_fpr)))
  assert det.map_threshold == pytest.approx(float(values[k - 1]), rel=1e-4)
  lo, hi = np.percentile(oof, [1.0, 99.9])
  assert det.map_scale == pytest.approx((lo, hi), rel=1e-4)


def test_maps_dir_refused_without_map_statistics(fitted, checkpoint, tmp_path):
  root, work, det = fitted
  plain = tmp_path / "plain.jgd"
  det.replace(map_states=(), map_settings=None).save(plain)
  assert not detector_lib.read_detector(plain).has_maps
  with pytest.raises(ValueError, match=r"--maps_dir: detector .* no map statistics.*--maps"):
    _predict(
      plain, root / "nut" / "test", tmp_path / "s.csv", checkpoint, maps_dir=tmp_path / "maps"
    )
  assert not (tmp_path / "s.csv").exists() and not (tmp_path / "maps").exists()
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match="--maps_dir=.* is a file"):
    _predict(
      work / "det.jgd", root / "nut" / "test", tmp_path / "s.csv", checkpoint, maps_dir=a_file
    )


def test_predict_without_maps_dir_has_no_map_columns(fitted, checkpoint, tmp_path):
  root, work, _ = fitted
  _predict(work / "det.jgd", root / "nut" / "test" / "good", tmp_path / "s.csv", checkpoint)
  assert "map_max" not in _rows(tmp_path / "s.csv")[0]


@pytest.mark.parametrize(
  "options, message",
  [
    ({"map_levels": (2, 9)}, "--map_levels"),
    ({"map_levels": (2, 2)}, "--map_levels"),
    ({"map_ridge": -0.1}, "--map_ridge"),
    ({"map_combine": "max"}, "--map_combine"),
    ({"map_sigma": -1.0}, "--map_sigma"),
    ({"map_channels": 0}, "--map_channels"),
  ],
)
def test_map_settings_refuse_bad_values(options, message):
  with pytest.raises(ValueError, match=message):
    detector_lib.map_settings(ARCH, config.Maps(maps=True, **options))


def test_map_settings_defaults():
  s = detector_lib.map_settings(ARCH)
  assert s.levels == mp.default_map_levels(ARCH) and s.ridge == 0.01  # PaDiM's ridge
  assert s.ridge == config.Maps.map_ridge and s.sigma == config.Maps.map_sigma
  assert deploy.settings_from_json(deploy.settings_to_json(s)) == s
  s = detector_lib.map_settings(ARCH, config.Maps(maps=True, map_channels=8, map_ridge=0.5))
  assert deploy.settings_from_json(deploy.settings_to_json(s)) == s and s.ridge == 0.5
  assert [len(c) for c in s.channels] == [8] * len(s.levels)


@pytest.mark.parametrize("options", [{"maps": True, "save_maps": True}, {"save_maps": True}])
def test_fit_refuses_save_maps_before_any_work(tmp_path, options):
  """--save_maps is main's: fit refuses it (with or without --maps), reading nothing."""
  cfg = _fit_config(tmp_path / "absent", tmp_path, tmp_path / "absent.msgpack", **options)
  with pytest.raises(ValueError, match="--save_maps is jax_gad.main's"):
    fitting.fit_and_save(cfg, progress=False)
  assert not (tmp_path / "det.jgd").exists()


def test_fit_checks_map_options_before_any_work(tmp_path):
  cfg = _fit_config(tmp_path / "absent", tmp_path, tmp_path / "absent.msgpack", map_ridge=-1.0)
  with pytest.raises(ValueError, match="--map_ridge must be at least 0.0, got -1.0"):
    fitting.fit_and_save(cfg, progress=False)


def test_pixel_threshold_is_the_inverted_cdf_quantile():
  rng = np.random.default_rng(0)
  maps = rng.standard_normal((7, 5, 3)).astype(np.float32)
  for a in (0.01, 0.1, 0.5):
    want = np.quantile(maps.ravel(), 1 - a, method="inverted_cdf")
    assert deploy.pixel_threshold(maps, a) == want
    assert np.mean(maps > deploy.pixel_threshold(maps, a)) <= a


def test_held_out_fold_needs_exactly_one():
  folds = protocol.folds(10)
  held = deploy.held_out_fold(10, folds)
  for k, idx in enumerate(folds):
    assert not np.isin(np.flatnonzero(held == k), idx).any()
  with pytest.raises(ValueError, match="held out by 0 folds"):
    deploy.held_out_fold(10, folds[:4])
  with pytest.raises(ValueError, match="held out by 2 folds"):
    deploy.held_out_fold(10, [np.arange(5), np.arange(5), np.arange(5, 10)])


def test_scaled_saturates_above_the_scale():
  amap = np.array([[0.0, 1.0], [2.0, 10.0]], np.float32)
  np.testing.assert_allclose(overlay.scaled(amap, 1.0, 3.0), [[0.0, 0.0], [0.5, 1.0]])
  with pytest.raises(ValueError, match="vmax > vmin"):
    overlay.scaled(amap, 1.0, 1.0)


def test_output_stem_stays_under_the_input_folder(tmp_path):
  assert deploy.output_stem("out", "/a/b/c.png", "/a") == os.path.join("out", "b", "c.png")
  with pytest.raises(ValueError, match="not under the input folder"):
    deploy.output_stem("out", "/x/c.png", "/a")


def test_flat_background_variant():
  flat = synthetic_ad.generate("object", n_train=2, n_test=0, size=96, background="flat")
  image = flat["train"][0]["image"]
  corner = image[:12, :12].reshape(-1, 3)
  assert np.all(corner == corner[0]) and image.std() > 10
  dark = synthetic_ad.generate("object", n_train=2, n_test=0, size=96)["train"][0]["image"]
  assert dark[:12, :12].reshape(-1, 3).std(axis=0).max() > 0.5  # the default keeps its noise
  with pytest.raises(ValueError, match="background='flat' is not available .* 'texture'"):
    synthetic_ad.generate("texture", n_train=2, n_test=0, background="flat")
  with pytest.raises(ValueError, match="background='wavy'"):
    synthetic_ad.draw_example("object", "good", 0, "train", 0, 96, background="wavy")


def test_flat_background_overlay_scale_and_ridge(checkpoint):
  """Near-constant background features blow distances up; normal-map scale + ridge fix it."""
  size, n_fit = 128, 18
  variables, meta = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  extractor = features.MapExtractor(
    efficientnet.create(ARCH), variables, image_size=size, levels=MAP_LEVELS, batch_size=12
  )
  pre = data_pipeline.image_preprocessor(size, meta["mean"], meta["std"])
  splits = synthetic_ad.generate("object", n_train=24, n_test=12, size=size, background="flat")

  def level_maps(items):
    out = [[] for _ in MAP_LEVELS]
    for start in range(0, len(items), 12):
      batch = np.stack([pre(ex["image"]) for ex in items[start : start + 12]])
      for acc, m in zip(out, extractor(batch)):
        acc.append(np.asarray(m))
    return [np.concatenate(o) for o in out]

  train, test = level_maps(splits["train"]), level_maps(splits["test"])
  defects = [i for i, ex in enumerate(splits["test"]) if ex["label"]]
  masks = [splits["test"][i]["mask"] > 0 for i in defects]

  def maps(ridge):
    states = [mfit.fit(m[:n_fit], ridge=ridge) for m in train]

    def score(feats):
      dists = [np.asarray(mfit.score(s, f)) for s, f in zip(states, feats)]
      return np.asarray(postprocess.combine(dists, size))

    return score([m[n_fit:] for m in train]), score([m[defects] for m in test])

  # Without the fix: no ridge, each overlay scaled by its own map. On the worst image
  # the background peak is several times the defect's and the defect is drawn dark.
  _, raw = maps(0.0)
  own = [overlay.scaled(a, *overlay.color_scale([a]))[m].mean() for a, m in zip(raw, masks)]
  worst = int(np.argmin(own))
  assert own[worst] < 0.25
  assert raw[worst][~masks[worst]].max() > 4 * raw[worst][masks[worst]].max()

  # With the fix: ridge 0.01 and the scale of normal (held-out training) maps.
  normal, fixed = maps(0.01)
  scale = overlay.color_scale(normal)
  drawn = [overlay.scaled(a, *scale)[m].mean() for a, m in zip(fixed, masks)]
  assert drawn[worst] > 0.6 and np.median(drawn) > 0.7
  # The ridge bounds the blow-up of the background distance.
  assert fixed[worst][~masks[worst]].max() < 0.5 * raw[worst][~masks[worst]].max()


def test_maps_dir_with_an_unreadable_image_skipped(fitted, checkpoint, tmp_path):
  root, work, _ = fitted
  folder = tmp_path / "in"
  (folder / "a").mkdir(parents=True)
  good = root / "nut" / "test" / "good" / "000.png"
  (folder / "a" / "ok.png").write_bytes(good.read_bytes())
  (folder / "a" / "bad.png").write_bytes(b"not a png")
  _predict(
    work / "det.jgd",
    folder,
    tmp_path / "s.csv",
    checkpoint,
    on_error="skip",
    maps_dir=tmp_path / "maps",
  )
  rows = {os.path.basename(r["path"]): r for r in _rows(tmp_path / "s.csv")}
  assert rows["bad.png"]["decision"] == "error" and rows["bad.png"]["map_file"] == ""
  assert rows["bad.png"]["map_max"] == "" and not (tmp_path / "maps/a/bad.png.npy").exists()
  assert rows["ok.png"]["map_file"] == str(tmp_path / "maps" / "a" / "ok.png.npy")


def test_predict_maps_take_refuses_missing_maps():
  pending = object.__new__(deploy.PredictMaps)
  pending._pending = [np.zeros((2, 4, 4), np.float32)]
  with pytest.raises(ValueError, match="scored 2 maps, fewer than the 3 images"):
    pending.take(3)


def test_main_refuses_a_negative_map_ridge(tmp_path):
  cfg = config.from_flat(
    config.Experiment, dict(workdir=str(tmp_path / "w"), maps=True, map_ridge=-0.5)
  )
  with pytest.raises(ValueError, match="--map_ridge must be at least 0.0, got -0.5"):
    config.validate(cfg)


def test_normal_scale_needs_held_out_images():
  with pytest.raises(ValueError, match="no held-out image sets the scale"):
    mp.normal_scale(None, [0, 1, 2], np.arange(3), None, preprocess=None, settings=None)


def test_normal_scale_is_the_held_out_training_maps_percentiles(fitted):
  root, work, det = fitted
  train = data.load("folder", "nut", "train", data_dir=root, tfds_dir=work / "tfds")
  settings = mp.settings_for(ARCH, MAP_LEVELS, None, "mean", 4.0, 0.01)
  extractor = features.MapExtractor(
    det.backbone.module, det.backbone.variables, image_size=SIZE, levels=MAP_LEVELS, batch_size=8
  )
  pre = data_pipeline.image_preprocessor(SIZE, det.mean, det.std)
  fold = protocol.folds(len(train))[0]
  (states,) = deploy.fit_states(extractor, train, [fold], preprocess=pre, settings=settings)
  got = mp.normal_scale(extractor, train, fold, states, preprocess=pre, settings=settings)
  held = np.setdiff1d(np.arange(len(train)), fold)
  images = np.stack([pre(train[int(i)]["image"]) for i in held])
  whole = features.MapExtractor(
    det.backbone.module,
    det.backbone.variables,
    image_size=SIZE,
    levels=MAP_LEVELS,
    batch_size=len(held),
  )
  dists = [np.asarray(mfit.score(st, m)) for st, m in zip(states, whole(images))]
  maps = np.asarray(postprocess.combine(dists, SIZE))
  assert got == pytest.approx(tuple(np.percentile(maps, [1.0, 99.9])), rel=1e-5)


def _help(module):
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, "-m", module, "--help"],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode in (0, 1), proc.stderr[-2000:]  # absl: usage, then status 1
  return proc.stdout + proc.stderr


def test_help_lists_the_map_flags_of_fit_and_predict():
  """fit --help: main's map flags less --save_maps (refused); predict --help: --maps_dir."""
  text = _help("jax_gad.fit")
  for name in ("[no]maps", "map_levels", "map_ridge", "map_sigma", "map_combine", "map_channels"):
    assert f"  --{name}:" in text, name
  assert "save_maps" not in text
  assert "  --maps_dir:" in _help("jax_gad.predict")
