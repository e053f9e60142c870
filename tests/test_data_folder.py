"""Tests for the ``folder`` dataset: formats, optional masks, staleness, integrity, build lock."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import jax_gad.data as data
from jax_gad.data import folder, loader

CATEGORY = "my-parts_v2"  # not an MVTec name
SIZE = (12, 10)  # (H, W)


def _rgb(rng):
  return rng.integers(0, 256, SIZE + (3,), dtype=np.uint8)


def write_folder(
  root, category=CATEGORY, n_train=4, test=(("good", 2), ("scratch", 2)), masks=False, seed=0
):
  """A tiny folder category of RGB PNGs; returns {file_name: rgb array}."""
  rng = np.random.default_rng(seed)
  out = {}
  cat = root / category
  for rel in [f"train/good/{i:02d}.png" for i in range(n_train)] + [
    f"test/{d}/{i:02d}.png" for d, n in test for i in range(n)
  ]:
    path = cat / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _rgb(rng)
    Image.fromarray(img).save(path)
    out[rel] = img
    if masks and rel.startswith("test/") and "/good/" not in rel:
      defect = rel.split("/")[1]
      m = np.zeros(SIZE, np.uint8)
      m[2:5, 3:6] = 1  # non-zero means defect
      mpath = cat / "ground_truth" / defect / (os.path.basename(rel)[:-4] + "_mask.png")
      mpath.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(m).save(mpath)
  return out


def _all(split):
  return {ex["file_name"]: ex for ex in split}


def test_custom_name_no_masks_counts_and_pixels(tmp_path):
  expected = write_folder(tmp_path / "raw")
  train = data.load(
    "folder", CATEGORY, "train", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds"
  )
  test = data.load(
    "folder", CATEGORY, "test", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds"
  )
  assert train.counts == {"good": 4, "defect": 0}
  assert test.counts == {"good": 2, "defect": 2}
  assert test.file_names == sorted(test.file_names)
  assert list(test.labels) == [0, 0, 1, 1]
  assert not train.has_masks and not test.has_masks
  with pytest.raises(ValueError, match="no ground-truth masks") as err:
    test.require_masks()
  assert CATEGORY in str(err.value)
  for split in (train, test):
    for name, ex in _all(split).items():
      np.testing.assert_array_equal(ex["image"], expected[name])
      assert not ex["mask"].any()
  assert train.fingerprint != test.fingerprint
  assert CATEGORY in data.CATEGORIES["folder"] and "a/b" not in data.CATEGORIES["folder"]


def test_masks_when_ground_truth_exists(tmp_path):
  write_folder(tmp_path / "raw", masks=True)
  test = data.load(
    "folder", CATEGORY, "test", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds"
  )
  assert test.has_masks
  test.require_masks()
  for ex in test:
    ref = np.zeros(SIZE, np.uint8)
    if ex["label"]:
      ref[2:5, 3:6] = 255
    np.testing.assert_array_equal(ex["mask"], ref)


def test_image_formats_documented_conversion(tmp_path):
  root = tmp_path / "raw"
  write_folder(root, test=())
  rng = np.random.default_rng(1)
  good = root / CATEGORY / "train" / "good"
  rgb = _rgb(rng)
  gray = rng.integers(0, 256, SIZE, dtype=np.uint8)
  rgba = rng.integers(0, 256, SIZE + (4,), dtype=np.uint8)
  g16 = rng.integers(0, 65536, SIZE, dtype=np.uint16)
  Image.fromarray(rgb).save(good / "a.bmp")
  Image.fromarray(rgb).save(good / "b.TIFF")
  Image.fromarray(gray).save(good / "c.png")
  Image.fromarray(rgba).save(good / "d.png")
  Image.fromarray(g16).save(good / "e.png")
  Image.fromarray(g16).save(good / "e2.tif")
  Image.fromarray(rgb).save(good / "f.jpg", quality=95)
  (good / "notes.txt").write_text("not an image")  # ignored
  (good / ".hidden.png").write_bytes(b"")  # ignored
  got = _all(data.load("folder", CATEGORY, "train", data_dir=root, tfds_dir=tmp_path / "tfds"))
  assert "train/good/notes.txt" not in got and "train/good/.hidden.png" not in got
  # Independent expectations (numpy, not the module's code path).
  ref16 = np.floor(g16.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
  expect = {
    "a.bmp": rgb,
    "b.TIFF": rgb,
    "c.png": np.stack([gray] * 3, -1),
    "d.png": rgba[..., :3],
    "e.png": np.stack([ref16] * 3, -1),
    "e2.tif": np.stack([ref16] * 3, -1),
    "f.jpg": np.asarray(Image.open(good / "f.jpg")),  # what the JPEG decoder gives
  }
  for name, ref in expect.items():
    np.testing.assert_array_equal(got[f"train/good/{name}"]["image"], ref, err_msg=name)


def test_no_test_folder_fits_but_has_no_test_split(tmp_path):
  write_folder(tmp_path / "raw", test=())
  train = data.load(
    "folder", CATEGORY, "train", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds"
  )
  assert len(train) == 4
  with pytest.raises(ValueError, match="no test images"):
    data.load("folder", CATEGORY, "test", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds")


def _bad(kind, root):
  """Breaks a fresh folder one way; returns the text the error must contain."""
  write_folder(root, masks=kind == "mask size")
  cat = root / CATEGORY
  if kind == "no train/good":
    (cat / "train" / "good").rename(cat / "train" / "ok")
    return str(cat / "train" / "good")
  if kind == "zero-byte":
    (cat / "test" / "scratch" / "01.png").write_bytes(b"")
    return str(cat / "test" / "scratch" / "01.png")
  if kind == "corrupt":
    p = cat / "train" / "good" / "02.png"
    p.write_bytes(p.read_bytes()[:40])
    return str(p)
  if kind == "not an image":
    p = cat / "train" / "good" / "03.jpg"
    p.write_bytes(b"hello, I am text")
    return str(p)
  if kind == "unsupported mode":
    p = cat / "train" / "good" / "04.tif"
    Image.fromarray(np.zeros(SIZE, np.float32)).save(p)  # 32-bit float TIFF
    return str(p)
  if kind == "mask size":
    m = cat / "ground_truth" / "scratch" / "00_mask.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(m)
    return f"{m} is 5x5 but its image {cat / 'test' / 'scratch' / '00.png'}"
  if kind == "mask missing":
    write_folder(root, masks=True)
    os.remove(cat / "ground_truth" / "scratch" / "01_mask.png")
    return str(cat / "test" / "scratch" / "01.png")
  raise AssertionError(kind)


@pytest.mark.parametrize(
  "kind",
  [
    "no train/good",
    "zero-byte",
    "corrupt",
    "not an image",
    "unsupported mode",
    "mask size",
    "mask missing",
  ],
)
def test_bad_raw_folder_names_the_file(kind, tmp_path):
  expected = _bad(kind, tmp_path / "raw")
  with pytest.raises(ValueError) as err:
    data.load("folder", CATEGORY, "train", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds")
  msg = str(err.value)
  assert expected in msg
  assert "BytesIO" not in msg and "incomplete" not in msg
  # Nothing prepared: no dataset_info.json anywhere.
  assert (
    not list((tmp_path / "tfds").rglob("dataset_info.json"))
    if (tmp_path / "tfds").exists()
    else True
  )


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "sp ace"])
def test_bad_category_name(name, tmp_path):
  with pytest.raises(ValueError, match="folder category"):
    data.load("folder", name, "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")


def test_changed_raw_folder_is_prepared_again(tmp_path):
  root, tfds_dir = tmp_path / "raw", tmp_path / "tfds"
  write_folder(root)
  load = lambda split: data.load("folder", CATEGORY, split, data_dir=root, tfds_dir=tfds_dir)
  first = load("test")
  again = load("test")
  assert again.prepared_dir == first.prepared_dir and again.fingerprint == first.fingerprint
  good = root / CATEGORY / "test" / "good"
  # Added image.
  Image.fromarray(np.full(SIZE + (3,), 7, np.uint8)).save(good / "09.png")
  added = load("test")
  assert added.counts == {"good": 3, "defect": 2} and added.prepared_dir != first.prepared_dir
  # Removed image.
  os.remove(root / CATEGORY / "test" / "scratch" / "00.png")
  removed = load("test")
  assert removed.counts == {"good": 3, "defect": 1}
  # Replaced image (same name): new pixels are read, not the old prepared ones.
  new = np.full(SIZE + (3,), 200, np.uint8)
  time.sleep(0.01)
  Image.fromarray(new).save(good / "00.png")
  replaced = load("test")
  assert replaced.file_names == removed.file_names
  assert replaced.fingerprint != removed.fingerprint
  np.testing.assert_array_equal(replaced[0]["image"], new)
  # The same images in another folder: separate prepared data, same content fingerprint.
  other = tmp_path / "copy"
  write_folder(other)
  a = data.load("folder", CATEGORY, "train", data_dir=root, tfds_dir=tfds_dir)
  b = data.load("folder", CATEGORY, "train", data_dir=other, tfds_dir=tfds_dir)
  assert a.prepared_dir != b.prepared_dir
  assert a.fingerprint == b.fingerprint  # identical content: shared feature-cache entries


def test_mvtec_ad_is_keyed_on_its_raw_folder_too(tmp_path):
  from fakes import write_mvtec

  root = write_mvtec(
    tmp_path / "mvtec",
    categories=(("bottle", "rgb"),),
    n_train=3,
    n_good_test=1,
    defects=(("crack", 1),),
    size=16,
  )
  before = data.load("mvtec_ad", "bottle", "train", data_dir=root, tfds_dir=tmp_path / "tfds")
  os.remove(os.path.join(root, "bottle", "train", "good", "000.png"))
  after = data.load("mvtec_ad", "bottle", "train", data_dir=root, tfds_dir=tmp_path / "tfds")
  assert (len(before), len(after)) == (3, 2)
  assert before.prepared_dir != after.prepared_dir


# --- damaged prepared data ------------------------------------------------------------


def _prepared(tmp_path):
  write_folder(tmp_path / "raw")
  split = data.load(
    "folder", CATEGORY, "test", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds"
  )
  shards = sorted(p for p in os.listdir(split.prepared_dir) if "-test.array_record" in p)
  return split, [os.path.join(split.prepared_dir, p) for p in shards]


def _reload(tmp_path):
  split = data.load(
    "folder", CATEGORY, "test", data_dir=tmp_path / "raw", tfds_dir=tmp_path / "tfds"
  )
  return [split[i] for i in range(len(split))]


def _check_damage_message(err, split):
  msg = str(err.value)
  assert "damaged" in msg and split.prepared_dir in msg and "rm -r" in msg
  assert "\n" not in msg


@pytest.mark.parametrize(
  "damage",
  [
    "truncated",
    "deleted",
    "overwritten same size",
    "replaced by train split",
    "integrity record removed",
  ],
)
def test_damaged_prepared_split_is_refused(damage, tmp_path):
  split, shards = _prepared(tmp_path)
  shard = shards[0]
  if damage == "truncated":
    with open(shard, "r+b") as f:
      f.truncate(os.path.getsize(shard) - 100)
  elif damage == "deleted":
    os.remove(shard)
  elif damage == "overwritten same size":
    blob = bytearray(open(shard, "rb").read())
    # Flip bytes inside a stored PNG (records are stored uncompressed; the file is padded).
    start = blob.find(b"IDAT")
    assert start > 0
    for i in range(start, start + 16):
      blob[i] ^= 0xFF
    open(shard, "wb").write(bytes(blob))
  elif damage == "replaced by train split":
    train_shard = shard.replace("-test.array_record", "-train.array_record")
    blob = open(train_shard, "rb").read()
    open(shard, "wb").write(blob)
    # Even with the recorded size forged to match, the records are refused.
    import json

    rec = os.path.join(split.prepared_dir, "jax_gad_integrity.json")
    doc = json.load(open(rec))
    doc["files"][os.path.basename(shard)] = len(blob)
    open(rec, "w").write(json.dumps(doc))
  elif damage == "integrity record removed":
    os.remove(os.path.join(split.prepared_dir, "jax_gad_integrity.json"))
  with pytest.raises(data.DamagedDatasetError) as err:
    _reload(tmp_path)
  _check_damage_message(err, split)


def test_damaged_dataset_rebuilt_after_following_the_message(tmp_path):
  import shutil

  split, shards = _prepared(tmp_path)
  os.remove(shards[0])
  with pytest.raises(data.DamagedDatasetError):
    _reload(tmp_path)
  shutil.rmtree(split.prepared_dir)
  assert len(_reload(tmp_path)) == len(split)


# --- two runs building the same dataset at once ----------------------------------------


_CHILD = textwrap.dedent("""
    import jax_gad.data as data
    s = data.load("folder", {category!r}, "test", data_dir={root!r}, tfds_dir={tfds!r})
    print("RESULT", s.prepared_dir, len(s), s.fingerprint)
""")


def _child(tmp_path):
  env = dict(os.environ)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
    [repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  code = _CHILD.format(category=CATEGORY, root=str(tmp_path / "raw"), tfds=str(tmp_path / "tfds"))
  return subprocess.Popen(
    [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
  )


def test_second_build_waits_for_the_lock_and_reuses(tmp_path):
  write_folder(tmp_path / "raw", n_train=6)
  layout = folder.Folder.scan(tmp_path / "raw", CATEGORY)
  builder = folder.Folder(
    config=folder.make_config(folder.FolderConfig, layout, CATEGORY),
    data_dir=str(tmp_path / "tfds"),
    file_format="array_record",
  )
  with loader.build_lock(builder):
    proc = _child(tmp_path)
    time.sleep(8)  # ample time for the child to import and reach the lock
    assert proc.poll() is None, proc.communicate()  # it waits while we hold the lock
    # Build it ourselves while holding the lock (what the first run does).
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
    )
  out, errs = proc.communicate(timeout=300)
  assert proc.returncode == 0, errs[-2000:]
  assert "Downloading and preparing" not in out + errs  # reused, not rebuilt
  line = [l for l in out.splitlines() if l.startswith("RESULT")][0].split()
  assert line[1] == os.fspath(builder.data_dir) and int(line[2]) == 4


def test_two_concurrent_builds_both_succeed(tmp_path):
  write_folder(tmp_path / "raw", n_train=30)
  procs = [_child(tmp_path) for _ in range(2)]
  results = []
  for p in procs:
    out, errs = p.communicate(timeout=300)
    assert p.returncode == 0, errs[-2000:]
    results.append([l for l in out.splitlines() if l.startswith("RESULT")][0])
  assert results[0] == results[1]
  tfds = tmp_path / "tfds"
  assert not [p for p in tfds.rglob("*") if "incomplete" in p.name]


def test_synthetic_without_test_images(tmp_path):
  from jax_gad.data import synthetic_ad

  cfg = synthetic_ad.SyntheticAdConfig(
    name="train_only", category="object", n_train=3, n_test=0, size=64
  )
  builder = synthetic_ad.SyntheticAd(config=cfg, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  assert len(data.Split.from_builder(builder, "train")) == 3
  with pytest.raises(ValueError, match="no test images"):
    data.Split.from_builder(builder, "test")


def test_fingerprint_sees_a_rewritten_image_of_the_same_size(tmp_path):
  write_folder(tmp_path / "raw")
  before = folder.raw_fingerprint(folder.scan(tmp_path / "raw", CATEGORY))
  path = tmp_path / "raw" / CATEGORY / "train" / "good" / "00.png"
  blob = bytearray(path.read_bytes())
  blob[-20] ^= 0xFF  # same size, other bytes
  st = path.stat()
  path.write_bytes(bytes(blob))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # written 5 s later
  assert path.stat().st_size == st.st_size
  after = folder.raw_fingerprint(folder.scan(tmp_path / "raw", CATEGORY))
  assert after != before


def test_fingerprint_sees_another_folder_with_the_same_files_and_times(tmp_path):
  import shutil

  write_folder(tmp_path / "a")
  shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)  # cp -p
  fa = folder.raw_fingerprint(folder.scan(tmp_path / "a", CATEGORY))
  fb = folder.raw_fingerprint(folder.scan(tmp_path / "b", CATEGORY))
  assert fa != fb
  # The same folder through a symlink is the same raw data.
  (tmp_path / "link").symlink_to(tmp_path / "a")
  assert folder.raw_fingerprint(folder.scan(tmp_path / "link", CATEGORY)) == fa


@pytest.mark.parametrize(
  "values,notes",
  [
    ([0, 255], []),
    ([0, 1], []),  # binary: 0 and the mask's maximum
    ([0, 3, 255], ["non_binary"]),
    ([0, 0], ["empty"]),
  ],
)
def test_mask_notes_rule(values, notes):
  assert folder.mask_notes(np.asarray(values, np.uint8).reshape(1, -1)) == notes


def test_32_bit_integer_pixels_are_16_bit_only_in_a_png():
  # Older Pillow opens 16-bit gray PNG as mode "I"; in a TIFF "I" is 32-bit and is refused.
  values = np.array([[0, 257, 65535]], np.int32)
  image = Image.fromarray(values)
  assert image.mode == "I"
  image.format = "PNG"
  np.testing.assert_array_equal(folder.to_rgb8(image, "x.png")[..., 0], [[0, 1, 255]])
  image.format = "TIFF"
  with pytest.raises(ValueError, match=r"x.tif has 32-bit integer pixels \(mode 'I'\)"):
    folder.to_rgb8(image, "x.tif")
