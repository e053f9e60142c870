"""Faults a hostile user can cause, reproduced on generated data (integrity under faults).

Each test provokes one fault and checks the outcome: a clear one-line error
naming the culprit with nothing written, or a complete, correct run.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from fakes import write_mvtec
import numpy as np
from PIL import Image
import pytest

from jax_gad import checkpoint as ckpt
from jax_gad import config, data, experiment, files, main, protocol

ARCH = "efficientnet-lite0"
SIZE = 32  # the smallest input the tests use: the protocol is under test, not the network
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return ckpt.ensure_checkpoint(ARCH, str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
  return write_mvtec(tmp_path_factory.mktemp("mvtec"), categories=(("bottle", "rgb"),))


def _config(tmp_path, data, weights, **kw):
  base = dict(
    workdir=str(tmp_path / "work"),
    dataset="mvtec_ad",
    data_dir=data,
    tfds_dir=str(tmp_path / "tfds"),
    arch=ARCH,
    checkpoint=weights,
    image_size=SIZE,
    batch_size=8,
    cache_dir=None,
    plots=False,
    categories=("bottle",),
    folds=(0,),
  )
  base.update(kw)
  return config.from_flat(config.Experiment, base)


def _fit(output, category, progress=False, **options):
  """fit.command's old keyword form, as the CLI runs it now (a config.Fit)."""
  from jax_gad import fitting

  options = dict(options, output=str(output), category=category)
  return fitting.fit_and_save(config.from_flat(config.Fit, options), progress=progress)


def _predict(detector, input, output, progress=False, **options):
  """predict.command's old keyword form, as the CLI runs it now (a config.Predict)."""
  from jax_gad import predict

  options = dict(options, detector=str(detector), input=str(input), output=str(output))
  return predict.command(config.from_flat(config.Predict, options), progress=progress)


def _runs(doc):
  return {(r["category"], r["fold"], r["level"], r["distance"]): r["auroc"] for r in doc["runs"]}


# ---------------------------------------------------------------------------
# Silent wrong results
# ---------------------------------------------------------------------------


def test_results_record_the_checkpoint_sha256_data_counts_and_versions(tmp_path, mvtec, checkpoint):
  doc = experiment.run(_config(tmp_path, mvtec, checkpoint))
  assert doc["config"]["checkpoint_sha256"] == files.sha256(checkpoint)
  assert doc["data"]["bottle"]["train"] == 10
  assert doc["data"]["bottle"]["test_good"] == 4 and doc["data"]["bottle"]["test_defect"] == 6
  assert set(doc["versions"]) == {"jax_gad", "jax", "flax"}
  assert doc["warnings"] == []


def test_changed_weights_stop_the_run_before_anything_is_written(tmp_path, mvtec, checkpoint):
  variables, meta = ckpt.load_checkpoint(checkpoint, ARCH)
  bad = tmp_path / "changed.msgpack"
  ckpt.save_checkpoint(bad, variables, meta)
  blob = bytearray(bad.read_bytes())
  kernel = np.asarray(variables["params"]["stem_conv"]["kernel"], np.float32).tobytes()
  at = bytes(blob).find(kernel[:48])
  blob[at + 8 : at + 12] = np.float32(7.0).tobytes()  # one float inside the stem kernel
  bad.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=f"{bad}.*checksum"):
    experiment.run(_config(tmp_path, mvtec, str(bad)))
  assert not (tmp_path / "work").exists()


def test_single_fold_tables_show_no_sem(tmp_path, mvtec, checkpoint):
  experiment.run(_config(tmp_path, mvtec, checkpoint, distances=("l2",), levels=(7,)))
  table = (tmp_path / "work" / "table1.md").read_text()
  assert "±" not in table
  doc = json.loads((tmp_path / "work" / "results.json").read_text())
  assert doc["table1"][-1]["l2_sem"] is None


def test_degenerate_features_are_warned_about_and_recorded(tmp_path, checkpoint):
  root = tmp_path / "const"
  write_mvtec(root, categories=(("bottle", "rgb"),))
  for name in os.listdir(root / "bottle" / "train" / "good"):  # every training image the same
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "bottle/train/good" / name)
  cfg = _config(tmp_path, str(root), checkpoint, levels=(0, 8), distances=("mahalanobis",))
  with pytest.warns(protocol.DegenerateFeaturesWarning, match="bottle, fold 0, level 0"):
    doc = experiment.run(cfg)
  assert {(w["category"], w["fold"], w["level"]) for w in doc["warnings"]} == {
    ("bottle", 0, 0),
    ("bottle", 0, 8),
  }
  on_disk = json.loads((tmp_path / "work" / "results.json").read_text())
  assert on_disk["warnings"] == doc["warnings"]


# ---------------------------------------------------------------------------
# Every field of the feature-cache key
# ---------------------------------------------------------------------------

_KEYED = dict(levels=(3, 7), distances=("mahalanobis",))


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory, mvtec, checkpoint):
  """A cache holding the features of the base configuration."""
  tmp = tmp_path_factory.mktemp("filled")
  experiment.run(_config(tmp, mvtec, checkpoint, cache_dir=str(tmp / "cache"), **_KEYED))
  return tmp / "cache"


def _changed(field, tmp_path, checkpoint):
  """Overrides that change one field of the cache key."""
  if field == "image_size":
    return dict(image_size=48)
  if field == "dtype":
    return dict(dtype="bfloat16")
  if field == "depthwise":
    return dict(depthwise="xla")  # the CPU default is "shift"
  if field == "checkpoint":
    variables, meta = ckpt.load_checkpoint(checkpoint, ARCH)
    variables["params"]["head_conv"]["kernel"] = variables["params"]["head_conv"]["kernel"] * 1.5
    other = tmp_path / "other.msgpack"
    ckpt.save_checkpoint(other, variables, meta)
    return dict(checkpoint=str(other))
  if field == "data":
    other = write_mvtec(tmp_path / "other", categories=(("bottle", "rgb"),), seed=1)
    return dict(data_dir=other, tfds_dir=str(tmp_path / "tfds_other"))
  raise AssertionError(field)


@pytest.mark.parametrize("field", ["image_size", "dtype", "depthwise", "checkpoint", "data"])
def test_each_cache_key_field_misses_the_cache_and_matches_an_uncached_run(
  field, tmp_path, mvtec, checkpoint, filled_cache
):
  import shutil

  cache = tmp_path / "cache"
  shutil.copytree(filled_cache, cache)
  before = set(os.listdir(cache))
  opts = dict(_KEYED, **_changed(field, tmp_path, checkpoint))
  weights = opts.pop("checkpoint", checkpoint)
  cached = experiment.run(_config(tmp_path, mvtec, weights, cache_dir=str(cache), **opts))
  # A miss computes and stores new entries: train and test, each .npz + .json.
  assert len(set(os.listdir(cache)) - before) == 4, field
  uncached = experiment.run(_config(tmp_path, mvtec, weights, workdir=str(tmp_path / "w2"), **opts))
  assert _runs(cached) == _runs(uncached)


# ---------------------------------------------------------------------------
# The workdir is one run
# ---------------------------------------------------------------------------


def test_rerun_with_other_settings_leaves_no_file_of_the_earlier_run(tmp_path, checkpoint):
  data = write_mvtec(tmp_path / "two")
  experiment.run(_config(tmp_path, data, checkpoint, categories=("bottle", "grid"), plots=True))
  assert (tmp_path / "work" / "roc_grid.png").exists()
  experiment.run(_config(tmp_path, data, checkpoint, categories=("bottle",), plots=True))
  names = set(os.listdir(tmp_path / "work"))
  assert "roc_grid.png" not in names and "roc_bottle.png" in names
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_a_folder_that_is_not_a_run_is_not_replaced(tmp_path, mvtec, checkpoint):
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "thesis.tex").write_text("precious")
  with pytest.raises(ValueError, match="not a jax_gad run"):
    experiment.run(_config(tmp_path, mvtec, checkpoint))
  assert (tmp_path / "work" / "thesis.tex").read_text() == "precious"


_RUN = """
import sys
sys.path.insert(0, {tests!r})
from jax_gad import config, experiment
doc = experiment.run(config.from_flat(config.Experiment, dict(workdir={workdir!r},
    dataset="mvtec_ad", data_dir={data!r}, tfds_dir={tfds!r}, arch="efficientnet-lite0",
    checkpoint={ckpt!r}, image_size=32,
    batch_size=8, cache_dir=None, plots=True, categories={categories!r}, folds=(0, 1))))
"""


def test_killed_rerun_leaves_the_complete_old_run(tmp_path, checkpoint):
  data = write_mvtec(tmp_path / "two")
  workdir, tfds = str(tmp_path / "work"), str(tmp_path / "tfds")

  def script(categories):
    return _RUN.format(
      tests=os.path.dirname(__file__),
      workdir=workdir,
      data=data,
      tfds=tfds,
      ckpt=checkpoint,
      categories=categories,
    )

  env = dict(os.environ, PYTHONPATH=REPO)
  first = subprocess.run(
    [sys.executable, "-c", script(("bottle",))],
    env=env,
    timeout=600,
    capture_output=True,
    text=True,
  )
  assert first.returncode == 0, first.stderr[-2000:]
  old = {n: (tmp_path / "work" / n).read_bytes() for n in os.listdir(workdir)}

  # A rerun with other settings, killed with SIGTERM while it writes its reports.
  proc = subprocess.Popen(
    [sys.executable, "-c", script(("bottle", "grid"))],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  prefix = f".tmp-{proc.pid}-run-"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if any(n.startswith(prefix) for n in os.listdir(tmp_path)):
      break
    time.sleep(0.005)
  assert proc.poll() is None, "the rerun finished before its reports were being written"
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=60)
  now = {n: (tmp_path / "work" / n).read_bytes() for n in os.listdir(workdir)}
  assert now == old, "the workdir must hold the complete old run"
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(prefix)]
  assert leftovers  # killed mid-write: its temporary folder stays ...

  # ... until a later run removes the temporaries of dead writers.
  for name in leftovers:
    os.utime(tmp_path / name, (time.time() - 3600, time.time() - 3600))
  second = subprocess.run(
    [sys.executable, "-c", script(("bottle", "grid"))],
    env=env,
    timeout=600,
    capture_output=True,
    text=True,
  )
  assert second.returncode == 0, second.stderr[-2000:]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
  assert "roc_grid.png" in os.listdir(workdir)
  doc = json.loads((tmp_path / "work" / "results.json").read_text())
  assert doc["config"]["categories"] == ["bottle", "grid"]


# ---------------------------------------------------------------------------
# Fail early, fail clearly
# ---------------------------------------------------------------------------


def _fault(kind, tmp_path, mvtec):
  """(config overrides, expected message) for one kind of bad input."""
  if kind == "workdir not creatable":
    (tmp_path / "afile").write_text("x")  # no folder can be made inside a file, even by root
    return dict(workdir=str(tmp_path / "afile" / "work")), "--workdir=.* cannot be created"
  if kind == "cache is a file":
    (tmp_path / "cache").write_text("x")
    return dict(cache_dir=str(tmp_path / "cache")), "--cache_dir"
  if kind == "tfds not writable":
    locked = tmp_path / "ro"
    locked.mkdir()
    os.chmod(locked, 0o500)
    return dict(tfds_dir=str(locked / "tfds")), "--tfds_dir"
  if kind == "tfds not creatable":
    (tmp_path / "afile").write_text("x")
    return dict(tfds_dir=str(tmp_path / "afile" / "tfds")), "--tfds_dir"
  if kind == "too few training images":
    root = write_mvtec(tmp_path / "few", categories=(("bottle", "rgb"),), n_train=4)
    return dict(data_dir=root), r"category bottle: 4 training image\(s\)"
  if kind == "no anomalous test images":
    root = write_mvtec(tmp_path / "good", categories=(("bottle", "rgb"),), defects=())
    return dict(data_dir=root), "no anomalous"
  if kind == "checkpoint is a folder":
    return dict(checkpoint=str(tmp_path)), "is a folder"
  raise AssertionError(kind)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folders_are_refused_up_front(tmp_path, mvtec, checkpoint):
  overrides, message = _fault("tfds not writable", tmp_path, mvtec)
  with pytest.raises(ValueError, match=message):
    experiment.run(_config(tmp_path, mvtec, checkpoint, **overrides))


@pytest.mark.parametrize("kind", ["workdir not creatable", "tfds not creatable"])
def test_folders_that_cannot_be_made_are_refused_up_front(kind, tmp_path, mvtec, checkpoint):
  overrides, message = _fault(kind, tmp_path, mvtec)
  with pytest.raises(ValueError, match=message):
    experiment.run(_config(tmp_path, mvtec, checkpoint, **overrides))


@pytest.mark.parametrize(
  "kind",
  [
    "cache is a file",
    "too few training images",
    "no anomalous test images",
    "checkpoint is a folder",
  ],
)
def test_bad_setup_is_refused_before_extraction(kind, tmp_path, mvtec, checkpoint, monkeypatch):
  from jax_gad.data import pipeline

  def no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted before the check")

  monkeypatch.setattr(pipeline, "pooled_features", no_extraction)
  overrides, message = _fault(kind, tmp_path, mvtec)
  with pytest.raises(ValueError, match=message):
    experiment.run(_config(tmp_path, mvtec, checkpoint, **overrides))
  assert not (tmp_path / "work").exists()


def test_oversized_batch_is_capped_and_said(tmp_path, mvtec, checkpoint, caplog):
  doc = experiment.run(_config(tmp_path, mvtec, checkpoint, batch_size=100000))
  assert doc["config"]["batch_size"] == 10  # the largest split
  assert "--batch_size=100000 is larger than the largest split" in caplog.text


def test_out_of_memory_names_the_flags_to_lower(tmp_path, mvtec, checkpoint, monkeypatch):
  from jax_gad.data import pipeline

  def exhausted(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.1GiB.")

  monkeypatch.setattr(pipeline, "pooled_features", exhausted)
  with pytest.raises(MemoryError, match="--image_size=32 with --batch_size=8: lower --batch_size"):
    experiment.run(_config(tmp_path, mvtec, checkpoint))
  assert not (tmp_path / "work").exists()


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match=f"cannot write {tmp_path / 'r.json'}: No space left"):
    files.atomic_write(tmp_path / "r.json", "{}")
  assert os.listdir(tmp_path) == []


def test_write_failure_in_the_workdir_names_the_users_folder(
  tmp_path, mvtec, checkpoint, monkeypatch
):
  from jax_gad import report

  real = files.atomic_write

  def fail_on_results(path, data):
    if str(path).endswith("results.json"):
      raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device")
    real(path, data)

  monkeypatch.setattr(report.files, "atomic_write", fail_on_results)
  with pytest.raises(OSError) as err:
    experiment.run(_config(tmp_path, mvtec, checkpoint))
  assert str(tmp_path / "work" / "results.json") in str(err.value)
  assert ".tmp-" not in str(err.value)
  assert not (tmp_path / "work").exists()


def test_ctrl_c_ends_with_one_line_and_status_130(monkeypatch, capsys):
  def interrupted(cfg):
    raise KeyboardInterrupt

  monkeypatch.setattr(experiment, "run", interrupted)
  monkeypatch.setattr(main.cli, "initialize_multihost", lambda: None)
  with pytest.raises(SystemExit) as exit_:
    main.main(["main"])
  assert exit_.value.code == 130
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "interrupted" in err


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  old = time.time() - 3600
  stale = tmp_path / f".tmp-{dead.pid}-abc-results.json"
  stale.write_text("half")
  stale_dir = tmp_path / f".tmp-{dead.pid}-run-xyz"
  stale_dir.mkdir()
  live = tmp_path / f".tmp-{os.getppid()}-def-results.json"  # a running writer
  live.write_text("busy")
  recent = tmp_path / f".tmp-{dead.pid}-ghi-table.md"  # too young to judge
  recent.write_text("x")
  for p in (stale, stale_dir, live):
    os.utime(p, (old, old))
  removed = files.remove_stale_temporaries(tmp_path)
  assert sorted(removed) == sorted([str(stale), str(stale_dir)])
  assert live.exists() and recent.exists()


# ---------------------------------------------------------------------------
# Trust: one case per kind of silent fault (detector header, overwriting an
# input, stale temporaries, image formats, masks, too few images, identical
# images, settings known to fail before extraction)
# ---------------------------------------------------------------------------


def _dead_pid():
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  return dead.pid


def _plant_stale(folder, name="x"):
  """A temporary of a writer that died an hour ago; returns its path."""
  stale = folder / f".tmp-{_dead_pid()}-abc-{name}"
  stale.write_text("half")
  old = time.time() - 3600
  os.utime(stale, (old, old))
  return stale


@pytest.fixture(scope="module")
def fitted_file(tmp_path_factory, mvtec, checkpoint):
  """A detector fitted by the fit command into a folder holding a dead writer's temporary."""
  out = tmp_path_factory.mktemp("detector")
  stale = _plant_stale(out, "det.jgd")
  det = _fit(
    str(out / "det.jgd"),
    "bottle",
    dataset="mvtec_ad",
    data_dir=mvtec,
    tfds_dir=str(tmp_path_factory.mktemp("tfds")),
    arch=ARCH,
    checkpoint=checkpoint,
    image_size=SIZE,
    levels=(6, 8),
    batch_size=8,
    cache_dir="",
    progress=False,
  )
  return out / "det.jgd", det, stale


def _resigned(path, tmp_path, **changes):
  """The detector file with header fields changed and the checksum made to match."""
  from jax_gad import detector as detector_lib

  head, payload = path.read_bytes().split(b"\n", 1)
  header = json.loads(head)
  header.update(changes)
  out = tmp_path / "edited.jgd"
  out.write_bytes(detector_lib.encode(header, payload))
  return out


def test_1_detector_header_is_under_the_checksum_and_checked(fitted_file, checkpoint, tmp_path):
  from jax_gad import detector as detector_lib

  path, det, _ = fitted_file
  head, payload = path.read_bytes().split(b"\n", 1)
  # One edited byte of the header, checksum untouched: refused like a flipped payload byte.
  for field in ("threshold", "image_size", "mean"):
    header = json.loads(head)
    header[field] = header[field] + 1 if field != "mean" else [0.9, 0.9, 0.9]
    edited = tmp_path / f"{field}.jgd"
    edited.write_bytes(
      json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n" + payload
    )
    with pytest.raises(ValueError, match=r"corrupt or was edited") as err:
      detector_lib.read_detector(edited)
    assert str(edited) in str(err.value)
  # Re-signed (a consistent checksum), the header is still checked against itself and the arrays.
  cases = {
    "levels": (dict(levels=[8, 6]), r"header field 'levels': level 8 has 1280 features"),
    "threshold": (
      dict(threshold=det.threshold * 5),
      r"header field 'threshold': .* is not the target_fpr=0.01 quantile",
    ),
    "image_size": (dict(image_size=8), r"header field 'image_size': 8 is not an integer >= 16"),
    "mean": (dict(mean=[0.5, 0.5]), r"header field 'mean': \[0.5, 0.5\] is not 3 finite"),
    "target_fpr": (dict(target_fpr=1.5), r"header field 'target_fpr': 1.5 is not in \(0, 1\)"),
    "threshold type": (
      dict(threshold="18.26"),
      r"header field 'threshold': '18.26' is not a finite",
    ),
  }
  for name, (changes, message) in cases.items():
    edited = _resigned(path, tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as err:
      detector_lib.read_detector(edited)
    assert str(edited) in str(err.value), name
  # mean / std against the checkpoint: a consistent file whose normalisation is not the weights'.
  h = json.loads(head)
  edited = _resigned(path, tmp_path, mean=[m + 0.1 for m in h["mean"]])
  with pytest.raises(ValueError, match=r"header field 'mean' is .* but the checkpoint"):
    jax_gad_load(edited, checkpoint)
  # Version 1 (no checksum over its header) is refused, saying why.
  v1 = tmp_path / "v1.jgd"
  h1 = dict(json.loads(head), format_version=1)
  v1.write_bytes(json.dumps(h1).encode() + b"\n" + payload)
  with pytest.raises(
    ValueError, match=r"format_version 1 \(version 1 has no checksum over its header\)"
  ):
    detector_lib.read_detector(v1)


def jax_gad_load(path, weights):
  import jax_gad

  return jax_gad.load_detector(path, checkpoint=weights)


def test_2_no_command_writes_over_its_inputs(fitted_file, mvtec, checkpoint, tmp_path):

  path, _, _ = fitted_file
  image = os.path.join(mvtec, "bottle", "test", "good", "000.png")
  before = {p: open(p, "rb").read() for p in (image, str(path))}
  link = tmp_path / "link.jgd"
  link.symlink_to(path)
  for output, expect in (
    (image, "is the input image"),
    (str(path), "is the detector"),
    (str(link), "is the detector"),  # a symlink to it
    (checkpoint, "is the checkpoint"),
  ):
    with pytest.raises(ValueError, match=f"--output=.* {expect}"):
      _predict(str(path), os.path.join(mvtec, "bottle", "test"), output, checkpoint=checkpoint)
  for p, content in before.items():
    assert open(p, "rb").read() == content
  for output, expect in (
    (checkpoint, "is the checkpoint"),
    (os.path.join(mvtec, "bottle", "train", "good", "det.png"), "lies inside the training data"),
  ):
    with pytest.raises(ValueError, match=expect):
      _fit(output, "bottle", dataset="mvtec_ad", data_dir=mvtec, checkpoint=checkpoint)
  # main replaces its workdir whole: a workdir holding the data is refused before any work.
  data_copy = tmp_path / "run" / "data"
  shutil.copytree(mvtec, data_copy)
  (tmp_path / "run" / "results.json").write_text("{}")  # looks like an earlier run
  with pytest.raises(ValueError, match=r"--workdir=.* holds --data_dir"):
    experiment.run(_config(tmp_path, str(data_copy), checkpoint, workdir=str(tmp_path / "run")))
  assert (data_copy / "bottle" / "train" / "good" / "000.png").exists()


def test_3_every_command_removes_stale_temporaries(fitted_file, mvtec, checkpoint, tmp_path):
  from jax_gad.benchmark import report as bench_report

  path, _, stale_of_fit = fitted_file
  assert not stale_of_fit.exists() and path.exists()  # fit cleaned its output folder
  stale = _plant_stale(tmp_path, "scores.csv")
  _predict(
    str(path),
    os.path.join(mvtec, "bottle", "test", "good"),
    str(tmp_path / "scores.csv"),
    checkpoint=checkpoint,
    progress=False,
  )
  assert not stale.exists() and (tmp_path / "scores.csv").exists()
  stale = _plant_stale(tmp_path, "bench.json")
  bench_report.write_json(str(tmp_path / "bench.json"), {"a": 1})
  assert not stale.exists()


def _png16_rgb(array):
  """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
  import struct
  import zlib

  h, w, _ = array.shape
  raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", ihdr)
    + chunk(b"IDAT", zlib.compress(raw))
    + chunk(b"IEND", b"")
  )


def test_4_image_formats_32_bit_and_float_refused_16_bit_colour_scaled(tmp_path):
  from jax_gad import predict
  from jax_gad.data import folder

  eight_bit = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.int32)
  for mode, array in (("I", eight_bit), ("F", eight_bit.astype(np.float32))):
    path = tmp_path / f"{mode}.tif"
    Image.fromarray(array).save(path)
    kind = "32-bit integer" if mode == "I" else "floating-point"
    with pytest.raises(ValueError, match=f"{path} has {kind} pixels \\(mode '{mode}'\\)"):
      predict.read_image(str(path))
    with pytest.raises(ValueError, match=f"mode '{mode}'"):
      folder.read_image(path)
  # 16-bit colour: each channel's high byte (within one grey level of round(v * 255 / 65535)).
  rgb16 = np.random.default_rng(1).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
  png = tmp_path / "rgb16.png"
  png.write_bytes(_png16_rgb(rgb16))
  got = predict.read_image(str(png))
  np.testing.assert_array_equal(got, (rgb16 >> 8).astype(np.uint8))
  assert np.abs(got.astype(int) - np.round(rgb16.astype(np.float64) * 255 / 65535)).max() <= 1
  # 16-bit gray stays scaled over the full range.
  gray16 = np.array([[0, 257, 65535, 32768]], np.uint16)
  Image.fromarray(gray16).save(tmp_path / "g16.png")
  np.testing.assert_array_equal(
    predict.read_image(str(tmp_path / "g16.png"))[..., 0], [[0, 1, 255, 128]]
  )


def test_5_odd_masks_are_warned_about_and_recorded(tmp_path, checkpoint):
  root = write_mvtec(tmp_path / "masks", categories=(("bottle", "rgb"),))
  gt = tmp_path / "masks" / "bottle" / "ground_truth"
  soft = np.asarray(Image.open(gt / "crack" / "000_mask.png")).copy()
  soft[0, :4] = [1, 2, 3, 4]  # JPEG-like edges
  Image.fromarray(soft).save(gt / "crack" / "000_mask.png")
  Image.fromarray(np.zeros_like(soft)).save(gt / "hole" / "001_mask.png")
  test = data.load("mvtec_ad", "bottle", "test", data_dir=root, tfds_dir=str(tmp_path / "tfds"))
  assert test.mask_notes == {"non_binary": ["test/crack/000.png"], "empty": ["test/hole/001.png"]}
  # The rule: non-zero is defect, so the soft edge pixels count as defect.
  crack = test[test.file_names.index("test/crack/000.png")]["mask"]
  assert (crack[0, :4] == 255).all()
  doc = experiment.run(_config(tmp_path, root, checkpoint, levels=(8,), distances=("mahalanobis",)))
  messages = [w["message"] for w in doc["warnings"]]
  assert any(
    "1 mask(s) with values other than 0 and the maximum" in m and "crack/000" in m for m in messages
  )
  assert any("1 defect image(s) whose mask is all zero" in m and "hole/001" in m for m in messages)


def test_6_too_few_images_for_the_target_fpr_is_warned_and_recorded(fitted_file, capsys):
  from jax_gad import detector as detector_lib

  rng = np.random.default_rng(0)
  with pytest.warns(detector_lib.FitWarning) as caught:
    det = detector_lib.fit_features(
      [rng.normal(size=(3, 4))], levels=(8,), target_fpr=0.01, n_folds=3
    )
  expect = (
    "3 training images: the out-of-fold FPR moves in steps of 1/3, so --target_fpr=0.01 cannot "
    "be resolved (the threshold is the highest out-of-fold score); need at least 100"
  )
  assert expect in [str(w.message) for w in caught] and expect in det.info["warnings"]
  # The same warning is saved in the file fitted by the command (10 images) and said by predict.
  path, _, _ = fitted_file
  saved = detector_lib.read_detector(path)
  assert any(
    w.startswith("10 training images") and "need at least 100" in w for w in saved.info["warnings"]
  )
  from jax_gad import predict

  empty = predict.Prediction([], np.zeros(0), np.zeros(0, bool), {}, None)
  assert any("need at least 100" in line for line in predict.summary(saved, empty))
  # Enough images: no warning.
  det = detector_lib.fit_features(
    [rng.normal(size=(100, 4))], levels=(8,), target_fpr=0.01, n_folds=5
  )
  assert det.info["warnings"] == []


def test_7_identical_training_images_warn_and_flag_the_zero_threshold():
  from jax_gad import detector as detector_lib

  same = np.tile(np.arange(6, dtype=np.float32), (120, 1))
  with pytest.warns(detector_lib.FitWarning):
    det = detector_lib.fit_features([same, same[:, :3]], levels=(4, 8), target_fpr=0.05)
  notes = det.info["warnings"]
  assert (
    "level 4: every training feature has zero variance (identical images or only dead "
    "channels); its distances carry no information" in notes
  )
  assert any(n.startswith("level 8: every training feature has zero variance") for n in notes)
  assert det.threshold == 0.0
  assert any(n.startswith("the calibrated threshold is 0.0") for n in notes)


def test_8_settings_known_to_fail_are_refused_before_extraction(
  tmp_path, mvtec, checkpoint, monkeypatch
):
  from jax_gad.data import pipeline

  def no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted before the check")

  monkeypatch.setattr(pipeline, "pooled_features", no_extraction)
  # 10 training images: a fold fits on 8 rows.
  cfg = _config(tmp_path, mvtec, checkpoint, density="gmm", gmm_components=(2, 64))
  with pytest.raises(
    ValueError, match=r"--gmm_components=2,64: \[64\] exceed the 8 training rows of a bottle fold"
  ):
    experiment.run(cfg)
  cfg = _config(tmp_path, mvtec, checkpoint, maps=True, map_levels=(3, 5), map_channels=100000)
  with pytest.raises(
    ValueError, match=r"--map_channels=100000 exceeds the 40 channels of map level 3"
  ):
    experiment.run(cfg)
  assert not (tmp_path / "work").exists()
