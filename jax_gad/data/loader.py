"""Loading prepared datasets as small sequence-like splits, and the protocol's folds."""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from pathlib import Path
import shutil

import numpy as np
from sklearn.model_selection import KFold
import tensorflow_datasets as tfds

from jax_gad.data import common, folder, mvtec_ad, synthetic_ad


class OpenCategories(tuple):
  """The categories of the ``folder`` dataset: any valid folder name (iterates as empty)."""

  def __contains__(self, name) -> bool:
    try:
      folder.check_category_name(name)
    except ValueError:
      return False
    return True

  def __repr__(self) -> str:
    return "OpenCategories(any folder name)"


CATEGORIES: dict[str, tuple[str, ...]] = {
  "mvtec_ad": mvtec_ad.MVTEC_CATEGORIES,
  "synthetic_ad": synthetic_ad.SYNTHETIC_CATEGORIES,
  "folder": OpenCategories(),
}

_BUILDERS = {
  "mvtec_ad": mvtec_ad.MvtecAd,
  "synthetic_ad": synthetic_ad.SyntheticAd,
  "folder": folder.Folder,
}

# Config fields that describe a config rather than define its content.
_DESCRIPTIVE_CONFIG_FIELDS = ("description", "release_notes", "tags", "supported_versions")
# Fields of raw-folder configs that say where the data came from, not what it is
# (the recorded content hash says that): left out of the data fingerprint so that
# identical images in another folder, or touched files, share cached features.
_SOURCE_CONFIG_FIELDS = ("name", "raw_dir", "raw_fingerprint")


class DamagedDatasetError(ValueError):
  """A prepared dataset's files do not match what was recorded when it was built."""


def _rebuild_hint(builder) -> str:
  data_dir = os.fspath(builder.data_dir)
  raw = getattr(builder.builder_config, "raw_dir", "") or ""
  source = f" from {raw}" if raw else ""
  return f"delete that folder (rm -r '{data_dir}') and run again to rebuild it{source}"


def _damaged(builder, what: str) -> DamagedDatasetError:
  return DamagedDatasetError(
    f"the prepared dataset at {os.fspath(builder.data_dir)} is damaged ({what}); "
    + _rebuild_hint(builder)
  )


def _verify_files(builder, split: str) -> None:
  """Checks a split's shard files against the sizes recorded at build time (cheap: stat only)."""
  path = os.path.join(os.fspath(builder.data_dir), common.INTEGRITY_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except FileNotFoundError:
    raise _damaged(builder, f"{common.INTEGRITY_FILE} is missing") from None
  except (OSError, ValueError) as e:
    raise _damaged(builder, f"{common.INTEGRITY_FILE} is unreadable: {e}") from None
  if not isinstance(doc, dict) or doc.get("format") != common.INTEGRITY_FORMAT:
    raise _damaged(builder, f"{common.INTEGRITY_FILE} has an unknown format")
  prefix = f"{builder.name}-{split}."
  recorded = {n: s for n, s in doc.get("files", {}).items() if n.startswith(prefix)}
  if not recorded:
    raise _damaged(builder, f"no {split} files recorded in {common.INTEGRITY_FILE}")
  for name, size in sorted(recorded.items()):
    p = os.path.join(os.fspath(builder.data_dir), name)
    try:
      actual = os.stat(p).st_size
    except FileNotFoundError:
      raise _damaged(builder, f"{name} is missing") from None
    if actual != size:
      raise _damaged(builder, f"{name} has {actual} bytes, {size} were written")


class Split(collections.abc.Sequence):
  """One split of one category: ``len(split)``, ``split[i] -> dict``.

  ``split[i]`` decodes example ``i`` (PNG, with PIL) into a dict with
  'image' uint8 (H, W, 3), 'mask' uint8 (H, W) with values 0 (normal) or 255
  (defect), 'label' int (0 good, 1 defect), 'defect_type' str ('good' for good
  images) and 'file_name' str (relative to the category folder, e.g.
  'test/crack/000.png'). Examples are in the protocol's sorted order.

  Attributes (no image is decoded to get them):
    dataset, category, split: what this is.
    labels: int64 array (n,).
    defect_types: list of n str.
    file_names: list of n str.
    fingerprint: hex str that changes whenever the builder, its version, the
      config or the recorded content (file names, labels, defect types, source
      bytes) changes; meant as part of a feature-cache key and for results.
    counts: ``{'good': n_good, 'defect': n_defect}``.
    has_masks: whether masks mark the defects (False for a folder category
      without ``ground_truth/``: every mask is all zero then).
    mask_notes: ``{'non_binary' | 'empty': [file names]}``, masks recorded as
      odd when the split was prepared (``jax_gad.data.folder.mask_notes``);
      :meth:`mask_warnings` says them in lines.
    prepared_dir: the prepared TFDS folder ('' for in-memory splits).
    raw_dir: the raw category folder it was built from ('' if generated).

  Every example read is checked against the digest recorded when it was
  written; a mismatch (or an unreadable record) raises
  :class:`DamagedDatasetError` naming the prepared folder and how to rebuild.
  """

  def __init__(
    self,
    source,
    *,
    dataset: str,
    category: str,
    split: str,
    labels,
    defect_types,
    file_names,
    fingerprint: str,
    stored_sha256=None,
    has_masks: bool = True,
    prepared_dir: str = "",
    raw_dir: str = "",
    damaged=None,
    mask_notes=None,
  ):
    self._source = source
    self.dataset = dataset
    self.category = category
    self.split = split
    self.labels = np.asarray(labels, dtype=np.int64)
    self.defect_types = list(defect_types)
    self.file_names = list(file_names)
    self.fingerprint = fingerprint
    self.has_masks = bool(has_masks)
    self.prepared_dir = prepared_dir
    self.raw_dir = raw_dir
    self._stored_sha256 = None if stored_sha256 is None else list(stored_sha256)
    self._damaged = damaged
    self.mask_notes = dict(mask_notes or {})

  def mask_warnings(self) -> list[str]:
    """One line per kind of odd mask (not binary; all zero on a defect image), naming files."""
    where = f"{self.dataset} {self.category}/{self.split}"
    return common.mask_warnings(where, self.mask_notes)

  @property
  def counts(self) -> dict:
    return {"good": int((self.labels == 0).sum()), "defect": int((self.labels == 1).sum())}

  def require_masks(self, what: str = "pixel-level evaluation") -> None:
    """Raises ValueError saying clearly that this category has no masks, if so."""
    if not self.has_masks:
      where = f" ({self.raw_dir})" if self.raw_dir else ""
      raise ValueError(
        f"{self.dataset} category {self.category!r}{where} has no ground-truth masks (no "
        f"ground_truth/ folder), so {what} is not available; image-level results are"
      )

  @classmethod
  def from_builder(cls, builder: tfds.core.DatasetBuilder, split: str) -> "Split":
    """Opens a prepared builder's split for reading, after checking its files."""
    if split not in common.SPLITS:
      raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(common.SPLITS)}")
    meta = builder.info.metadata or {}
    if meta.get("format") != common.METADATA_FORMAT:
      raise DamagedDatasetError(
        f"the prepared dataset at {builder.data_dir} lacks jax_gad's split "
        f"metadata (format {common.METADATA_FORMAT}); " + _rebuild_hint(builder)
      )
    record = (meta.get("splits") or {}).get(split)
    config = builder.builder_config
    raw_dir = getattr(config, "raw_dir", "") or ""
    if record is None:
      if "train" in (meta.get("splits") or {}) and split in builder.info.splits.keys():
        raise _damaged(builder, f"no {split} split recorded")
      if "train" in (meta.get("splits") or {}):
        where = f": {raw_dir}/{split}/ is missing or holds no images" if raw_dir else ""
        raise ValueError(f"{builder.name} {config.name!r} has no {split} images{where}")
      raise _damaged(builder, f"no {split} split recorded")
    _verify_files(builder, split)
    try:
      source = builder.as_data_source(
        split,
        decoders={"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()},
      )
      n_source = len(source)
    except Exception as e:  # the record reader's own errors
      raise _damaged(builder, f"{split} records unreadable: {type(e).__name__}: {e}") from None
    if n_source != len(record["file_names"]):
      raise _damaged(
        builder,
        f"it holds {n_source} {split} examples but its metadata lists {len(record['file_names'])}",
      )
    source_fields = _SOURCE_CONFIG_FIELDS if raw_dir else ()
    config_fields = {
      f.name: str(getattr(config, f.name))
      for f in dataclasses.fields(config)
      if f.name not in _DESCRIPTIVE_CONFIG_FIELDS + source_fields
    }
    key = {
      "builder": builder.name,
      "version": str(builder.version),
      "config": config_fields,
      "split": split,
      "metadata_format": meta["format"],
      "num_examples": len(source),
      "file_names_sha256": common.sha256("\n".join(record["file_names"]).encode("utf-8")),
      "content_sha256": record["content_sha256"],
    }
    fingerprint = common.sha256(json.dumps(key, sort_keys=True).encode("utf-8"))
    return cls(
      source,
      dataset=builder.name,
      category=getattr(config, "category", config.name),
      split=split,
      labels=record["labels"],
      defect_types=record["defect_types"],
      file_names=record["file_names"],
      fingerprint=fingerprint,
      stored_sha256=record["stored_sha256"],
      has_masks=bool(meta.get("has_masks", True)),
      prepared_dir=os.fspath(builder.data_dir),
      raw_dir=raw_dir,
      damaged=lambda what: _damaged(builder, what),
      mask_notes=record.get("mask_notes"),
    )

  def __len__(self) -> int:
    return len(self.file_names)

  def __getitem__(self, index) -> dict:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"Split indices must be integers, got {type(index).__name__}")
    n = len(self)
    i = int(index) + n if index < 0 else int(index)
    if not 0 <= i < n:
      raise IndexError(f"index {index} out of range for a split of {n} examples")
    try:
      ex = self._source[i]
    except Exception as e:  # the record reader's own errors: a damaged file
      if self._damaged is None:
        raise
      raise self._damaged(
        f"example {i} of {self.split} unreadable: {type(e).__name__}: {e}"
      ) from None
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    if self._stored_sha256 is not None:
      digest = common.stored_digest(
        ex["image"], ex["mask"], int(ex["label"]), text(ex["defect_type"]), text(ex["file_name"])
      )
      if digest != self._stored_sha256[i] or text(ex["file_name"]) != self.file_names[i]:
        raise self._damaged(
          f"example {i} of {self.split} ({self.file_names[i]}) differs from what was written"
        )
    return {
      "image": common.decode_image(ex["image"]),
      "mask": common.decode_mask(ex["mask"]),
      "label": int(ex["label"]),
      "defect_type": text(ex["defect_type"]),
      "file_name": text(ex["file_name"]),
    }

  def __repr__(self) -> str:
    return (
      f"Split(dataset={self.dataset!r}, category={self.category!r}, "
      f"split={self.split!r}, n={len(self)}, good={int((self.labels == 0).sum())}, "
      f"defect={int((self.labels == 1).sum())})"
    )


def _check_names(dataset: str, category: str, split: str) -> None:
  if dataset not in CATEGORIES:
    raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(CATEGORIES)}")
  if dataset == "folder":
    folder.check_category_name(category)
  elif category not in CATEGORIES[dataset]:
    raise ValueError(
      f"unknown {dataset} category {category!r}; valid categories: {', '.join(CATEGORIES[dataset])}"
    )
  if split not in common.SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(common.SPLITS)}")


@contextlib.contextmanager
def build_lock(builder):
  """Holds an exclusive lock on one prepared dataset (one config) while it is checked and built.

  A second process preparing the same dataset waits here, then finds it
  prepared and reuses it instead of racing TFDS's final rename. The lock is an
  ``flock`` on ``<tfds_dir>/<dataset>/.<config>.lock``, released by the kernel
  if its holder dies, so a killed build never blocks later runs.
  """
  dataset_dir = Path(os.fspath(builder.data_dir)).parents[1]
  dataset_dir.mkdir(parents=True, exist_ok=True)
  lock_path = dataset_dir / f".{builder.builder_config.name}.lock"
  with open(lock_path, "a+b") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_incomplete(builder) -> None:
  """Deletes TFDS's ``incomplete.*`` build folders of this config (call under the lock)."""
  config_dir = Path(builder.data_dir).parent
  if config_dir.is_dir():
    for leftover in config_dir.glob("incomplete.*"):
      logging.warning("removing %s, left by a build that did not finish", leftover)
      shutil.rmtree(leftover, ignore_errors=True)


class _CustomConfigWarning(logging.Filter):
  """Drops TFDS's "Using custom data configuration" warning.

  TFDS warns whenever a builder gets a config that is not one of its class's
  predefined ones; the raw-folder datasets (mvtec_ad, folder) always do, by
  design (the config names the raw folder's fingerprint).
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg != "Using custom data configuration: %s"


def _builder(cls, builder_kwargs: dict):
  """``cls(**builder_kwargs)`` without TFDS's custom-config warning (TFDS logs through absl)."""
  absl_logger = logging.getLogger("absl")
  quiet = _CustomConfigWarning()
  absl_logger.addFilter(quiet)
  try:
    return cls(**builder_kwargs)
  finally:
    absl_logger.removeFilter(quiet)


def _is_prepared(builder) -> bool:
  """TFDS's ``is_prepared``, asked only once the version folder exists.

  TFDS warns "Variant folder ... has no dataset_info.json" whenever it checks
  a folder that is not there yet, i.e. on every check before a first build.
  """
  return os.path.isdir(os.fspath(builder.data_dir)) and builder.is_prepared()


@contextlib.contextmanager
def _no_tfds_progress_bars():
  """TFDS's build bars off while jax_gad builds (restored after).

  They name TFDS's temporary files ("Shuffling .../incomplete.D9JDQJ_1.0.0/
  ...-[0-9][0-9][0-9][0-9][0-9]-of-..."), not what the user asked for; the
  build is announced by one line of :func:`prepare` instead. TFDS has no
  public getter for the setting, hence the read of its module flag.
  """
  before = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(before)


def prepare(
  dataset: str, category: str, *, data_dir=None, tfds_dir=None
) -> tfds.core.DatasetBuilder:
  """Returns the category's builder, building the dataset first if needed.

  Building writes ``array_record`` files under
  ``<tfds_dir>/<dataset>/<config>/<version>/`` (TFDS first writes into a
  temporary ``incomplete.*`` folder and renames it at the end, deleting it if
  the build fails, so a failed build leaves nothing a later load would use),
  with the files' sizes recorded in ``jax_gad_integrity.json`` inside it. Building is
  serialised per dataset by :func:`build_lock`: concurrent runs wait and reuse.

  For raw-folder datasets (mvtec_ad, folder) the config is named
  ``<category>-<raw fingerprint>`` (:func:`jax_gad.data.folder.raw_fingerprint`:
  real path, names, sizes and modification times of the raw files), so the
  prepared data always matches the raw folder as it is now: a changed folder
  is prepared anew, and two raw folders never share prepared data. Earlier
  versions stay on disk until deleted (``<tfds_dir>/<dataset>/<category>-*``).

  Args:
    dataset: 'mvtec_ad', 'folder' or 'synthetic_ad'.
    category: one of ``CATEGORIES[dataset]`` (any folder name for 'folder').
    data_dir: the raw folder holding ``<category>/``; required for mvtec_ad
      and folder, unused for synthetic_ad.
    tfds_dir: where prepared datasets live (TFDS default when None, usually
      ``~/tensorflow_datasets``).
  """
  _check_names(dataset, category, "train")
  cls = _BUILDERS[dataset]
  if dataset == "mvtec_ad":
    config = folder.make_config(mvtec_ad.MvtecAdConfig, mvtec_ad.scan(data_dir, category), category)
  elif dataset == "folder":
    config = folder.make_config(
      folder.FolderConfig, folder.Folder.scan(data_dir, category), category
    )
  else:
    config = category
  builder_kwargs = {"config": config, "file_format": "array_record"}
  if tfds_dir is not None:
    builder_kwargs["data_dir"] = os.fspath(os.path.expanduser(os.fspath(tfds_dir)))
  builder = _builder(cls, builder_kwargs)
  # Prepared before we came: this builder read its info (and metadata) from disk.
  read_from_disk = _is_prepared(builder)
  with build_lock(builder):
    # Holding the lock, no other build of this config runs: TFDS's temporary
    # folders here are leftovers of a killed build.
    _remove_incomplete(builder)
    if (
      _is_prepared(builder)
      and dataset == "synthetic_ad"
      and ((builder.info.metadata or {}).get("format") != common.METADATA_FORMAT)
    ):
      # Generated data written by an older jax_gad: rebuild it, nothing is lost.
      logging.warning("rebuilding %s (prepared by an older jax_gad)", builder.data_dir)
      shutil.rmtree(builder.data_dir)
      builder = _builder(cls, builder_kwargs)
    if _is_prepared(builder) and read_from_disk:
      return builder
    if not _is_prepared(builder):
      logging.info("preparing %s/%s in %s (first use only)", dataset, category, builder.data_dir)
      with _no_tfds_progress_bars():
        builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
          )
        )
  # Built here or by another process meanwhile: a fresh builder reads the
  # dataset info (and jax_gad's metadata) from disk.
  return _builder(cls, builder_kwargs)


def load(dataset: str, category: str, split: str, *, data_dir=None, tfds_dir=None) -> Split:
  """Loads one split of one category, building the TFDS dataset on first use.

  Args:
    dataset: 'mvtec_ad', 'folder' or 'synthetic_ad'.
    category: one of ``CATEGORIES[dataset]``; any folder name for 'folder'.
    split: 'train' or 'test'.
    data_dir: the raw folder holding ``<category>/`` (for MVTec AD the
      extracted archive); required for mvtec_ad and folder (the prepared data
      is checked against it at every load), unused for synthetic_ad.
    tfds_dir: where prepared TFDS datasets live (TFDS default when None).

  Returns:
    A ``Split``.

  Raises:
    ValueError: unknown dataset/category/split (listing the valid names), or
      raw data missing, not MVTec-shaped, or corrupt (naming the file), or a
      folder category without test images when split='test'.
    DamagedDatasetError (a ValueError): prepared files changed since they were
      built; names the folder and how to rebuild.
  """
  _check_names(dataset, category, split)
  builder = prepare(dataset, category, data_dir=data_dir, tfds_dir=tfds_dir)
  return Split.from_builder(builder, split)


def folds(n_train: int, n_splits: int = 5, seed: int = 0) -> list[np.ndarray]:
  """Index arrays of the fitting part of each fold (docs/method.md, "Folds").

  Exactly the train parts of ``KFold(n_splits, shuffle=True,
  random_state=seed).split`` over ``range(n_train)``, i.e. over the sorted
  train/good list.

  Returns:
    ``n_splits`` sorted int64 arrays.
  """
  for name, value, low in (("n_train", n_train, 1), ("n_splits", n_splits, 2)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  if n_splits > n_train:
    raise ValueError(
      f"n_splits={n_splits} folds need at least as many training images, got n_train={n_train}"
    )
  kfold = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
  return [np.sort(train).astype(np.int64) for train, _ in kfold.split(np.arange(n_train))]
