"""Loading prepared datasets as small sequence-like splits, and the protocol's folds."""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os

import numpy as np
from sklearn.model_selection import KFold
import tensorflow_datasets as tfds

from jax_gad.data import common
from jax_gad.data import mvtec_ad
from jax_gad.data import synthetic_ad

CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec_ad": mvtec_ad.MVTEC_CATEGORIES,
    "synthetic_ad": synthetic_ad.SYNTHETIC_CATEGORIES,
}

_BUILDERS = {
    "mvtec_ad": mvtec_ad.MvtecAd,
    "synthetic_ad": synthetic_ad.SyntheticAd,
}

# Config fields that describe a config rather than define its content.
_DESCRIPTIVE_CONFIG_FIELDS = ("description", "release_notes", "tags",
                              "supported_versions")


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
      bytes) changes; meant as part of a feature-cache key.
  """

  def __init__(self, source, *, dataset: str, category: str, split: str,
               labels, defect_types, file_names, fingerprint: str):
    self._source = source
    self.dataset = dataset
    self.category = category
    self.split = split
    self.labels = np.asarray(labels, dtype=np.int64)
    self.defect_types = list(defect_types)
    self.file_names = list(file_names)
    self.fingerprint = fingerprint

  @classmethod
  def from_builder(cls, builder: tfds.core.DatasetBuilder, split: str) -> "Split":
    """Opens a prepared mvtec_ad / synthetic_ad builder's split for reading."""
    if split not in common.SPLITS:
      raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(common.SPLITS)}")
    meta = builder.info.metadata or {}
    record = (meta.get("splits") or {}).get(split)
    if meta.get("format") != common.METADATA_FORMAT or record is None:
      raise ValueError(
          f"the prepared dataset at {builder.data_dir} lacks jax_gad's split "
          f"metadata (format {common.METADATA_FORMAT}); delete that folder and "
          "load again to rebuild it"
      )
    source = builder.as_data_source(
        split,
        decoders={"image": tfds.decode.SkipDecoding(),
                  "mask": tfds.decode.SkipDecoding()},
    )
    if len(source) != len(record["file_names"]):
      raise ValueError(
          f"the prepared dataset at {builder.data_dir} holds {len(source)} "
          f"{split} examples but its metadata lists {len(record['file_names'])}; "
          "delete that folder and load again to rebuild it"
      )
    config = builder.builder_config
    config_fields = {
        f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)
        if f.name not in _DESCRIPTIVE_CONFIG_FIELDS
    }
    key = {
        "builder": builder.name,
        "version": str(builder.version),
        "config": config_fields,
        "split": split,
        "metadata_format": meta["format"],
        "num_examples": len(source),
        "file_names_sha256": common.sha256(
            "\n".join(record["file_names"]).encode("utf-8")),
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
    ex = self._source[i]
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return {
        "image": common.decode_image(ex["image"]),
        "mask": common.decode_mask(ex["mask"]),
        "label": int(ex["label"]),
        "defect_type": text(ex["defect_type"]),
        "file_name": text(ex["file_name"]),
    }

  def __repr__(self) -> str:
    return (f"Split(dataset={self.dataset!r}, category={self.category!r}, "
            f"split={self.split!r}, n={len(self)}, good={int((self.labels == 0).sum())}, "
            f"defect={int((self.labels == 1).sum())})")


def _check_names(dataset: str, category: str, split: str) -> None:
  if dataset not in CATEGORIES:
    raise ValueError(
        f"unknown dataset {dataset!r}; valid datasets: {', '.join(CATEGORIES)}")
  if category not in CATEGORIES[dataset]:
    raise ValueError(
        f"unknown {dataset} category {category!r}; valid categories: "
        f"{', '.join(CATEGORIES[dataset])}")
  if split not in common.SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(common.SPLITS)}")


def prepare(dataset: str, category: str, *, data_dir=None, tfds_dir=None
            ) -> tfds.core.DatasetBuilder:
  """Returns the category's builder, building the dataset first if needed.

  Building writes ``array_record`` files under
  ``<tfds_dir>/<dataset>/<category>/<version>/`` (TFDS first writes into a
  temporary ``incomplete.*`` folder and renames it at the end, deleting it if
  the build fails, so a failed build leaves nothing a later load would use).
  An existing prepared dataset is reused as it is: delete its folder to
  rebuild after the raw data changed.

  Args:
    dataset: 'mvtec_ad' or 'synthetic_ad'.
    category: one of ``CATEGORIES[dataset]``.
    data_dir: the extracted MVTec AD folder; only needed to build mvtec_ad.
    tfds_dir: where prepared datasets live (TFDS default when None, usually
      ``~/tensorflow_datasets``).
  """
  _check_names(dataset, category, "train")
  builder_kwargs = {"config": category, "file_format": "array_record"}
  if tfds_dir is not None:
    builder_kwargs["data_dir"] = os.fspath(os.path.expanduser(os.fspath(tfds_dir)))
  builder = _BUILDERS[dataset](**builder_kwargs)
  if not builder.is_prepared():
    download_config = {"compute_stats": tfds.download.ComputeStatsMode.SKIP}
    if dataset == "mvtec_ad":
      mvtec_ad.check_data_dir(data_dir, category)
      download_config["manual_dir"] = os.fspath(os.path.expanduser(os.fspath(data_dir)))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(**download_config))
  return builder


def load(dataset: str, category: str, split: str, *, data_dir=None,
         tfds_dir=None) -> Split:
  """Loads one split of one category, building the TFDS dataset on first use.

  Args:
    dataset: 'mvtec_ad' or 'synthetic_ad'.
    category: one of ``CATEGORIES[dataset]``.
    split: 'train' or 'test'.
    data_dir: the extracted raw MVTec AD folder (the TFDS manual dir), needed
      only when mvtec_ad is not prepared yet; unused for synthetic_ad.
    tfds_dir: where prepared TFDS datasets live (TFDS default when None).

  Returns:
    A ``Split``.

  Raises:
    ValueError: unknown dataset/category/split (listing the valid names), or
      raw data missing, not MVTec-shaped, or corrupt (naming the file).
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
        f"n_splits={n_splits} folds need at least as many training images, "
        f"got n_train={n_train}")
  kfold = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
  return [np.sort(train).astype(np.int64)
          for train, _ in kfold.split(np.arange(n_train))]
