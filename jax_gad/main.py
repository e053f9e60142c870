r"""Runs the Gaussian AD protocol and writes the paper's tables.

  python -m jax_gad.main --flagfile=experiments/demo.cfg
  python -m jax_gad.main --flagfile=experiments/mvtec.cfg --data_dir=/data/mvtec_anomaly_detection

An image travels: disk -> :mod:`jax_gad.data` (TFDS dataset; decode, resize and
normalise in :mod:`jax_gad.data.pipeline`) -> :mod:`jax_gad.features`
(EfficientNet levels on every device, pooled; cached by
:mod:`jax_gad.feature_cache`) -> :mod:`jax_gad.protocol` (a Gaussian per fold
and level, distances, AUROC) -> :mod:`jax_gad.report` (``results.json`` and the
tables in ``--workdir``).

Every input is checked before anything is written, so bad input (flags, data,
weights) leaves the workdir as it was; each output file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import NamedTuple

from absl import app, flags
import numpy as np

import jax_gad
from jax_gad import cli, console, densities

# Every score name of every registered density (the Gaussian's distances, 'nll').
SCORES = tuple(dict.fromkeys(d for m in densities.DENSITIES.values() for d in m.scorers))

cli.DEFINE_path(
  "workdir",
  None,
  "Output folder for results.json, the tables and plots; created if missing. Must not be a file.",
)
cli.DEFINE_int_list(
  "folds",
  [0, 1, 2, 3, 4],
  0,
  4,
  "Which of the 5 KFold(shuffle=True, random_state=0) folds to evaluate.",
)
cli.DEFINE_enum_list(
  "distances",
  [],
  SCORES,
  "Distances (scores) to evaluate; default: every score of --density (l2, sed, mahalanobis "
  "for the Gaussian; nll for gmm and flow).",
  allow_empty=True,
)
flags.DEFINE_bool("plots", True, "Write ROC and per-level plots (PNG).")
flags.DEFINE_bool(
  "maps",
  False,
  "Also compute anomaly maps (per-location Gaussians on the unpooled --map_levels): pixel AUROC "
  "and AUPRO per category and fold, and overlay PNGs (docs/maps.md).",
)
cli.DEFINE_int_list(
  "map_levels",
  [],
  0,
  8,
  "Levels whose unpooled maps are modelled with --maps (default: the measured choice of the "
  "arch, docs/maps.md: 3,4,5).",
  allow_empty=True,
)
flags.DEFINE_bool(
  "save_maps", False, "With --maps: also write the maps as maps_<category>.npz (input resolution)."
)
flags.DEFINE_integer(
  "map_channels",
  None,
  "With --maps: keep a fixed random subset of this many channels per level (PaDiM's reduction; "
  "default: all channels).",
  lower_bound=1,
)
flags.DEFINE_float(
  "map_sigma", 4.0, "With --maps: Gaussian blur sigma in network-input pixels.", lower_bound=0.0
)
flags.DEFINE_enum(
  "map_combine", "mean", ["mean", "chi"], "With --maps: how level maps are combined (docs/maps.md)."
)
flags.DEFINE_float(
  "map_ridge",
  0.01,
  "With --maps: added to every per-location covariance (times I) after Ledoit-Wolf shrinkage "
  "(PaDiM's 0.01; docs/maps.md).",
  lower_bound=0.0,
)

FLAGS = flags.FLAGS


class Config(NamedTuple):
  """Everything that defines one experiment; see the flags of the same names.

  Build one with :func:`config`, which takes every value not given from the
  flags (their defaults when the flags have not been parsed).
  """

  workdir: str
  dataset: str
  data_dir: str | None
  tfds_dir: str | None
  categories: tuple
  folds: tuple
  arch: str
  checkpoint: str | None
  checkpoint_dir: str
  levels: tuple
  distances: tuple
  pca: float | None
  npca: float | None
  image_size: int | None
  batch_size: int
  num_workers: int | None
  dtype: str
  depthwise: str
  cache_dir: str | None
  plots: bool
  maps: bool
  map_levels: tuple
  save_maps: bool
  map_channels: int | None
  map_sigma: float
  map_combine: str
  map_ridge: float
  density: str
  seed: int
  gmm_components: tuple
  gmm_regularization: str
  gmm_reg_covar: float
  gmm_tol: float
  gmm_max_iter: int
  flow_layers: int
  flow_hidden: int
  flow_epochs: int
  flow_batch_size: int
  flow_learning_rate: float
  flow_weight_decay: float
  flow_val_fraction: float
  flow_patience: int
  flow_vmap_levels: bool


def config(**overrides) -> Config:
  """A :class:`Config` from the flags, with ``overrides`` (field=value) on top."""
  unknown = set(overrides) - set(Config._fields)
  if unknown:
    raise ValueError(f"unknown Config field(s) {sorted(unknown)}; valid: {list(Config._fields)}")
  v = cli.values(Config._fields, overrides)
  if not v["distances"] and v["density"] in densities.DENSITIES:
    v["distances"] = tuple(densities.get(v["density"]).scorers)
  v["cache_dir"] = v["cache_dir"] or None
  return Config(**v)


def _validate(cfg: Config):
  """Checks what can be checked without touching data or weights.

  The flags' parsers already enforce these rules on the command line; this
  repeats them for a :class:`Config` built in Python.

  Returns:
    (the PCA / NPCA reduction or None, the density's config).
  """
  from jax_gad import data, protocol

  if not cfg.workdir:
    raise ValueError(
      "--workdir is required (the folder that receives results.json and the tables)."
    )
  reduction = protocol.reduction_from(cfg.pca, cfg.npca)
  try:
    model = densities.get(cfg.density)
  except ValueError as err:
    raise ValueError(f"--density: {err}") from None
  lists = {
    "distances": (cfg.distances, cli.EnumListParser(tuple(model.scorers))),
    "folds": (cfg.folds, cli.IntListParser(0, 4)),
    "levels": (cfg.levels, cli.IntListParser(0, 8)),
    "categories": (cfg.categories, cli.UniqueListParser()),
  }
  if cfg.map_levels:
    lists["map_levels"] = (cfg.map_levels, cli.IntListParser(0, 8))
  for name, (value, parser) in lists.items():
    try:
      parser.parse(list(value))
    except ValueError as err:
      raise ValueError(f"--{name}: {err}.") from None
  if cfg.dataset == "folder" and not cfg.categories:
    raise ValueError(
      "--categories is required for --dataset=folder: name the category folders under "
      "--data_dir to run (any names)."
    )
  valid = data.CATEGORIES[cfg.dataset]
  bad = [c for c in cfg.categories if c not in valid]
  if bad:
    raise ValueError(
      f"--categories: unknown {bad} for dataset {cfg.dataset}; valid: "
      + (
        f"{list(valid)}."
        if cfg.dataset != "folder"
        else "folder names of letters, digits, '_', '-' and '.'."
      )
    )
  if cfg.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {cfg.batch_size}.")
  if cfg.num_workers is not None and cfg.num_workers < 1:
    raise ValueError(f"--num_workers must be positive, got {cfg.num_workers}.")
  if cfg.image_size is not None and cfg.image_size < 16:
    raise ValueError(f"--image_size must be at least 16, got {cfg.image_size}.")
  if cfg.save_maps and not cfg.maps:
    raise ValueError("--save_maps needs --maps (the maps are computed only with --maps).")
  if cfg.map_channels is not None and cfg.map_channels < 1:
    raise ValueError(f"--map_channels must be a positive int, got {cfg.map_channels}.")
  if cfg.map_sigma < 0:
    raise ValueError(f"--map_sigma must be >= 0, got {cfg.map_sigma}.")
  if cfg.map_ridge < 0:
    raise ValueError(f"--map_ridge must be >= 0, got {cfg.map_ridge}.")
  if cfg.map_combine not in ("mean", "chi"):
    raise ValueError(f"--map_combine must be 'mean' or 'chi', got {cfg.map_combine!r}.")
  if cfg.seed < 0:
    raise ValueError(f"--seed must be a non-negative integer, got {cfg.seed}.")
  overrides = {f: getattr(cfg, f) for f in cli.DENSITY_CONFIG_FLAGS.get(cfg.density, {})}
  return reduction, cli.density_config(cfg.density, overrides)


def _check_folder(flag: str, path: str | None) -> None:
  """Raises ValueError unless ``path`` is (or can be created as) a writable folder."""
  if not path:
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--{flag}={path} is a file; give a folder (it is created if missing).")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    what = (
      "is not writable" if existing == os.path.abspath(path) else f"cannot be created in {existing}"
    )
    raise ValueError(f"--{flag}={path} {what}: choose a folder you can write to.")


def _check_workdir(workdir: str) -> None:
  """The workdir is replaced whole by a run: refuse a folder that holds something else."""
  _check_folder("workdir", workdir)
  if os.path.isdir(workdir):
    names = [n for n in os.listdir(workdir) if not n.startswith(".")]
    if names and "results.json" not in names:
      shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
      raise ValueError(
        f"--workdir={workdir} holds files that are not a jax_gad run ({shown}); a run "
        "replaces its workdir whole, so give a new or empty folder, or a previous run's workdir."
      )


def _check_splits(category: str, train, test) -> None:
  """Enough images for the protocol, checked before any feature is extracted."""
  n_folds = 5
  if len(train) < n_folds:
    raise ValueError(
      f"category {category}: {len(train)} training image(s); the {n_folds}-fold protocol "
      f"needs at least {n_folds} (each fold fits on 80 % of them)."
    )
  labels = set(np.unique(np.asarray(test.labels)).tolist()) if len(test) else set()
  missing = [
    name for value, name in ((0, "normal (test/good)"), (1, "anomalous")) if value not in labels
  ]
  if missing:
    raise ValueError(
      f"category {category}: the test split has no {' and no '.join(missing)} images; "
      "image AUROC needs both."
    )


def _out_of_memory(err: BaseException) -> bool:
  text = str(err)
  return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def run(cfg: Config) -> dict:
  """Runs the whole protocol for ``cfg`` and writes the reports. Returns results.json's content.

  Everything that can be checked is checked before any feature is extracted:
  the settings, the folders the run writes to, the weights (format and content
  checksum) and the data (enough training images, both test labels). The
  outputs are written into a temporary folder beside ``cfg.workdir`` and
  swapped in whole at the end, so the workdir always holds exactly one
  complete run (docs/outputs.md).
  """
  import jax
  from tqdm import tqdm

  from jax_gad import data, detector, feature_cache, features, files, protocol, report
  from jax_gad.data import pipeline
  from jax_gad.models import efficientnet

  reduction, density_config = _validate(cfg)
  categories = cfg.categories or tuple(data.CATEGORIES[cfg.dataset])
  _check_workdir(cfg.workdir)
  tfds_dir = (
    cfg.tfds_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  )
  for flag, folder in (("cache_dir", cfg.cache_dir), ("tfds_dir", tfds_dir)):
    _check_folder(flag, folder)
  # Temporaries of runs that were killed while writing.
  for folder in (os.path.dirname(os.path.abspath(cfg.workdir)), cfg.cache_dir, cfg.checkpoint_dir):
    if folder:
      files.remove_stale_temporaries(folder)

  # Weights: an explicit file, or the converted default for the arch.
  if not cfg.checkpoint:
    _check_folder("checkpoint_dir", cfg.checkpoint_dir)
  depthwise = None if cfg.depthwise == "auto" else cfg.depthwise
  backbone, meta, checkpoint_sha256 = detector.load_backbone(
    cfg.arch, cfg.checkpoint, cfg.checkpoint_dir, cfg.dtype, depthwise
  )
  model, variables, path = backbone
  image_size = cfg.image_size or int(meta["resolution"])

  # Data: every split is opened (and, on first use, prepared) and checked
  # before any work, so that bad data stops the run before it writes anything.
  splits = {}
  for c in categories:
    # One scan of the raw folder (and one build lock) per category, both splits from it.
    builder = data.prepare(cfg.dataset, c, data_dir=cfg.data_dir, tfds_dir=cfg.tfds_dir)
    train, test = (data.Split.from_builder(builder, split) for split in ("train", "test"))
    _check_splits(c, train, test)
    splits[c] = (train, test)

  mesh = features.make_mesh()
  cache = feature_cache.FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
  levels = list(cfg.levels)
  # A batch larger than every split only pads: cap it (the compiled shape is per batch).
  largest = max(len(s) for pair in splits.values() for s in pair)
  batch_size = min(cfg.batch_size, largest)
  if batch_size < cfg.batch_size:
    logging.warning(
      "--batch_size=%d is larger than the largest split (%d images); using %d.",
      cfg.batch_size,
      largest,
      batch_size,
    )
  # Every level, whatever --levels says: one cache entry serves every level choice.
  extractor = features.LevelExtractor(
    model,
    variables,
    image_size=image_size,
    mesh=mesh,
    levels=range(efficientnet.NUM_LEVELS),
    batch_size=batch_size,
  )

  def pooled(split, category, split_name):
    def compute():
      try:
        return pipeline.pooled_features(
          extractor,
          split,
          image_size=image_size,
          mean=meta["mean"],
          std=meta["std"],
          num_workers=cfg.num_workers or os.cpu_count() or 2,
          desc=f"{category}/{split_name}",
        )
      except Exception as err:  # an accelerator's or the host's memory ran out
        if not _out_of_memory(err):
          raise
        raise MemoryError(
          f"out of memory extracting {category}/{split_name} at --image_size={image_size} "
          f"with --batch_size={extractor.batch_size}: lower --batch_size (or --image_size)."
        ) from None

    if cache is None:
      return compute()
    key = {
      "dataset": cfg.dataset,
      "category": category,
      "split": split_name,
      "data": split.fingerprint,
      "checkpoint_sha256": checkpoint_sha256,
      "arch": cfg.arch,
      "image_size": image_size,
      "dtype": cfg.dtype,
      "depthwise": depthwise or efficientnet.default_depthwise(mesh.devices.flat[0].platform),
    }
    return cache.get_or_compute(key, compute)

  results = {}
  map_outputs = {}
  if cfg.maps:
    from jax_gad.maps import pipeline as mp
    from jax_gad.maps import report as maps_report

    map_settings = mp.settings_for(
      cfg.arch, cfg.map_levels, cfg.map_channels, cfg.map_combine, cfg.map_sigma, cfg.map_ridge
    )
    map_run = mp.prepare(
      map_settings,
      extractor,
      meta["mean"],
      meta["std"],
      num_workers=cfg.num_workers or os.cpu_count() or 2,
      keep_all_folds=cfg.save_maps,
    )
  n_fits = len(categories) * len(cfg.folds) * len(levels)
  with tqdm(total=n_fits, desc="fit + score", unit="fit", disable=None) as bar:
    for c in categories:
      train, test = splits[c]
      feats_train = pooled(train, c, "train")
      feats_test = pooled(test, c, "test")
      all_folds = data.folds(len(train))
      results[c] = protocol.evaluate_category(
        c,
        [feats_train[l] for l in levels],
        [feats_test[l] for l in levels],
        test.labels,
        [all_folds[k] for k in cfg.folds],
        levels=levels,
        distances=cfg.distances,
        reduction=reduction,
        progress=bar.update,
        density=cfg.density,
        density_config=density_config,
        seed=cfg.seed,
      )
      if cfg.maps:
        map_outputs[c] = mp.run_category(
          c, train, test, [all_folds[k] for k in cfg.folds], cfg.folds, map_run
        )

  config_doc = cfg._asdict()
  # The density settings: absent for the Gaussian (its results.json is unchanged), else
  # {"name", "seed", "config"} with every field of the density's config.
  for name in cli.DENSITY_FLAGS:
    config_doc.pop(name)
  if cfg.density != "gaussian":
    config_doc["density"] = {
      "name": cfg.density,
      "seed": cfg.seed,
      "config": dataclasses.asdict(density_config),
    }
  config_doc.update(
    categories=list(categories),
    checkpoint=path,
    checkpoint_sha256=checkpoint_sha256,
    image_size=image_size,
    batch_size=batch_size,
    checkpoint_meta={
      k: meta[k] for k in ("arch", "source", "resolution", "mean", "std") if k in meta
    },
    reduction=reduction.name if reduction else None,
  )
  data_doc = {}
  for c, (train, test) in splits.items():
    labels = np.asarray(test.labels)
    data_doc[c] = {
      "train": len(train),
      "test_good": int(np.sum(labels == 0)),
      "test_defect": int(np.sum(labels == 1)),
      "fingerprint": {"train": train.fingerprint, "test": test.fingerprint},
      "has_masks": test.has_masks,
    }
    if train.raw_dir:
      data_doc[c]["raw_dir"] = train.raw_dir
  doc = report.report(
    config=json.loads(json.dumps(config_doc)),
    results=results,
    levels=levels,
    distances=cfg.distances,
    data=json.loads(json.dumps(data_doc)),
    versions=jax_gad.versions(),
  )
  if cfg.maps:
    doc["maps"] = maps_report.document(map_settings, cfg.map_channels, map_outputs)
  # In a multi-host run every process holds the same results; process 0 writes them.
  if jax.process_index() == 0:

    def write(folder):
      if cfg.maps:
        maps_report.write_outputs(folder, doc, map_outputs, cfg.folds, cfg.save_maps)
      report.write_reports(folder, doc, results, cfg.distances, plots=cfg.plots)

    files.write_dir(cfg.workdir, write)
  return doc


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  from jax_gad import report

  try:
    cli.initialize_multihost()
    cfg = config()
    doc = run(cfg)
  except (ValueError, OSError, ImportError, MemoryError) as e:  # bad input: say what, no traceback
    sys.exit(f"jax_gad.main: error: {e}")
  except KeyboardInterrupt:
    print("jax_gad.main: interrupted; the workdir was left as it was.", file=sys.stderr)
    sys.exit(130)
  title = (
    f"Image AUROC (%), mean ± SEM over {len(doc['config']['categories'])} categories x "
    f"{len(cfg.folds)} folds — {cfg.dataset}, {cfg.arch}"
  )
  if doc["config"]["reduction"]:
    title += f", {doc['config']['reduction']}"
  print()
  print(report.table1_markdown(doc["table1"], cfg.distances, title=title))
  print("Sum row per category:")
  print(report.per_category_markdown(doc["per_category"], cfg.distances))
  if "maps" in doc:
    print("Anomaly maps (%), mean ± SEM over folds (docs/maps.md):")
    from jax_gad.maps import report as maps_report

    print(maps_report.table(doc))
  print(f"Wrote results.json, tables and plots to {os.path.abspath(cfg.workdir)}")


def run_cli():
  """Console-script entry point (``jax-gad``)."""
  cli.show_in_help(Config._fields + cli.MULTIHOST_FLAGS)
  app.run(main)


if __name__ == "__main__":
  run_cli()
