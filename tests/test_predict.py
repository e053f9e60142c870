"""Tests for python -m jax_gad.predict: fit + predict on a custom folder, CSV, errors."""

import csv
import os
import re
import shutil
import subprocess
import sys

from fakes import write_mvtec
import numpy as np
from PIL import Image
import pytest
import tqdm.auto

import jax_gad
from jax_gad import backbone as backbone_lib
from jax_gad import config, features, fitting, metrics, predict, report

ARCH = "efficientnet-lite0"
SIZE = 64
LEVELS = (3, 5, 7, 8)
CATEGORY = "bracket"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return backbone_lib.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, checkpoint):
  """A custom-name folder without masks, fitted through the fit CLI entry point."""
  root = tmp_path_factory.mktemp("raw")
  write_mvtec(
    root,
    categories=((CATEGORY, "rgb"),),
    n_train=10,
    n_good_test=4,
    defects=(("burr", 4), ("crack", 3)),
    size=40,
    seed=3,
  )
  shutil.rmtree(root / CATEGORY / "ground_truth")
  work = tmp_path_factory.mktemp("work")
  det_path = work / "det.jgd"
  fitting.fit_and_save(
    config.from_flat(
      config.Fit,
      dict(
        output=det_path,
        category=CATEGORY,
        dataset="folder",
        data_dir=root,
        arch=ARCH,
        checkpoint=checkpoint,
        image_size=SIZE,
        levels=LEVELS,
        batch_size=8,
        tfds_dir=work / "tfds",
        cache_dir="",
      ),
    ),
    progress=False,
  )
  return root, det_path


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _predict(checkpoint, **kw):
  """predict.command as the CLI runs it; returns the lines the CLI prints."""
  cfg = config.from_flat(config.Predict, dict(checkpoint=checkpoint, batch_size=8, **kw))
  det, result = predict.command(cfg, progress=False)
  return predict.summary(det, result, kw.get("sigma"))


def test_predict_folder_equals_in_memory_scores(setup, checkpoint, tmp_path):
  root, det_path = setup
  test_dir = root / CATEGORY / "test"
  out = tmp_path / "scores.csv"
  printed = "\n".join(_predict(checkpoint, detector=det_path, input=test_dir, output=out))
  rows = _rows(out)
  paths = sorted(str(p) for p in test_dir.rglob("*.png"))
  assert [r["path"] for r in rows] == paths
  assert list(rows[0]) == ["path"] + [f"level_{l}" for l in LEVELS] + [
    "total",
    "decision",
    "threshold",
    "label",
    "defect_type",
    "error",
  ]
  det = jax_gad.load_detector(det_path, checkpoint=checkpoint)
  assert not det.has_maps  # fitted without --maps: no map statistics
  images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
  ref = det.score(images)
  got_levels = np.array([[float(r[f"level_{l}"]) for l in LEVELS] for r in rows])
  got_total = np.array([float(r["total"]) for r in rows])
  np.testing.assert_allclose(got_levels, ref.per_level, rtol=1e-6)
  np.testing.assert_allclose(got_total, ref.total, rtol=1e-6)
  assert [r["decision"] for r in rows] == [
    "anomalous" if t > det.threshold else "normal" for t in ref.total
  ]
  # MVTec test layout: AUROC and TPR/FPR printed, equal to a recomputation.
  labels = np.array([int("/good/" not in p) for p in paths])
  assert f"image AUROC {100 * metrics.auroc(ref.total, labels):.2f} %" in printed
  flagged = ref.total > det.threshold
  assert f"FPR {flagged[labels == 0].mean():.3f}" in printed


def test_predict_single_file_and_glob(setup, checkpoint, tmp_path):
  root, det_path = setup
  one = root / CATEGORY / "test" / "crack" / "001.png"
  _predict(checkpoint, detector=det_path, input=one, output=tmp_path / "a.csv")
  assert [r["path"] for r in _rows(tmp_path / "a.csv")] == [str(one)]
  assert "label" not in _rows(tmp_path / "a.csv")[0]  # one file: no folder labels
  pattern = str(root / CATEGORY / "test" / "**" / "00[01].png")
  _predict(checkpoint, detector=det_path, input=pattern, output=tmp_path / "b.csv")
  rows = _rows(tmp_path / "b.csv")
  assert len(rows) == 3 * 2
  assert {os.path.basename(r["path"]) for r in rows} == {"000.png", "001.png"}


def _bad_images(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
  (d / "1.png").write_bytes(b"")  # zero bytes
  (d / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  return d


def test_on_error_fail_writes_nothing(setup, checkpoint, tmp_path):
  _, det_path = setup
  d = _bad_images(tmp_path)
  out = tmp_path / "s.csv"
  with pytest.raises(ValueError) as err:
    _predict(checkpoint, detector=det_path, input=d, output=out)
  msg = str(err.value)
  assert str(d / "1.png") in msg and "BytesIO" not in msg and "\n" not in msg
  assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_on_error_skip_lists_the_bad_images(setup, checkpoint, tmp_path):
  _, det_path = setup
  d = _bad_images(tmp_path)
  out = tmp_path / "s.csv"
  lines = _predict(checkpoint, detector=det_path, input=d, output=out, on_error="skip")
  assert "2 skipped with errors" in lines[0]
  rows = {os.path.basename(r["path"]): r for r in _rows(out)}
  assert set(rows) == {"0.png", "1.png", "2.png"}
  assert rows["0.png"]["decision"] in ("normal", "anomalous") and not rows["0.png"]["error"]
  for bad in ("1.png", "2.png"):
    assert rows[bad]["decision"] == "error" and str(d / bad) in rows[bad]["error"]
    assert rows[bad]["total"] == ""


@pytest.mark.parametrize(
  "kind", ["empty folder", "no images", "missing", "bad sigma", "bad detector"]
)
def test_bad_input_one_line_error(kind, setup, checkpoint, tmp_path):
  _, det_path = setup
  args = {"detector": det_path, "input": tmp_path / "in"}
  (tmp_path / "in").mkdir()
  if kind == "empty folder":
    expect = "holds no images"
  elif kind == "no images":
    (tmp_path / "in" / "readme.txt").write_text("hi")
    expect = "holds no images"
  elif kind == "missing":
    args["input"] = tmp_path / "nowhere"
    expect = "does not exist"
  elif kind == "bad sigma":
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "x.png")
    args["sigma"] = 42
    expect = "sigma"
  elif kind == "bad detector":
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "x.png")
    (tmp_path / "det.jgd").write_bytes(b"\x80\x04garbage")
    args["detector"] = tmp_path / "det.jgd"
    expect = "not a jax_gad detector"
  out = tmp_path / "s.csv"
  with pytest.raises(ValueError) as err:
    _predict(checkpoint, output=out, **args)
  assert expect in str(err.value) and "\n" not in str(err.value)
  assert not out.exists()


def test_cli_exit_code_in_a_subprocess(setup, checkpoint, tmp_path):
  _, det_path = setup
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.predict",
      f"--detector={det_path}",
      f"--input={tmp_path / 'none'}",
      f"--output={tmp_path / 'o.csv'}",
      f"--checkpoint={checkpoint}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("jax_gad.predict: error:")
  assert "does not exist" in proc.stderr
  assert not (tmp_path / "o.csv").exists()


def test_operating_point_columns_summary_and_histogram(setup, checkpoint, tmp_path):
  root, det_path = setup
  det = jax_gad.load_detector(det_path, checkpoint=checkpoint)
  out = tmp_path / "s.csv"
  printed = _predict(checkpoint, detector=det_path, input=root / CATEGORY / "test", output=out)
  rows = _rows(out)
  folders = np.array([os.path.basename(os.path.dirname(r["path"])) for r in rows])
  assert set(folders) == {"good", "burr", "crack"}
  assert [r["defect_type"] for r in rows] == list(folders)
  assert [int(r["label"]) for r in rows] == [int(f != "good") for f in folders]
  assert {float(r["threshold"]) for r in rows} == {det.threshold}
  # TPR per defect type and FPR, recomputed with numpy from the CSV alone.
  total = np.array([float(r["total"]) for r in rows])
  threshold = float(rows[0]["threshold"])
  for name in np.unique(folders):
    chosen = total[folders == name]
    flagged = int(np.sum(chosen > threshold))
    what = "FPR" if name == "good" else "TPR"
    pattern = (
      rf"^  {name} +{what} {flagged / len(chosen):.3f}  \({flagged} of {len(chosen)} flagged\)$"
    )
    assert any(re.match(pattern, line) for line in printed), (pattern, printed)
  png = tmp_path / "s_histogram.png"
  assert Image.open(png).format == "PNG" and Image.open(png).size == report.HISTOGRAM_SIZE
  fitted = det_path.parent / "det_histogram.png"  # fit's: the out-of-fold scores
  assert Image.open(fitted).format == "PNG" and Image.open(fitted).size == report.HISTOGRAM_SIZE
  # --sigma: the threshold column is the one the decision used.
  _predict(checkpoint, detector=det_path, input=root / CATEGORY / "test", output=out, sigma=3)
  assert {float(r["threshold"]) for r in _rows(out)} == {det.threshold_for(3)}
  # plots=False: no histogram.
  png.unlink()
  _predict(checkpoint, detector=det_path, input=root / CATEGORY / "test", output=out, plots=False)
  assert not png.exists()


def _cli_predict(det_path, image, checkpoint, out, cache, env):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_gad.predict",
      f"--detector={det_path}",
      f"--input={image}",
      f"--output={out}",
      f"--checkpoint={checkpoint}",
      f"--compile_cache={cache}",
      "--noplots",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _counts(stdout):
  m = re.search(r"compile cache .*: (\d+) programs loaded, (\d+) compiled \((\d+) stored\)", stdout)
  assert m, stdout
  return tuple(int(g) for g in m.groups())


def test_compile_cache_second_process_loads_and_empty_flag_writes_nothing(
  setup, checkpoint, tmp_path
):
  root, det_path = setup
  image = root / CATEGORY / "test" / "good" / "000.png"
  env = dict(
    os.environ,
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    HOME=str(tmp_path / "home"),  # where the default folder would be
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "from_env"),  # '' must win over JAX's variable
  )
  cache = tmp_path / "xla"
  loaded, compiled, stored = _counts(
    _cli_predict(det_path, image, checkpoint, tmp_path / "1.csv", cache, env)
  )
  entries = sorted(n for n in os.listdir(cache) if n.endswith("-cache"))
  assert loaded == 0 and stored == len(entries) > 0 and compiled >= stored
  assert any(n.startswith("jit__pooled_levels") for n in entries)  # the extractor is stored
  loaded, compiled, stored = _counts(
    _cli_predict(det_path, image, checkpoint, tmp_path / "2.csv", cache, env)
  )
  assert loaded == len(entries) and stored == 0
  assert sorted(n for n in os.listdir(cache) if n.endswith("-cache")) == entries
  assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()
  stdout = _cli_predict(det_path, image, checkpoint, tmp_path / "3.csv", "", env)
  assert "compile cache off" in stdout
  assert not (tmp_path / "from_env").exists()
  assert not (tmp_path / "home" / ".cache" / "jax_gad" / "xla").exists()
  assert (tmp_path / "3.csv").read_bytes() == (tmp_path / "1.csv").read_bytes()


def test_fit_without_plots_writes_no_histogram(setup, checkpoint, tmp_path):
  root, _ = setup
  fitting.fit_and_save(
    config.from_flat(
      config.Fit,
      dict(
        output=tmp_path / "d.jgd",
        category=CATEGORY,
        plots=False,
        dataset="folder",
        data_dir=root,
        arch=ARCH,
        checkpoint=checkpoint,
        image_size=SIZE,
        levels=(8,),
        batch_size=8,
        tfds_dir=tmp_path / "tfds",
        cache_dir="",
      ),
    ),
    progress=False,
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jgd", "tfds"]


def test_a_histogram_that_would_overwrite_an_input_image_is_refused(setup, checkpoint, tmp_path):
  root, det_path = setup
  folder = tmp_path / "in"
  folder.mkdir()
  image = folder / "s_histogram.png"  # an input image where predict would put its histogram
  shutil.copy(root / CATEGORY / "test" / "good" / "000.png", image)
  before = image.read_bytes()
  with pytest.raises(ValueError) as err:
    _predict(checkpoint, detector=det_path, input=folder, output=folder / "s.csv")
  message = str(err.value)
  assert "\n" not in message and "the input image" in message and str(image) in message
  assert f"--output={folder / 's.csv'}" in message and "--noplots" in message
  assert not (folder / "s.csv").exists() and image.read_bytes() == before
  # --noplots: no histogram, so the same image is scored and left as it was.
  _predict(checkpoint, detector=det_path, input=folder, output=folder / "s.csv", plots=False)
  assert [r["path"] for r in _rows(folder / "s.csv")] == [str(image)]
  assert image.read_bytes() == before


def test_fit_refuses_a_histogram_that_is_its_checkpoint(setup, checkpoint, tmp_path):
  root, _ = setup
  weights = tmp_path / "d_histogram.png"  # the checkpoint, by a name fit's histogram would take
  weights.symlink_to(checkpoint)
  before = weights.read_bytes()
  options = dict(
    output=tmp_path / "d.jgd",
    category=CATEGORY,
    dataset="folder",
    data_dir=root,
    arch=ARCH,
    checkpoint=weights,
    image_size=SIZE,
    levels=(8,),
    batch_size=8,
    tfds_dir=tmp_path / "tfds",
    cache_dir="",
  )
  with pytest.raises(
    ValueError, match=r"is the checkpoint .*the histogram of --output=.*--noplots"
  ):
    fitting.fit_and_save(config.from_flat(config.Fit, options), progress=False)
  assert not (tmp_path / "d.jgd").exists() and weights.read_bytes() == before
  fitting.fit_and_save(config.from_flat(config.Fit, dict(options, plots=False)), progress=False)
  assert (tmp_path / "d.jgd").exists() and weights.read_bytes() == before


def test_a_score_equal_to_the_threshold_is_normal(setup, checkpoint, tmp_path):
  # The decision is "strictly above the threshold": put the threshold exactly on one image's
  # score (the CSV's repr round-trips the float) and score the same images again.
  root, det_path = setup
  det = jax_gad.load_detector(det_path, checkpoint=checkpoint)
  inputs = predict.find_inputs(str(root / CATEGORY / "test"))
  first = predict.predict(det, inputs, str(tmp_path / "a.csv"), batch_size=8, progress=False)
  totals = [float(r["total"]) for r in _rows(tmp_path / "a.csv")]
  assert totals == list(first.total)
  k = int(np.argsort(totals)[len(totals) // 2])
  at = det.replace(threshold=totals[k])
  again = predict.predict(at, inputs, str(tmp_path / "b.csv"), batch_size=8, progress=False)
  rows = _rows(tmp_path / "b.csv")
  assert float(rows[k]["total"]) == totals[k]
  assert rows[k]["decision"] == "normal" and not again.flagged[k]
  expect = ["anomalous" if t > totals[k] else "normal" for t in totals]
  assert [r["decision"] for r in rows] == expect and expect.count("anomalous") > 0


def test_labels_need_good_and_at_least_one_other_sub_folder(tmp_path):
  for layout, labelled in ((("good",), False), (("crack",), False), (("good", "crack"), True)):
    root = tmp_path / "_".join(layout)
    for sub in layout:
      (root / sub).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / sub / "0.png")
    inputs = predict.find_inputs(str(root))
    assert (inputs.labels is not None) == labelled, layout
    if labelled:
      assert inputs.labels == [int("/crack/" in p) for p in inputs.paths]


def test_on_error_skip_records_os_errors(tmp_path):
  # A dangling symlink: open() raises FileNotFoundError (an OSError, not a ValueError).
  (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
  source = predict._ImageFiles([str(tmp_path / "gone.png")], skip=True, image_size=8)
  example = source[0]
  assert example["image"].shape == (8, 8, 3) and not example["image"].any()
  assert str(tmp_path / "gone.png") in source.errors[0]
  strict = predict._ImageFiles([str(tmp_path / "gone.png")], skip=False, image_size=8)
  with pytest.raises(ValueError, match="gone.png"):
    strict[0]


def test_progress_bar_starts_after_the_compile(setup, checkpoint, tmp_path, monkeypatch):
  # The bar's clock starts when it is made; a compile after that would count in its rate and ETA.
  root, det_path = setup
  events = []
  compile_ = features.LevelExtractor.compile

  def compile_and_record(self):
    if self._compiled is None:
      events.append("compile")
    return compile_(self)

  class Bar(tqdm.auto.tqdm):
    def __init__(self, *args, **kwargs):
      events.append("bar")
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(features.LevelExtractor, "compile", compile_and_record)
  monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
  options = dict(detector=det_path, input=root / CATEGORY / "test", output=tmp_path / "s.csv")
  predict.command(
    config.from_flat(config.Predict, dict(options, checkpoint=checkpoint, batch_size=8)),
    progress=True,
  )
  assert events == ["compile", "bar"]
