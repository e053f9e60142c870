"""Tests for python -m jax_gad.export and its loader: scores equal predict's, without jax_gad."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import jax_gad
from jax_gad import backbone as backbone_lib
from jax_gad import checkpoint as ckpt
from jax_gad import config, data, export, export_loader, files, fitting, predict
from jax_gad import detector as detector_lib
from jax_gad.data import pipeline, preprocess

ARCH = "efficientnet-lite0"
SIZE = 64
LEVELS = (3, 5, 8)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return backbone_lib.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, checkpoint):
  """A detector fitted on the synthetic set's texture category, saved as the fit command does."""
  work = tmp_path_factory.mktemp("fit")
  det_path = work / "det.jgd"
  options = dict(
    output=str(det_path),
    category="texture",
    dataset="synthetic_ad",
    tfds_dir=str(work / "tfds"),
    arch=ARCH,
    checkpoint=checkpoint,
    image_size=SIZE,
    levels=LEVELS,
    batch_size=8,
    cache_dir="",  # no feature cache under ~
  )
  fitting.fit_and_save(config.from_flat(config.Fit, options), progress=False)
  return det_path, work / "tfds"


def _export(detector, output, checkpoint):
  """export.command as the CLI runs it."""
  options = dict(detector=str(detector), output=str(output), checkpoint=str(checkpoint))
  return export.command(config.from_flat(config.Export, options))


def _resized(image):
  return np.round(preprocess.resize_bilinear(image, SIZE)).astype(np.uint8)


@pytest.fixture(scope="module")
def images(fitted):
  """8 synthetic test images (good and defective) at the detector's size."""
  test = data.load("synthetic_ad", "texture", "test", tfds_dir=fitted[1])
  labels = np.array([test[i]["label"] for i in range(len(test))])
  picks = list(np.flatnonzero(labels == 0)[:4]) + list(np.flatnonzero(labels == 1)[:4])
  return np.stack([_resized(test[int(i)]["image"]) for i in picks])


@pytest.fixture(scope="module")
def detector_path(fitted, checkpoint, images):
  """The fitted detector, its threshold moved between the 4th and 5th score of ``images``.

  At 64 px the calibrated threshold lies above every test score; moved into the
  middle, both decisions occur, so a flipped comparison in the export would show.
  """
  det = jax_gad.load_detector(fitted[0], checkpoint=checkpoint)
  total = np.sort(det.score(list(images)).total)
  path = fitted[0].parent / "det_mid.jgd"
  # The file's header is checked against its stored out-of-fold scores: scale those so
  # that their calibrated quantile is the moved threshold.
  scores = np.asarray(det.calibration_scores) * ((total[3] + total[4]) / 2 / det.threshold)
  threshold = detector_lib.calibrated_threshold(scores, det.target_fpr)
  assert total[3] < threshold < total[4]
  det.replace(calibration_scores=scores, threshold=threshold).save(path)
  return path


@pytest.fixture(scope="module")
def exported(detector_path, checkpoint, tmp_path_factory):
  """The export of ``detector_path``, written by the command line in a subprocess."""
  out = tmp_path_factory.mktemp("export") / "scorer"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.export",
      f"--detector={detector_path}",
      f"--output={out}",
      f"--checkpoint={checkpoint}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"wrote {out}" in proc.stdout
  return out


# The loader in a fresh interpreter: -I drops PYTHONPATH, the user site and the script folder
# (-B: no __pycache__ in the export),
# and jax_gad is blocked outright, so the export must score with jax and numpy alone.
_LOADER_RUN = """
import json, sys
sys.modules["jax_gad"] = None
try:
  import jax_gad
  raise SystemExit("jax_gad was importable")
except ImportError:
  pass
import numpy as np
sys.path.insert(0, sys.argv[1])
import load
score = load.load(sys.argv[1])
images = np.load(sys.argv[2])
out = {}
for name, batch in (("one", images[:1]), ("seven", images[1:8])):
  r = score(batch)
  out[name] = {k: v.tolist() for k, v in r.items()}
out["modules"] = sorted(m for m, v in sys.modules.items() if m.startswith("jax_gad") and v)
print(json.dumps(out))
"""


def test_export_scores_like_predict_without_jax_gad(
  detector_path, checkpoint, exported, images, tmp_path
):
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:02d}.png")
  csv_path = tmp_path / "scores.csv"
  options = dict(
    detector=str(detector_path),
    input=str(folder),
    output=str(csv_path),
    checkpoint=checkpoint,
    batch_size=8,
  )
  det, _ = predict.command(config.from_flat(config.Predict, options), progress=False)
  with open(csv_path, newline="") as f:
    rows = sorted(csv.DictReader(f), key=lambda r: r["path"])
  total = np.array([float(r["total"]) for r in rows])
  per_level = np.array([[float(r[f"level_{l}"]) for l in LEVELS] for r in rows])
  decision = [r["decision"] for r in rows]
  assert set(decision) == {"normal", "anomalous"}, decision  # see detector_path

  np.save(tmp_path / "images.npy", images)
  proc = subprocess.run(
    [sys.executable, "-I", "-B", "-c", _LOADER_RUN, str(exported), str(tmp_path / "images.npy")],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["modules"] == []
  got_total = np.array(out["one"]["total"] + out["seven"]["total"])
  got_levels = np.array(out["one"]["per_level"] + out["seven"]["per_level"])
  got_decision = ["anomalous" if a else "normal" for a in out["one"]["anomalous"]]
  got_decision += ["anomalous" if a else "normal" for a in out["seven"]["anomalous"]]
  assert len(out["one"]["total"]) == 1 and len(out["seven"]["total"]) == 7
  assert np.max(np.abs(got_total - total) / np.abs(total)) <= 1e-5
  assert np.max(np.abs(got_levels - per_level) / np.abs(per_level)) <= 1e-5
  assert got_decision == decision
  assert det.threshold == json.loads((exported / "manifest.json").read_text())["threshold"]


def test_manifest_and_files(detector_path, exported):
  manifest = json.loads((exported / "manifest.json").read_text())
  det = detector_lib.read_detector(detector_path)
  assert sorted(os.listdir(exported)) == ["load.py", "manifest.json", "scorer.jaxexport"]
  assert manifest["input"]["shape"] == ["n", SIZE, SIZE, 3]
  assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["channel_order"] == "RGB"
  assert manifest["input"]["mean"] == list(det.mean) and manifest["input"]["std"] == list(det.std)
  assert manifest["levels"] == list(LEVELS) and manifest["threshold"] == det.threshold
  assert manifest["versions"] == jax_gad.versions()
  assert manifest["platforms"] == [jax.default_backend()]
  assert manifest["detector_sha256"] == files.sha256(detector_path)
  assert manifest["checkpoint_sha256"] == det.checkpoint_sha256
  import hashlib

  for name in ("load.py", "scorer.jaxexport"):
    assert manifest["sha256"][name] == hashlib.sha256((exported / name).read_bytes()).hexdigest()
  with open(export_loader.__file__, "rb") as f:
    assert (exported / "load.py").read_bytes() == f.read()


def test_loader_command_line(exported, images, tmp_path):
  np.save(tmp_path / "x.npy", images[3:5])
  proc = subprocess.run(
    [sys.executable, "-I", str(exported / "load.py"), str(exported), str(tmp_path / "x.npy")],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  result = export_loader.load(str(exported))(images[3:5])
  assert lines == [
    f"{t!r} {'anomalous' if a else 'normal'}" for t, a in zip(result["total"], result["anomalous"])
  ]


@pytest.mark.parametrize(
  "shape, dtype",
  [((1, 32, 32, 3), np.uint8), ((2, SIZE, SIZE, 3), np.float32), ((SIZE, SIZE, 3), np.uint8)]
  + [((0, SIZE, SIZE, 3), np.uint8), ((1, SIZE, SIZE, 4), np.uint8)],
)
def test_loader_refuses_wrong_size_or_dtype(exported, shape, dtype):
  score = export_loader.load(str(exported))
  with pytest.raises(ValueError) as err:
    score(np.zeros(shape, dtype))
  msg = str(err.value)
  assert f"must be uint8 of shape (n, {SIZE}, {SIZE}, 3)" in msg and str(shape) in msg
  assert "\n" not in msg


@pytest.mark.parametrize("name", ["scorer.jaxexport", "load.py"])
def test_loader_refuses_a_changed_file(exported, tmp_path, name):
  copy = tmp_path / "copy"
  shutil.copytree(exported, copy)
  with open(copy / name, "ab") as f:
    f.write(b"\n")
  with pytest.raises(ValueError, match="sha256 differs from manifest.json") as err:
    export_loader.load(str(copy))
  assert str(copy / name) in str(err.value)


def test_refuses_a_folder_that_is_not_empty(fitted, checkpoint, tmp_path):
  (tmp_path / "old.txt").write_text("keep")
  with pytest.raises(ValueError, match="is a folder that is not empty") as err:
    _export(fitted[0], tmp_path, checkpoint)
  assert f"--output={tmp_path}" in str(err.value)
  assert os.listdir(tmp_path) == ["old.txt"]


def test_refuses_a_file_as_output(fitted, checkpoint, tmp_path):
  (tmp_path / "f").write_text("keep")
  with pytest.raises(ValueError, match="is a file"):
    _export(fitted[0], tmp_path / "f", checkpoint)
  assert (tmp_path / "f").read_text() == "keep"


def test_missing_or_changed_checkpoint_refused(fitted, checkpoint, tmp_path):
  with pytest.raises(ValueError, match="does not exist") as err:
    _export(fitted[0], tmp_path / "a", tmp_path / "none.msgpack")
  assert f"--checkpoint={tmp_path / 'none.msgpack'}" in str(err.value)
  variables, meta = ckpt.load_checkpoint(checkpoint, arch=ARCH)
  other = tmp_path / "other.msgpack"
  ckpt.save_checkpoint(other, variables, dict(meta, source="a different conversion"))
  with pytest.raises(ValueError, match="sha256") as err:
    _export(fitted[0], tmp_path / "b", other)
  assert f"--detector={fitted[0]}" in str(err.value) and str(other) in str(err.value)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_empty_output_folder_is_filled(fitted, checkpoint, tmp_path):
  det = jax_gad.load_detector(fitted[0], checkpoint=checkpoint)
  det = det.replace(levels=(8,), states=det.states[2:], projections=det.projections[2:])
  export.write(det, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["load.py", "manifest.json", "scorer.jaxexport"]


def test_projection_levels_score_like_the_detector(fitted, checkpoint):
  """An NPCA detector (a projection before each Gaussian), scored in process."""
  det = jax_gad.load_detector(fitted[0], checkpoint=checkpoint)
  train = data.load("synthetic_ad", "texture", "train", tfds_dir=fitted[1])
  feats = pipeline.pooled_features(
    det.extractor(8), train, image_size=SIZE, mean=det.mean, std=det.std, progress=False
  )
  npca = detector_lib.fit_features(
    feats,
    levels=det.levels,
    reduction={"mode": "npca", "threshold": 0.99},
    arch=det.arch,
    checkpoint_sha256=det.checkpoint_sha256,
    image_size=SIZE,
    mean=det.mean,
    std=det.std,
  ).replace(backbone=det.backbone)
  assert all(p is not None for p in npca.projections)
  x = np.stack([_resized(train[i]["image"]) for i in range(5)])
  got = export.scoring_function(npca)(x)
  want = npca.score(list(x))
  np.testing.assert_allclose(np.asarray(got["per_level"]), want.per_level, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got["anomalous"]), want.total > npca.threshold)


def test_docs_show_the_loader_as_it_is():
  with open(os.path.join(REPO, "docs", "export.md"), encoding="utf-8") as f:
    block = f.read().split("```python\n", 1)[1].split("```", 1)[0]
  with open(export_loader.__file__, encoding="utf-8") as f:
    assert block in f.read()


def test_command_line_error_is_one_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.export",
      f"--detector={tmp_path / 'none.jgd'}",
      f"--output={tmp_path / 'out'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    f"jax_gad.export: error: --detector={tmp_path / 'none.jgd'} does not exist"
  )
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
  "options, message",
  [
    ({"output": "out"}, "--detector is required"),
    ({"detector": "d.jgd"}, "--output is required"),
  ],
)
def test_export_config_needs_a_detector_and_an_output(options, message):
  with pytest.raises(ValueError, match=message):
    export.command(config.from_flat(config.Export, options))
