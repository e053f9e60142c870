r"""Runs the Gaussian AD protocol and writes the paper's tables.

  python -m jax_gad.main --flagfile=experiments/demo.cfg
  python -m jax_gad.main --flagfile=experiments/mvtec.cfg --data_dir=/data/mvtec_anomaly_detection

An image travels: disk -> :mod:`jax_gad.data` (TFDS dataset, resize, normalise)
-> :mod:`jax_gad.features` (EfficientNet levels on every device, pooled,
cached) -> :mod:`jax_gad.evaluate` (a Gaussian per fold and level, distances,
AUROC) -> ``results.json`` and the tables in ``--workdir``.

Every input is checked before anything is written, so bad input (flags, data,
weights) leaves the workdir as it was; each output file is written atomically.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple, Sequence

from absl import app
from absl import flags

_DISTANCES = ("l2", "sed", "mahalanobis")

flags.DEFINE_string("workdir", None, "Output folder; created if missing. Must not be a file.")
flags.DEFINE_enum("dataset", "synthetic_ad", ["mvtec_ad", "synthetic_ad"], "Dataset to evaluate on.")
flags.DEFINE_string("data_dir", None,
                    "The extracted MVTec AD folder (holding bottle/, cable/, ...); mvtec_ad only.")
flags.DEFINE_string("tfds_dir", None,
                    "Where prepared TFDS datasets are kept (default: TFDS's ~/tensorflow_datasets).")
flags.DEFINE_list("categories", [], "Categories to run (default: all categories of the dataset).")
flags.DEFINE_list("folds", ["0", "1", "2", "3", "4"],
                  "Which of the 5 KFold(shuffle=True, random_state=0) folds to evaluate.")
flags.DEFINE_string("arch", "efficientnet-b4", "Backbone: efficientnet-b0..b7 or efficientnet-lite0..4.")
flags.DEFINE_string("checkpoint", None,
                    "Converted weights (.msgpack, see `python -m jax_gad.convert`). Default: "
                    "<checkpoint_dir>/<arch>.msgpack; Lite0-2 are converted there on first use.")
flags.DEFINE_string("checkpoint_dir", "checkpoints", "Folder of converted checkpoints.")
flags.DEFINE_list("levels", [str(i) for i in range(9)], "Levels to use (0 = stem ... 8 = head).")
flags.DEFINE_list("distances", list(_DISTANCES), "Distances to evaluate: l2, sed, mahalanobis.")
flags.DEFINE_float("pca", None,
                   "PCA before the fit: keep components up to cumulative variance t (e.g. 0.99).")
flags.DEFINE_float("npca", None,
                   "Negated PCA: keep the components beyond cumulative variance t (e.g. 0.99 is "
                   "the poster's 'NPCA 1 %'). Mutually exclusive with --pca.")
flags.DEFINE_integer("image_size", None, "Square input size (default: the checkpoint's native size).")
flags.DEFINE_integer("batch_size", 16, "Global batch size of feature extraction (all devices).")
flags.DEFINE_integer("num_workers", None,
                     "Threads that decode and resize images while the device computes "
                     "(default: the number of CPU cores).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Backbone computation dtype.")
flags.DEFINE_enum("depthwise", "auto", ["auto", "shift", "xla"],
                  "Depthwise convolution implementation (auto: the measured default of the backend).")
flags.DEFINE_string("cache_dir", "~/.cache/jax_gad/features",
                    "Feature cache folder ('' disables the cache).")
flags.DEFINE_bool("plots", True, "Write ROC and per-level plots (PNG).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (calls jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")

FLAGS = flags.FLAGS


class Config(NamedTuple):
  """Everything that defines one experiment; built from flags by :func:`config_from_flags`."""
  workdir: str
  dataset: str = "synthetic_ad"
  data_dir: str | None = None
  tfds_dir: str | None = None
  categories: tuple = ()
  folds: tuple = (0, 1, 2, 3, 4)
  arch: str = "efficientnet-b4"
  checkpoint: str | None = None
  checkpoint_dir: str = "checkpoints"
  levels: tuple = tuple(range(9))
  distances: tuple = _DISTANCES
  pca: float | None = None
  npca: float | None = None
  image_size: int | None = None
  batch_size: int = 16
  num_workers: int | None = None
  dtype: str = "float32"
  depthwise: str = "auto"
  cache_dir: str | None = "~/.cache/jax_gad/features"
  plots: bool = True


def _int_list(name: str, values: Sequence[str], low: int, high: int) -> tuple:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name} must be a comma-separated list of integers, got {','.join(values)!r}.")
  bad = [v for v in out if not low <= v <= high]
  if bad or not out:
    raise ValueError(f"--{name} must list integers in {low}..{high}, got {list(out)}.")
  if len(set(out)) != len(out):
    raise ValueError(f"--{name} lists a value twice: {list(out)}.")
  return out


def config_from_flags() -> Config:
  if not FLAGS.workdir:
    raise ValueError("--workdir is required (the folder that receives results.json and the tables).")
  return Config(
      workdir=FLAGS.workdir, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
      tfds_dir=FLAGS.tfds_dir, categories=tuple(FLAGS.categories),
      folds=_int_list("folds", FLAGS.folds, 0, 4), arch=FLAGS.arch,
      checkpoint=FLAGS.checkpoint, checkpoint_dir=FLAGS.checkpoint_dir,
      levels=_int_list("levels", FLAGS.levels, 0, 8), distances=tuple(FLAGS.distances),
      pca=FLAGS.pca, npca=FLAGS.npca, image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, num_workers=FLAGS.num_workers, dtype=FLAGS.dtype, depthwise=FLAGS.depthwise,
      cache_dir=FLAGS.cache_dir or None, plots=FLAGS.plots)


def _validate(cfg: Config):
  """Checks what can be checked without touching data or weights. Returns the reduction."""
  from jax_gad import data, evaluate

  if os.path.exists(cfg.workdir) and not os.path.isdir(cfg.workdir):
    raise ValueError(f"--workdir={cfg.workdir} is a file; give a folder (it is created if missing).")
  if cfg.pca is not None and cfg.npca is not None:
    raise ValueError("--pca and --npca are mutually exclusive: request one reduction, not both.")
  reduction = None
  for mode, t in (("pca", cfg.pca), ("npca", cfg.npca)):
    if t is not None:
      if not 0.0 < t < 1.0:
        raise ValueError(f"--{mode} must be a cumulative variance threshold in (0, 1), got {t}.")
      reduction = evaluate.Reduction(mode, float(t))
  unknown = [d for d in cfg.distances if d not in _DISTANCES]
  if unknown or not cfg.distances:
    raise ValueError(f"--distances: unknown {unknown}; choose from {list(_DISTANCES)}.")
  valid = data.CATEGORIES[cfg.dataset]
  bad = [c for c in cfg.categories if c not in valid]
  if bad:
    raise ValueError(f"--categories: unknown {bad} for dataset {cfg.dataset}; valid: {list(valid)}.")
  if len(set(cfg.categories)) != len(cfg.categories):
    raise ValueError(f"--categories lists a category twice: {list(cfg.categories)}.")
  if cfg.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {cfg.batch_size}.")
  if cfg.num_workers is not None and cfg.num_workers < 1:
    raise ValueError(f"--num_workers must be positive, got {cfg.num_workers}.")
  if cfg.image_size is not None and cfg.image_size < 16:
    raise ValueError(f"--image_size must be at least 16, got {cfg.image_size}.")
  return reduction


def run(cfg: Config) -> dict:
  """Runs the whole protocol for ``cfg`` and writes the reports. Returns results.json's content."""
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from jax_gad import convert, data, evaluate, features, files
  from jax_gad.models import efficientnet

  reduction = _validate(cfg)
  categories = cfg.categories or tuple(data.CATEGORIES[cfg.dataset])

  # Weights: an explicit file, or the converted default for the arch.
  if cfg.checkpoint and not os.path.isfile(cfg.checkpoint):
    raise FileNotFoundError(
        f"--checkpoint={cfg.checkpoint} does not exist. Convert weights with "
        f"`python -m jax_gad.convert --arch={cfg.arch} --input=<file.pth> --output="
        f"{cfg.checkpoint}` (README: 'Converting weights'), or leave --checkpoint out to use "
        f"{cfg.checkpoint_dir}/{cfg.arch}.msgpack.")
  path = cfg.checkpoint or convert.ensure_checkpoint(cfg.arch, cfg.checkpoint_dir)
  variables, meta = convert.load_checkpoint(path, arch=cfg.arch)
  image_size = cfg.image_size or int(meta["resolution"])
  depthwise = None if cfg.depthwise == "auto" else cfg.depthwise
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
  model = efficientnet.create(cfg.arch, depthwise=depthwise, dtype=dtype)

  # Data: every split is opened (and, on first use, prepared) before any work,
  # so that bad data stops the run before it writes anything.
  splits = {}
  for c in categories:
    splits[c] = (data.load(cfg.dataset, c, "train", data_dir=cfg.data_dir, tfds_dir=cfg.tfds_dir),
                 data.load(cfg.dataset, c, "test", data_dir=cfg.data_dir, tfds_dir=cfg.tfds_dir))

  mesh = features.make_mesh()
  cache = features.FeatureCache(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else None
  checkpoint_id = files.sha256(path) if cache else None  # identity of the weights in cache keys
  levels = list(cfg.levels)

  def pooled(split, category, split_name):
    def compute():
      return features.extract_features(
          model, variables, split, image_size=image_size, mean=meta["mean"], std=meta["std"],
          # Every level, whatever --levels says: one cache entry serves every level choice.
          batch_size=cfg.batch_size, mesh=mesh, levels=features.DEFAULT_LEVELS,
          num_workers=cfg.num_workers or os.cpu_count() or 2,
          desc=f"{category}/{split_name}")
    if cache is None:
      return compute()
    key = {
        "dataset": cfg.dataset, "category": category, "split": split_name,
        "data": split.fingerprint, "checkpoint_sha256": checkpoint_id, "arch": cfg.arch,
        "image_size": image_size, "dtype": cfg.dtype,
        "depthwise": depthwise or efficientnet.default_depthwise(mesh.devices.flat[0].platform),
    }
    return cache.get_or_compute(key, compute)

  results = {}
  n_fits = len(categories) * len(cfg.folds) * len(levels)
  with tqdm(total=n_fits, desc="fit + score", unit="fit", disable=None) as bar:
    for c in categories:
      train, test = splits[c]
      feats_train = pooled(train, c, "train")
      feats_test = pooled(test, c, "test")
      all_folds = data.folds(len(train))
      results[c] = evaluate.evaluate_category(
          c, [feats_train[l] for l in levels], [feats_test[l] for l in levels], test.labels,
          [all_folds[k] for k in cfg.folds], levels=levels, distances=cfg.distances,
          reduction=reduction, progress=bar.update)

  config = cfg._asdict()
  config.update(categories=list(categories), checkpoint=path, image_size=image_size,
                checkpoint_meta={k: meta[k] for k in ("arch", "source", "resolution", "mean", "std")
                                 if k in meta},
                reduction=reduction.name if reduction else None)
  doc = evaluate.report(config=json.loads(json.dumps(config)), results=results, levels=levels,
                        distances=cfg.distances)
  # In a multi-host run every process holds the same results; process 0 writes them.
  if jax.process_index() == 0:
    os.makedirs(cfg.workdir, exist_ok=True)
    evaluate.write_reports(cfg.workdir, doc, results, cfg.distances, plots=cfg.plots)
  return doc


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jax_gad import evaluate, features

  try:
    if FLAGS.coordinator_address:
      features.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
    cfg = config_from_flags()
    doc = run(cfg)
  except (ValueError, OSError, ImportError) as e:  # bad input: say what, no traceback
    sys.exit(f"jax_gad.main: error: {e}")
  title = f"Image AUROC (%), mean ± SEM over {len(doc['config']['categories'])} categories x " \
          f"{len(cfg.folds)} folds — {cfg.dataset}, {cfg.arch}"
  if doc["config"]["reduction"]:
    title += f", {doc['config']['reduction']}"
  print()
  print(evaluate.table1_markdown(doc["table1"], cfg.distances, title=title))
  print("Sum row per category:")
  print(evaluate.per_category_markdown(doc["per_category"], cfg.distances))
  print(f"Wrote results.json, tables and plots to {os.path.abspath(cfg.workdir)}")


if __name__ == "__main__":
  app.run(main)
