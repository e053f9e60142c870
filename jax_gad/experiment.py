"""The Gaussian AD protocol on a dataset: what ``python -m jax_gad.main`` runs.

An image travels: disk -> :mod:`jax_gad.data` (TFDS dataset; decode, resize and
normalise in :mod:`jax_gad.data.pipeline`) -> :mod:`jax_gad.features`
(EfficientNet levels on every device, pooled; cached by
:mod:`jax_gad.feature_cache`) -> :mod:`jax_gad.protocol` (a density per fold
and level, scores, AUROC) -> :mod:`jax_gad.report` (``results.json`` and the
tables in the workdir).

Every input is checked before anything is written, so bad input (options,
data, weights) leaves the workdir as it was; each output file is written
atomically, and the workdir is replaced whole (docs/outputs.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

import jax_gad
from jax_gad import backbone as backbone_lib
from jax_gad import (
  config,
  data,
  densities,
  feature_cache,
  features,
  files,
  protocol,
  report,
)
from jax_gad.data import pipeline
from jax_gad.maps import pipeline as map_pipeline
from jax_gad.maps import report as maps_report
from jax_gad.models import efficientnet

N_FOLDS = 5  # the protocol's KFold


def check(cfg: config.Experiment):
  """Checks what can be checked without touching data or weights.

  Returns:
    (the PCA / NPCA reduction or None, the density's own config).
  """
  config.validate(cfg)
  reduction = protocol.reduction_from(cfg.levels.pca, cfg.levels.npca)
  dataset, categories = cfg.data.dataset, cfg.data.categories
  valid = data.CATEGORIES[dataset]
  bad = [c for c in categories if c not in valid]
  if bad:
    raise ValueError(
      f"--categories: unknown {bad} for dataset {dataset}; valid: "
      + (
        f"{list(valid)}."
        if dataset != "folder"
        else "folder names of letters, digits, '_', '-' and '.'."
      )
    )
  return reduction, cfg.density.model_config()


def check_folder(flag: str, path: str | None) -> None:
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


def check_workdir(workdir: str) -> None:
  """The workdir is replaced whole by a run: refuse a folder that holds something else."""
  check_folder("workdir", workdir)
  if os.path.isdir(workdir):
    names = [n for n in os.listdir(workdir) if not n.startswith(".")]
    if names and "results.json" not in names:
      shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
      raise ValueError(
        f"--workdir={workdir} holds files that are not a jax_gad run ({shown}); a run "
        "replaces its workdir whole, so give a new or empty folder, or a previous run's workdir."
      )


def _check_folders(cfg: config.Experiment) -> None:
  """Every folder the run writes to, and the temporaries of runs killed while writing."""
  check_workdir(cfg.protocol.workdir)
  cache_dir = cfg.backbone.cache_dir or None
  tfds_dir = (
    cfg.data.tfds_dir
    or os.environ.get("TFDS_DATA_DIR")
    or os.path.expanduser("~/tensorflow_datasets")
  )
  for flag, folder in (("cache_dir", cache_dir), ("tfds_dir", tfds_dir)):
    check_folder(flag, folder)
  _check_not_an_input(cfg, tfds_dir)
  workdir_parent = os.path.dirname(os.path.abspath(cfg.protocol.workdir))
  for folder in (workdir_parent, cache_dir, cfg.backbone.checkpoint_dir):
    if folder:
      files.remove_stale_temporaries(folder)
  if not cfg.backbone.checkpoint:
    check_folder("checkpoint_dir", cfg.backbone.checkpoint_dir)


def _check_not_an_input(cfg: config.Experiment, tfds_dir: str) -> None:
  """The workdir is replaced whole: it may not be, or hold, anything the run reads."""
  d, b = cfg.data, cfg.backbone
  categories = cfg.data.categories
  files.check_not_an_input(
    "workdir",
    cfg.protocol.workdir,
    [
      (f"category folder {c} of --data_dir", os.path.join(os.fspath(d.data_dir), c))
      for c in (categories if d.data_dir else ())
    ],
    kept=[
      (f"--{flag}", path)
      for flag, path in (
        ("data_dir", d.data_dir),
        ("checkpoint", b.checkpoint),
        ("checkpoint_dir", b.checkpoint_dir),
        ("cache_dir", b.cache_dir),
        ("tfds_dir", tfds_dir),
      )
    ],
  )


def check_splits(category: str, train, test) -> None:
  """Enough images for the protocol, checked before any feature is extracted."""
  if len(train) < N_FOLDS:
    raise ValueError(
      f"category {category}: {len(train)} training image(s); the {N_FOLDS}-fold protocol "
      f"needs at least {N_FOLDS} (each fold fits on 80 % of them)."
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


def open_splits(data_cfg: config.Data, categories) -> dict:
  """``{category: (train, test)}``, every split opened (prepared on first use) and checked.

  Bad data stops the run here, before it writes anything.
  """
  splits = {}
  for c in categories:
    # One scan of the raw folder (and one build lock) per category, both splits from it.
    builder = data.prepare(
      data_cfg.dataset, c, data_dir=data_cfg.data_dir, tfds_dir=data_cfg.tfds_dir
    )
    train, test = (data.Split.from_builder(builder, split) for split in ("train", "test"))
    check_splits(c, train, test)
    splits[c] = (train, test)
  return splits


def _out_of_memory(err: BaseException) -> bool:
  text = str(err)
  return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


class Extraction(NamedTuple):
  """The backbone as the run uses it: the loaded weights, the extractor, the feature cache."""

  backbone: Any  # backbone.Backbone: module, variables, path
  meta: dict  # the checkpoint's metadata
  sha256: str  # the checkpoint's content checksum
  image_size: int
  batch_size: int  # --batch_size, capped at the largest split
  extractor: features.LevelExtractor
  cache: feature_cache.FeatureCache | None
  depthwise: str  # the implementation actually used (for the cache key)


def _batch_size(requested: int, splits: dict) -> int:
  """A batch larger than every split only pads: cap it (the compiled shape is per batch)."""
  largest = max(len(s) for pair in splits.values() for s in pair)
  batch_size = min(requested, largest)
  if batch_size < requested:
    logging.warning(
      "--batch_size=%d is larger than the largest split (%d images); using %d.",
      requested,
      largest,
      batch_size,
    )
  return batch_size


def prepare_extraction(cfg: config.Backbone, loaded, splits: dict) -> Extraction:
  """The extractor of every level (one cache entry serves every --levels choice)."""
  backbone, meta, sha256 = loaded
  image_size = cfg.image_size or int(meta["resolution"])
  mesh = features.make_mesh()
  batch_size = _batch_size(cfg.batch_size, splits)
  extractor = backbone.extractor(
    image_size=image_size,
    mesh=mesh,
    levels=range(efficientnet.NUM_LEVELS),
    batch_size=batch_size,
  )
  cache = feature_cache.FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
  platform = mesh.devices.flat[0].platform
  depthwise = cfg.depthwise_impl or efficientnet.default_depthwise(platform)
  return Extraction(backbone, meta, sha256, image_size, batch_size, extractor, cache, depthwise)


def pooled_features(cfg: config.Experiment, ex: Extraction, split, category: str, name: str):
  """The pooled features of every level of one split, from the cache or extracted."""

  def compute():
    try:
      return pipeline.pooled_features(
        ex.extractor,
        split,
        image_size=ex.image_size,
        mean=ex.meta["mean"],
        std=ex.meta["std"],
        num_workers=cfg.backbone.workers,
        desc=f"{category}/{name}",
      )
    except Exception as err:  # an accelerator's or the host's memory ran out
      if not _out_of_memory(err):
        raise
      raise MemoryError(
        f"out of memory extracting {category}/{name} at --image_size={ex.image_size} "
        f"with --batch_size={ex.extractor.batch_size}: lower --batch_size (or --image_size)."
      ) from None

  if ex.cache is None:
    return compute()
  key = feature_cache.pooled_key(  # the entry jax_gad.fit reads and writes too
    cfg.data.dataset,
    category,
    name,
    split.fingerprint,
    ex.sha256,
    cfg.backbone.arch,
    ex.image_size,
    cfg.backbone.dtype,
    ex.depthwise,
  )
  return ex.cache.get_or_compute(key, compute)


class Evaluation(NamedTuple):
  """What the run computed: per category, the protocol's results and the map outputs."""

  results: dict
  map_settings: Any  # maps.pipeline.MapSettings, or None without --maps
  map_outputs: dict


def map_settings_of(cfg: config.Experiment):
  """The map settings of a ``--maps`` run (levels and channel subsets checked), else None."""
  m = cfg.maps
  if not m.maps:
    return None
  return map_pipeline.settings_for(
    cfg.backbone.arch, m.map_levels, m.map_channels, m.map_combine, m.map_sigma, m.map_ridge
  )


def check_fits(cfg: config.Experiment, splits: dict, density_config) -> None:
  """What the fits need of the data, before any feature is extracted; notes on the masks."""
  for c, (train, test) in splits.items():
    rows = min(len(protocol.folds(len(train))[k]) for k in cfg.protocol.folds)
    densities.check_rows(density_config, rows, f"of a {c} fold")
    for line in test.mask_warnings():  # also recorded in results.json
      logging.warning("%s", line)


def evaluate(cfg: config.Experiment, ex: Extraction, splits: dict, fitting) -> Evaluation:
  """Every category's folds and levels (and maps with --maps); ``fitting``: (reduction, config)."""
  reduction, density_config = fitting
  levels, folds = list(cfg.levels.levels), cfg.protocol.folds
  maps = cfg.maps
  map_settings = map_settings_of(cfg)
  map_run = None
  if maps.maps:
    map_run = map_pipeline.prepare(
      map_settings,
      ex.extractor,
      ex.meta["mean"],
      ex.meta["std"],
      num_workers=cfg.backbone.workers,
      keep_all_folds=maps.save_maps,
    )
  results, map_outputs = {}, {}
  with tqdm(
    total=len(splits) * len(folds) * len(levels), desc="fit + score", unit="fit", disable=None
  ) as bar:
    for c, (train, test) in splits.items():
      feats_train = pooled_features(cfg, ex, train, c, "train")
      feats_test = pooled_features(cfg, ex, test, c, "test")
      all_folds = protocol.folds(len(train))
      chosen = [all_folds[k] for k in folds]
      results[c] = protocol.evaluate_category(
        c,
        [feats_train[l] for l in levels],
        [feats_test[l] for l in levels],
        test.labels,
        chosen,
        levels=levels,
        distances=cfg.distances,
        reduction=reduction,
        progress=bar.update,
        density=protocol.DensitySpec(cfg.density.density, density_config, cfg.density.seed),
      )
      if maps.maps:
        map_outputs[c] = map_pipeline.run_category(c, train, test, chosen, folds, map_run)
  return Evaluation(results, map_settings, map_outputs)


def config_document(cfg: config.Experiment, ex: Extraction, categories, fitting) -> dict:
  """results.json's ``config``: every option, and what the run resolved (weights, size...)."""
  reduction, density_config = fitting
  doc = config.flat(cfg)
  # The density settings: absent for the Gaussian (its results.json is unchanged), else
  # {"name", "seed", "config"} with every field of the density's config.
  for name in config.options(config.Density):
    doc.pop(name)
  if cfg.density.density != "gaussian":
    doc["density"] = {
      "name": cfg.density.density,
      "seed": cfg.density.seed,
      "config": dataclasses.asdict(density_config),
    }
  meta = ex.meta
  doc.update(
    distances=cfg.distances,
    cache_dir=cfg.backbone.cache_dir or None,
    categories=list(categories),
    checkpoint=ex.backbone.path,
    checkpoint_sha256=ex.sha256,
    image_size=ex.image_size,
    batch_size=ex.batch_size,
    checkpoint_meta={
      k: meta[k] for k in ("arch", "source", "resolution", "mean", "std") if k in meta
    },
    reduction=reduction.name if reduction else None,
  )
  return json.loads(json.dumps(doc))


def data_document(splits: dict) -> dict:
  """results.json's ``data``: per category, the image counts and fingerprints."""
  doc = {}
  for c, (train, test) in splits.items():
    labels = np.asarray(test.labels)
    doc[c] = {
      "train": len(train),
      "test_good": int(np.sum(labels == 0)),
      "test_defect": int(np.sum(labels == 1)),
      "fingerprint": {"train": train.fingerprint, "test": test.fingerprint},
      "has_masks": test.has_masks,
    }
    if train.raw_dir:
      doc[c]["raw_dir"] = train.raw_dir
  return json.loads(json.dumps(doc))


def write(cfg: config.Experiment, doc: dict, evaluation: Evaluation) -> None:
  """Replaces the workdir whole with this run's reports (process 0 of a multi-host run)."""
  if jax.process_index() != 0:  # every process holds the same results
    return

  def fill(folder):
    if cfg.maps.maps:
      maps_report.write_outputs(
        folder, doc, evaluation.map_outputs, cfg.protocol.folds, cfg.maps.save_maps
      )
    report.write_reports(folder, doc, evaluation.results, cfg.distances, plots=cfg.plots.plots)

  files.write_dir(cfg.protocol.workdir, fill)


def run(cfg: config.Experiment) -> dict:
  """Runs the whole protocol for ``cfg`` and writes the reports. Returns results.json's content.

  Everything that can be checked is checked before any feature is extracted:
  the options, the folders the run writes to, the weights (format and content
  checksum) and the data (enough training images, both test labels). The
  outputs are written into a temporary folder beside the workdir and swapped
  in whole at the end, so the workdir always holds exactly one complete run
  (docs/outputs.md).
  """
  fitting = check(cfg)
  map_settings_of(cfg)  # bad map settings stop the run before any work
  categories = cfg.data.categories or tuple(data.CATEGORIES[cfg.data.dataset])
  _check_folders(cfg)
  b = cfg.backbone
  loaded = backbone_lib.load_backbone(
    b.arch, b.checkpoint, b.checkpoint_dir, b.dtype, b.depthwise_impl
  )
  splits = open_splits(cfg.data, categories)
  check_fits(cfg, splits, fitting[1])
  ex = prepare_extraction(b, loaded, splits)
  evaluation = evaluate(cfg, ex, splits, fitting)
  doc = report.report(
    config=config_document(cfg, ex, categories, fitting),
    results=evaluation.results,
    levels=list(cfg.levels.levels),
    distances=cfg.distances,
    data=data_document(splits),
    versions=jax_gad.versions(),
  )
  doc["warnings"] += [
    {"category": c, "split": "test", "message": line}
    for c, (_, test) in splits.items()
    for line in test.mask_warnings()
  ]
  if cfg.maps.maps:
    doc["maps"] = maps_report.document(
      evaluation.map_settings, cfg.maps.map_channels, evaluation.map_outputs
    )
  write(cfg, doc, evaluation)
  return doc


def summary(cfg: config.Experiment, doc: dict) -> str:
  """The tables the command prints: Table 1, the sum row per category, the maps table."""
  title = (
    f"Image AUROC (%), mean ± SEM over {len(doc['config']['categories'])} categories x "
    f"{len(cfg.protocol.folds)} folds — {cfg.data.dataset}, {cfg.backbone.arch}"
  )
  if doc["config"]["reduction"]:
    title += f", {doc['config']['reduction']}"
  lines = [
    "",
    report.table1_markdown(doc["table1"], cfg.distances, title=title),
    "Sum row per category:",
    report.per_category_markdown(doc["per_category"], cfg.distances),
  ]
  if "maps" in doc:
    lines += ["Anomaly maps (%), mean ± SEM over folds (docs/maps.md):", maps_report.table(doc)]
  return "\n".join(lines)
