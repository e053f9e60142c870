"""Tests for jax_gad.data: mvtec_ad / synthetic_ad builders, load, Split, folds."""

import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
from sklearn.model_selection import KFold
import tensorflow_datasets as tfds

import jax_gad.data as data
from jax_gad.data import loader, mvtec_ad, synthetic_ad

# A tiny MVTec-shaped folder: one RGB and one grayscale category, masks, several
# defect types. Files are written in an order different from the sorted one.
SPEC = {
  # category: (image (height, width), grayscale?, n_train, {test folder: n})
  "bottle": ((16, 16), False, 7, {"good": 3, "broken_large": 2, "contamination": 3}),
  "grid": ((12, 20), True, 6, {"thread": 2, "good": 2, "bent": 1}),
}


def _save_png(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  image.save(path, format="PNG")


def write_mvtec(root, spec=SPEC, seed=0):
  """Writes a tiny MVTec AD tree; returns the expected examples per category/split."""
  rng = np.random.default_rng(seed)
  expected = {}
  for category, (shape, gray, n_train, test) in spec.items():
    entries = []  # (split, defect, name, image (H, W, 3), mask (H, W), label)
    for i in reversed(range(n_train)):
      entries.append(("train", "good", f"{i:03d}.png"))
    for defect in reversed(list(test)):
      for i in reversed(range(test[defect])):
        entries.append(("test", defect, f"{i:03d}.png"))
    out = {"train": [], "test": []}
    for split, defect, name in entries:
      if gray:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        _save_png(root / category / split / defect / name, pixels)
        rgb = np.repeat(pixels[..., None], 3, axis=-1)
      else:
        rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        _save_png(root / category / split / defect / name, rgb)
      mask = np.zeros(shape, np.uint8)
      if defect != "good":
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        mask[y : y + 4, x : x + 3] = 255
        mask_path = root / category / "ground_truth" / defect / name.replace(".png", "_mask.png")
        # The grayscale category's masks are stored as 1-bit PNGs.
        _save_png(mask_path, mask, mode="1" if gray else None)
      out[split].append(
        {
          "file_name": f"{split}/{defect}/{name}",
          "image": rgb,
          "mask": mask,
          "label": int(defect != "good"),
          "defect_type": defect,
        }
      )
    for split in out:
      out[split].sort(key=lambda e: e["file_name"])
    expected[category] = out
  return expected


def _leftovers(tfds_dir):
  """Files/folders under tfds_dir that a later load could mistake for data."""
  found = []
  for dirpath, dirnames, filenames in os.walk(tfds_dir):
    for name in dirnames + filenames:
      if (
        "incomplete" in name
        or name.endswith(".array_record")
        or "array_record-" in name
        or name == "dataset_info.json"
      ):
        found.append(os.path.join(dirpath, name))
  return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("mvtec")
  expected = write_mvtec(root)
  tfds_dir = tmp_path_factory.mktemp("tfds")
  splits = {
    (c, s): data.load("mvtec_ad", c, s, data_dir=root, tfds_dir=tfds_dir)
    for c in SPEC
    for s in ("train", "test")
  }
  return root, tfds_dir, expected, splits


@pytest.mark.parametrize("category", list(SPEC))
@pytest.mark.parametrize("split", ["train", "test"])
def test_mvtec_examples_match_source(built, category, split):
  _, _, expected, splits = built
  ds = splits[(category, split)]
  exp = expected[category][split]
  assert len(ds) == len(exp)
  # Cheap metadata, in the sorted order.
  assert ds.file_names == [e["file_name"] for e in exp]
  assert ds.file_names == sorted(ds.file_names)
  assert ds.labels.tolist() == [e["label"] for e in exp]
  assert ds.defect_types == [e["defect_type"] for e in exp]
  assert ds.dataset == "mvtec_ad" and ds.category == category and ds.split == split
  for i, e in enumerate(exp):
    ex = ds[i]
    assert ex["file_name"] == e["file_name"]
    assert ex["label"] == e["label"]
    assert ex["defect_type"] == e["defect_type"]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == e["image"].shape
    assert ex["image"].shape[-1] == 3  # grayscale categories come out as RGB
    np.testing.assert_array_equal(ex["image"], e["image"])
    assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == e["mask"].shape
    np.testing.assert_array_equal(ex["mask"], e["mask"])
  assert ds[-1]["file_name"] == exp[-1]["file_name"]


def test_mvtec_counts_and_defect_types(built):
  _, _, _, splits = built
  for category, (_, _, n_train, test) in SPEC.items():
    train, tst = splits[(category, "train")], splits[(category, "test")]
    assert len(train) == n_train and set(train.defect_types) == {"good"}
    assert len(tst) == sum(test.values())
    assert {d: tst.defect_types.count(d) for d in test} == test
    # Test folders come out sorted by name, 'good' among them.
    seen = list(dict.fromkeys(tst.defect_types))
    assert seen == sorted(test)
    assert int(tst.labels.sum()) == sum(n for d, n in test.items() if d != "good")


def test_split_indexing(built):
  _, _, _, splits = built
  ds = splits[("bottle", "train")]
  with pytest.raises(IndexError):
    ds[len(ds)]
  with pytest.raises(TypeError):
    ds["0"]
  assert [ex["file_name"] for ex in ds] == ds.file_names  # Sequence protocol


def test_mvtec_reload_needs_data_dir_and_fingerprints(built, tmp_path):
  root, tfds_dir, expected, splits = built
  # The prepared data is checked against the raw folder at every load: data_dir is required.
  with pytest.raises(ValueError, match="no data_dir was given"):
    data.load("mvtec_ad", "bottle", "test", tfds_dir=tfds_dir)
  again = data.load("mvtec_ad", "bottle", "test", data_dir=root, tfds_dir=tfds_dir)
  assert again.prepared_dir == splits[("bottle", "test")].prepared_dir  # reused, not rebuilt
  assert again.fingerprint == splits[("bottle", "test")].fingerprint
  fps = {k: s.fingerprint for k, s in splits.items()}
  assert len(set(fps.values())) == len(fps)
  # Changing one pixel of one source image changes the fingerprint.
  root2 = tmp_path / "mvtec2"
  write_mvtec(root2)
  path = root2 / "bottle" / "test" / "good" / "001.png"
  pixels = np.asarray(Image.open(path)).copy()
  pixels[0, 0, 0] ^= 1
  _save_png(path, pixels)
  changed = data.load("mvtec_ad", "bottle", "test", data_dir=root2, tfds_dir=tmp_path / "tfds2")
  assert changed.file_names == again.file_names
  assert changed.fingerprint != again.fingerprint
  same = data.load("mvtec_ad", "bottle", "train", data_dir=root2, tfds_dir=tmp_path / "tfds2")
  assert same.fingerprint == splits[("bottle", "train")].fingerprint


def test_mvtec_builder_metadata():
  assert set(data.MVTEC_CATEGORIES) == set(data.MVTEC_COUNTS)
  assert len(data.MVTEC_CATEGORIES) == 15
  assert data.TEXTURES == ("carpet", "grid", "leather", "tile", "wood")
  assert data.CATEGORIES["mvtec_ad"] == data.MVTEC_CATEGORIES
  assert [c.name for c in mvtec_ad.MvtecAd.BUILDER_CONFIGS] == list(data.MVTEC_CATEGORIES)
  assert "mvtec.com" in mvtec_ad.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert str(mvtec_ad.MvtecAd.VERSION) in mvtec_ad.MvtecAd.RELEASE_NOTES


# --- folds -------------------------------------------------------------------


@pytest.mark.parametrize("n_train", [5, 7, 60, 209, 391])
def test_folds_equal_sklearn_kfold(n_train):
  names = sorted(f"{i:03d}.png" for i in range(n_train))
  ref = KFold(n_splits=5, shuffle=True, random_state=0)
  ours = data.folds(n_train)
  assert len(ours) == 5
  for fold, (train, test) in zip(ours, ref.split(names)):
    assert fold.dtype == np.int64
    assert np.array_equal(fold, np.sort(fold))
    assert set(fold.tolist()) == set(train.tolist())
    assert not set(fold.tolist()) & set(test.tolist())


def test_folds_other_settings_and_errors():
  ref = KFold(n_splits=3, shuffle=True, random_state=4).split(np.arange(10))
  for fold, (train, _) in zip(data.folds(10, n_splits=3, seed=4), ref):
    assert np.array_equal(fold, np.sort(train))
  with pytest.raises(ValueError, match="n_train"):
    data.folds(0)
  with pytest.raises(ValueError, match="at least"):
    data.folds(4, n_splits=5)
  with pytest.raises(ValueError, match="n_splits"):
    data.folds(10, n_splits=1)


# --- bad input ---------------------------------------------------------------


def test_unknown_names_list_valid_ones(tmp_path):
  with pytest.raises(ValueError, match="valid categories: bottle, cable.*zipper"):
    data.load("mvtec_ad", "bottel", "train", data_dir=tmp_path, tfds_dir=tmp_path)
  with pytest.raises(ValueError, match="mvtec_ad, synthetic_ad"):
    data.load("mvtec", "bottle", "train", tfds_dir=tmp_path)
  with pytest.raises(ValueError, match="train, test"):
    data.load("synthetic_ad", "texture", "validation", tfds_dir=tmp_path)
  with pytest.raises(ValueError, match="texture, object"):
    data.load("synthetic_ad", "bottle", "train", tfds_dir=tmp_path)
  assert _leftovers(tmp_path) == []


def test_missing_data_dir(tmp_path):
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(ValueError, match="no data_dir was given") as err:
    data.load("mvtec_ad", "bottle", "train", tfds_dir=tfds_dir)
  assert "mvtec.com" in str(err.value)
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError) as err:
    data.load("mvtec_ad", "bottle", "train", data_dir=missing, tfds_dir=tfds_dir)
  msg = str(err.value)
  assert str(missing) in msg and "does not exist" in msg
  assert "mvtec.com" in msg and "train/good" in msg
  assert _leftovers(tfds_dir) == []


def test_not_mvtec_shaped(tmp_path):
  root = tmp_path / "raw"
  write_mvtec(root, {"grid": SPEC["grid"]})
  tfds_dir = tmp_path / "tfds"
  # Category folder missing.
  with pytest.raises(ValueError, match="no folder for category 'bottle'") as err:
    data.load("mvtec_ad", "bottle", "train", data_dir=root, tfds_dir=tfds_dir)
  assert str(root / "bottle") in str(err.value) and "grid" in str(err.value)
  # A category folder given instead of the MVTec root.
  with pytest.raises(ValueError, match="pass its parent folder"):
    data.load("mvtec_ad", "grid", "train", data_dir=root / "grid", tfds_dir=tfds_dir)
  # The MVTec root one level further down.
  with pytest.raises(ValueError, match="one level down") as err:
    data.load("mvtec_ad", "grid", "train", data_dir=tmp_path, tfds_dir=tfds_dir)
  assert str(root) in str(err.value)
  # No train/good.
  (root / "grid" / "train" / "good").rename(root / "grid" / "train" / "ok")
  with pytest.raises(ValueError, match="no training images") as err:
    data.load("mvtec_ad", "grid", "train", data_dir=root, tfds_dir=tfds_dir)
  assert str(root / "grid" / "train" / "good") in str(err.value)
  assert _leftovers(tfds_dir) == []


def test_corrupt_png_names_file_and_leaves_nothing(tmp_path):
  root = tmp_path / "raw"
  write_mvtec(root, {"bottle": SPEC["bottle"]})
  bad = root / "bottle" / "test" / "contamination" / "001.png"
  good_bytes = bad.read_bytes()
  bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated PNG
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(ValueError, match="cannot decode") as err:
    data.load("mvtec_ad", "bottle", "test", data_dir=root, tfds_dir=tfds_dir)
  assert str(bad) in str(err.value)
  assert _leftovers(tfds_dir) == []
  # After repairing the file, the same tfds_dir builds cleanly.
  bad.write_bytes(good_bytes)
  ds = data.load("mvtec_ad", "bottle", "test", data_dir=root, tfds_dir=tfds_dir)
  assert len(ds) == sum(SPEC["bottle"][3].values())
  assert not [p for p in _leftovers(tfds_dir) if "incomplete" in p]


def test_defect_image_without_mask(tmp_path):
  root = tmp_path / "raw"
  write_mvtec(root, {"grid": SPEC["grid"]})
  mask = root / "grid" / "ground_truth" / "thread" / "001_mask.png"
  mask.unlink()
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(ValueError, match="no ground-truth mask") as err:
    data.load("mvtec_ad", "grid", "train", data_dir=root, tfds_dir=tfds_dir)
  assert str(root / "grid" / "test" / "thread" / "001.png") in str(err.value)
  assert str(mask) in str(err.value)
  assert _leftovers(tfds_dir) == []


def test_mask_of_wrong_size(tmp_path):
  root = tmp_path / "raw"
  write_mvtec(root, {"bottle": SPEC["bottle"]})
  mask = root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
  _save_png(mask, np.zeros((8, 8), np.uint8))
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(ValueError, match="8x8") as err:
    data.load("mvtec_ad", "bottle", "test", data_dir=root, tfds_dir=tfds_dir)
  assert str(mask) in str(err.value)
  assert _leftovers(tfds_dir) == []


# --- synthetic_ad ------------------------------------------------------------


def test_synthetic_generate_is_deterministic_and_complete():
  for category in data.SYNTHETIC_CATEGORIES:
    a = synthetic_ad.generate(category, seed=3, n_train=2, n_test=12, size=64)
    b = synthetic_ad.generate(category, seed=3, n_train=2, n_test=12, size=64)
    c = synthetic_ad.generate(category, seed=4, n_train=2, n_test=12, size=64)
    for split in ("train", "test"):
      assert [e["file_name"] for e in a[split]] == [e["file_name"] for e in b[split]]
      for ea, eb in zip(a[split], b[split]):
        assert np.array_equal(ea["image"], eb["image"])
        assert np.array_equal(ea["mask"], eb["mask"])
    assert not np.array_equal(a["train"][0]["image"], c["train"][0]["image"])
    assert len(a["train"]) == 2 and len(a["test"]) == 12
    names = [e["file_name"] for e in a["test"]]
    assert names == sorted(names)
    types = [e["defect_type"] for e in a["test"]]
    assert set(types) == set(data.SYNTHETIC_DEFECTS[category]) | {"good"}
    assert types.count("good") == 6
    for e in a["train"] + a["test"]:
      assert e["image"].shape == (64, 64, 3) and e["image"].dtype == np.uint8
      assert e["mask"].shape == (64, 64) and e["mask"].dtype == np.uint8
      assert set(np.unique(e["mask"])) <= {0, 255}
      assert e["label"] == int(e["defect_type"] != "good")
      assert e["mask"].any() == bool(e["label"])


def test_synthetic_defects_are_where_their_masks_are():
  # Each defect image has a defect-free twin (same pose, lighting and noise):
  # the defect changes pixels inside its mask, and most of the change lies in
  # the mask grown by two pixels. 'deformed' reshapes the whole nut, so only
  # the first part applies to it.
  for category in data.SYNTHETIC_CATEGORIES:
    for defect in data.SYNTHETIC_DEFECTS[category]:
      for index in range(3):
        args = (category, defect, 7, "test", index, synthetic_ad.DEFAULT_SIZE)
        image, mask = synthetic_ad.draw_example(*args)
        twin, twin_mask = synthetic_ad.draw_example(*args, with_defect=False)
        assert not twin_mask.any()
        inside = mask > 0
        assert 0 < inside.mean() < 0.1, args
        change = np.abs(image.astype(int) - twin.astype(int)).sum(-1)
        assert change[inside].mean() > 2.0, args
        if defect != "deformed":
          near = ndimage.binary_dilation(inside, iterations=2)
          assert change[near].sum() >= 0.6 * change.sum(), args


def test_synthetic_builder_twice_gives_identical_data(tmp_path):
  cfg = lambda seed: synthetic_ad.SyntheticAdConfig(
    name=f"tiny_object_{seed}", category="object", seed=seed, n_train=3, n_test=10, size=64
  )
  download = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  splits = []
  for d, seed in (("a", 0), ("b", 0), ("c", 1)):
    builder = synthetic_ad.SyntheticAd(
      config=cfg(seed), data_dir=tmp_path / d, file_format="array_record"
    )
    builder.download_and_prepare(download_config=download)
    splits.append(data.Split.from_builder(builder, "test"))
  a, b, c = splits
  assert a.fingerprint == b.fingerprint != c.fingerprint
  assert a.category == "object"
  ref = synthetic_ad.generate("object", seed=0, n_train=3, n_test=10, size=64)["test"]
  assert a.file_names == [e["file_name"] for e in ref]
  for i, e in enumerate(ref):
    ea, eb = a[i], b[i]
    assert np.array_equal(ea["image"], e["image"]) and np.array_equal(eb["image"], e["image"])
    assert np.array_equal(ea["mask"], e["mask"]) and np.array_equal(eb["mask"], e["mask"])
    assert ea["label"] == e["label"] and ea["defect_type"] == e["defect_type"]
  raw_a = [f.read_bytes() for f in sorted((tmp_path / "a").rglob("*.array_record*"))]
  raw_b = [f.read_bytes() for f in sorted((tmp_path / "b").rglob("*.array_record*"))]
  assert raw_a and raw_a == raw_b


def test_synthetic_load_default_config(tmp_path):
  ds = data.load("synthetic_ad", "texture", "test", tfds_dir=tmp_path)
  assert len(ds) == synthetic_ad.DEFAULT_N_TEST
  assert int((ds.labels == 0).sum()) == synthetic_ad.DEFAULT_N_TEST // 2
  assert set(ds.defect_types) == {"good", *data.SYNTHETIC_DEFECTS["texture"]}
  ex = ds[0]
  assert ex["image"].shape == (synthetic_ad.DEFAULT_SIZE,) * 2 + (3,)
  train = data.load("synthetic_ad", "texture", "train", tfds_dir=tmp_path)
  assert len(train) == synthetic_ad.DEFAULT_N_TRAIN and not train.labels.any()


def test_leftovers_of_killed_builds_and_outdated_generated_data_are_rebuilt(tmp_path):
  """A killed build's incomplete.* folder is removed; synthetic data of an older format rebuilt."""
  import json

  first = data.load("synthetic_ad", "texture", "test", tfds_dir=tmp_path)
  version_dir = tmp_path / "synthetic_ad" / "texture" / "1.0.0"
  leftover = version_dir.parent / "incomplete.ABC123_1.0.0"
  leftover.mkdir()
  (leftover / "synthetic_ad-train.array_record-00000-of-00001").write_bytes(b"half")
  meta = json.loads((version_dir / "metadata.json").read_text())
  meta["format"] = 1  # as written by an older jax_gad
  (version_dir / "metadata.json").write_text(json.dumps(meta))
  again = data.load("synthetic_ad", "texture", "test", tfds_dir=tmp_path)
  assert not leftover.exists()
  assert json.loads((version_dir / "metadata.json").read_text())["format"] == 2
  assert again.fingerprint == first.fingerprint  # the same generated data


def test_synthetic_bad_arguments():
  with pytest.raises(ValueError, match="texture, object"):
    synthetic_ad.generate("carpet")
  with pytest.raises(ValueError, match="size"):
    synthetic_ad.generate("texture", size=32)
  with pytest.raises(ValueError, match="n_train"):
    synthetic_ad.generate("texture", n_train=0)


# --- no TensorFlow, no torch -----------------------------------------------


def test_build_and_read_without_tensorflow_or_torch(tmp_path):
  root = tmp_path / "raw"
  write_mvtec(root, {"grid": SPEC["grid"]})
  code = textwrap.dedent(f"""
      import sys
      import jax_gad.data as data
      ds = data.load("mvtec_ad", "grid", "test", data_dir={str(root)!r},
                     tfds_dir={str(tmp_path / "tfds")!r})
      ex = ds[0]
      assert ex["image"].shape[-1] == 3
      bad = sorted(m for m in sys.modules
                   if m.split(".")[0] in ("tensorflow", "torch"))
      assert not bad, bad
      print("ok")
  """)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  res = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.strip().endswith("ok")


@pytest.mark.parametrize("setting", [True, False])
def test_tfds_progress_bars_are_off_during_a_build_and_restored_after(setting):
  state = tfds.core.utils.tqdm_utils
  tfds.display_progress_bar(setting)
  try:
    with loader._no_tfds_progress_bars():
      assert state._active is False
    assert state._active is setting
    with pytest.raises(RuntimeError), loader._no_tfds_progress_bars():
      raise RuntimeError("a failed build")
    assert state._active is setting
  finally:
    tfds.display_progress_bar(True)
