"""Command-line flags shared by jax_gad's commands, each defined exactly once.

Every command (``main``, ``fit``, ``predict``, ...) imports this module and
declares the shared flags it uses as key flags (so its ``--help`` lists them);
flags that only one command has are defined in that command's module. The
rules that apply to every flag of a kind live here, in absl's own tools:

* path flags (:func:`DEFINE_path`) expand ``~`` when parsed, whichever flag
  and whichever command;
* list flags (:func:`DEFINE_enum_list`, :func:`DEFINE_int_list`,
  :func:`DEFINE_unique_list`) refuse a value given twice, with a message
  that names the flag;
* bounds are ``lower_bound`` / validators; flags that only work together are
  checked together (:func:`check_multihost`).

A command builds its configuration from the parsed values with
:func:`values`, so no default is written twice.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from absl import flags

from jax_gad import compile_cache, densities
from jax_gad.densities import flow as _dens_flow
from jax_gad.densities import gmm as _dens_gmm
from jax_gad.models import efficientnet

FLAGS = flags.FLAGS

# The dataset builders of jax_gad.data (kept here so that --help does not import TFDS;
# tests/test_cli.py checks that the two agree).
DATASETS = ("mvtec_ad", "synthetic_ad", "folder")


# ---------------------------------------------------------------------------
# Parsers: one rule per kind of flag
# ---------------------------------------------------------------------------


class PathParser(flags.ArgumentParser):
  """A file or folder path; ``~`` and ``~user`` are expanded. '' stays ''."""

  syntactic_help = "a path"

  def parse(self, argument):
    if argument is None:
      return None
    return os.path.expanduser(str(argument))

  def flag_type(self):
    return "path"


def _no_repeats(values: Sequence) -> None:
  seen, repeated = set(), []
  for v in values:
    if v in seen and v not in repeated:
      repeated.append(v)
    seen.add(v)
  if repeated:
    raise ValueError(f"lists {', '.join(map(str, repeated))} more than once; give each value once")


class UniqueListParser(flags.ListParser):
  """A comma-separated list in which no value appears twice."""

  def parse(self, argument):
    values = super().parse(argument)
    _no_repeats(values)
    return values


class EnumListParser(UniqueListParser):
  """A comma-separated list of distinct values from a fixed set."""

  def __init__(self, choices: Iterable[str], allow_empty: bool = False):
    super().__init__()
    self.choices = tuple(choices)
    self.allow_empty = allow_empty
    self.syntactic_help = f"a comma-separated list of distinct values from {list(self.choices)}"

  def parse(self, argument):
    values = super().parse(argument)
    unknown = [v for v in values if v not in self.choices]
    if unknown:
      raise ValueError(f"unknown {unknown}; choose from {list(self.choices)}")
    if not values and not self.allow_empty:
      raise ValueError(f"give at least one of {list(self.choices)}")
    return values


class IntListParser(UniqueListParser):
  """A comma-separated list of distinct integers in [low, high]."""

  def __init__(self, low: int, high: int, allow_empty: bool = False):
    super().__init__()
    self.low, self.high, self.allow_empty = low, high, allow_empty
    self.syntactic_help = f"a comma-separated list of distinct integers in {low}..{high}"

  def parse(self, argument):
    if isinstance(argument, (list, tuple)) and all(isinstance(v, int) for v in argument):
      values = list(argument)
      _no_repeats(values)
    else:
      strings = super().parse(argument)
      try:
        values = [int(v) for v in strings]
      except ValueError:
        raise ValueError(f"must be integers, got {','.join(strings)!r}") from None
    bad = [v for v in values if not self.low <= v <= self.high]
    if bad or not (values or self.allow_empty):
      raise ValueError(f"must list integers in {self.low}..{self.high}, got {values}")
    return values


def _caller_module() -> str:
  """The module that called a ``DEFINE_*`` below, named as absl names modules."""
  import sys

  name = sys._getframe(2).f_globals.get("__name__", "")  # pylint: disable=protected-access
  return sys.argv[0] if name == "__main__" else name


def DEFINE_path(name: str, default: str | None, help_: str, **kwargs):  # noqa: N802 (absl style)
  """A path flag; ``~`` is expanded when parsed."""
  kwargs.setdefault("module_name", _caller_module())
  return flags.DEFINE(PathParser(), name, default, help_, **kwargs)


def DEFINE_unique_list(name: str, default, help_: str, **kwargs):  # noqa: N802
  """A comma-separated list flag that refuses repeated values."""
  kwargs.setdefault("module_name", _caller_module())
  return flags.DEFINE(
    UniqueListParser(), name, default, help_, serializer=flags.CsvListSerializer(","), **kwargs
  )


def DEFINE_enum_list(  # noqa: N802
  name: str, default, choices: Iterable[str], help_: str, allow_empty: bool = False, **kwargs
):
  """A comma-separated list flag of distinct values from ``choices`` (empty if allowed)."""
  kwargs.setdefault("module_name", _caller_module())
  return flags.DEFINE(
    EnumListParser(choices, allow_empty),
    name,
    default,
    help_,
    serializer=flags.CsvListSerializer(","),
    **kwargs,
  )


def DEFINE_int_list(
  name: str,
  default,
  low: int,
  high: int,
  help_: str,  # noqa: N802
  allow_empty: bool = False,
  **kwargs,
):
  """A comma-separated list flag of distinct integers in [low, high] (empty if allowed)."""
  kwargs.setdefault("module_name", _caller_module())
  return flags.DEFINE(
    IntListParser(low, high, allow_empty),
    name,
    default,
    help_,
    serializer=flags.CsvListSerializer(","),
    **kwargs,
  )


def _open_unit_interval(value) -> bool:
  return value is None or 0.0 < value < 1.0


# ---------------------------------------------------------------------------
# Shared flags
# ---------------------------------------------------------------------------

# Data.
flags.DEFINE_enum("dataset", "synthetic_ad", list(DATASETS), "Dataset to evaluate on.")
DEFINE_path(
  "data_dir",
  None,
  "The raw dataset folder (for mvtec_ad: the extracted MVTec AD folder holding "
  "bottle/, cable/, ...; for folder: the folder holding <category>/train/good). "
  "Not needed for synthetic_ad.",
)
DEFINE_path(
  "tfds_dir", None, "Where prepared TFDS datasets are kept (default: TFDS's ~/tensorflow_datasets)."
)
DEFINE_unique_list(
  "categories",
  [],
  "Categories to run (default: all of the dataset; required for --dataset=folder, whose "
  "categories are any folder names under --data_dir).",
)

# Backbone.
flags.DEFINE_enum("arch", "efficientnet-b4", list(efficientnet.ARCHS), "Backbone architecture.")
DEFINE_path(
  "checkpoint",
  None,
  "Converted weights (.msgpack, see `python -m jax_gad.convert`). Default: "
  "<checkpoint_dir>/<arch>.msgpack; Lite0-2 are converted there on first use.",
)
DEFINE_path("checkpoint_dir", "checkpoints", "Folder of converted checkpoints.")
flags.DEFINE_integer(
  "image_size", None, "Square input size (default: the checkpoint's native size).", lower_bound=16
)
flags.DEFINE_integer(
  "batch_size", 16, "Global batch size of feature extraction (all devices).", lower_bound=1
)
flags.DEFINE_integer(
  "num_workers",
  None,
  "Threads that decode and resize images while the device computes "
  "(default: the number of CPU cores).",
  lower_bound=1,
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Backbone computation dtype.")
flags.DEFINE_enum(
  "depthwise",
  "auto",
  ["auto", *efficientnet.DEPTHWISE_IMPLS],
  "Depthwise convolution implementation (auto: the measured default of the "
  "backend; docs/architecture.md, 'Depthwise convolution').",
)
DEFINE_path(
  "cache_dir", "~/.cache/jax_gad/features", "Feature cache folder ('' disables the cache)."
)
flags.DEFINE_bool(
  "plots",
  True,
  "Write the plots (PNG): main the ROC and per-level plots; fit and predict the score "
  "histogram beside --output (<output without extension>_histogram.png).",
)
DEFINE_path(
  "compile_cache",
  compile_cache.DEFAULT_DIR,
  "Folder of JAX's persistent compilation cache: programs compiled once are loaded by later "
  "runs instead of compiled again ('' disables it; docs/own-images.md).",
)

# What is fitted.
DEFINE_int_list(
  "levels",
  list(range(efficientnet.NUM_LEVELS)),
  0,
  efficientnet.NUM_LEVELS - 1,
  "Levels to use (0 = stem ... 8 = head).",
)
flags.DEFINE_float(
  "pca",
  None,
  "PCA before the fit: keep components up to cumulative variance t in (0, 1), "
  "e.g. 0.99 (the poster's 'PCA 99 %').",
)
flags.DEFINE_float(
  "npca",
  None,
  "Negated PCA: keep the components beyond cumulative variance t in (0, 1), "
  "e.g. 0.99 (the poster's 'NPCA 1 %').",
)
flags.register_validator("pca", _open_unit_interval, "--pca must lie in (0, 1)")
flags.register_validator("npca", _open_unit_interval, "--npca must lie in (0, 1)")
flags.mark_flags_as_mutual_exclusive(["pca", "npca"])

# Density model (jax_gad.densities; docs/densities.md). Defaults are those of the configs.
_GMM = _dens_gmm.GMMConfig()
_FLOW = _dens_flow.FlowConfig()
flags.DEFINE_enum(
  "density",
  "gaussian",
  sorted(densities.DENSITIES),
  "Density fitted per (fold, level): gaussian (the paper's Ledoit-Wolf Gaussian; scores "
  "l2, sed, mahalanobis), gmm (Gaussian mixture, EM) or flow (RealNVP normalizing flow); "
  "the last two score with their negative log-likelihood, 'nll'.",
)
flags.DEFINE_integer(
  "seed",
  0,
  "PRNG seed: of the density fits (GMM initialisation, flow split/weights/minibatches; "
  "fold f, level l use fold_in(fold_in(key(seed), f), l)); in the benchmark, of its inputs "
  "and random weights.",
)
DEFINE_int_list(
  "gmm_components",
  list(_GMM.n_components),
  1,
  1 << 16,
  "--density=gmm: numbers of components to try; the lowest BIC wins (one value: fixed k).",
)
flags.DEFINE_enum(
  "gmm_regularization",
  _GMM.regularization,
  list(_dens_gmm.REGULARIZATIONS),
  "--density=gmm: covariance regularisation, ledoit_wolf (per-component shrinkage, then "
  "+gmm_reg_covar) or reg_covar (scikit-learn's: only +gmm_reg_covar on the diagonal).",
)
flags.DEFINE_float(
  "gmm_reg_covar",
  _GMM.reg_covar,
  "--density=gmm: added to every covariance diagonal.",
  lower_bound=0.0,
)
flags.DEFINE_float(
  "gmm_tol",
  _GMM.tol,
  "--density=gmm: EM stops when the mean log-likelihood changes less.",
  lower_bound=0.0,
)
flags.DEFINE_integer(
  "gmm_max_iter", _GMM.max_iter, "--density=gmm: maximum EM iterations.", lower_bound=1
)
flags.DEFINE_integer(
  "flow_layers", _FLOW.n_layers, "--density=flow: affine coupling layers.", lower_bound=1
)
flags.DEFINE_integer(
  "flow_hidden", _FLOW.hidden, "--density=flow: width of the conditioner MLPs.", lower_bound=1
)
flags.DEFINE_integer(
  "flow_epochs", _FLOW.epochs, "--density=flow: maximum training epochs.", lower_bound=1
)
flags.DEFINE_integer(
  "flow_batch_size", _FLOW.batch_size, "--density=flow: minibatch rows.", lower_bound=1
)
flags.DEFINE_float(
  "flow_learning_rate",
  _FLOW.learning_rate,
  "--density=flow: peak AdamW learning rate (warm-up, then cosine decay).",
  lower_bound=0.0,
)
flags.DEFINE_float(
  "flow_weight_decay", _FLOW.weight_decay, "--density=flow: AdamW weight decay.", lower_bound=0.0
)
flags.DEFINE_float(
  "flow_val_fraction",
  _FLOW.val_fraction,
  "--density=flow: held-out share of the training rows for early stopping, in (0, 1).",
)
flags.DEFINE_integer(
  "flow_patience",
  _FLOW.patience,
  "--density=flow: epochs without a better held-out loss before stopping.",
  lower_bound=1,
)
flags.DEFINE_bool(
  "flow_vmap_levels",
  _FLOW.vmap_levels,
  "--density=flow: train all levels of a fold in one vmapped program (padded to the widest "
  "level; pays on accelerators, not on CPU: docs/densities.md).",
)
flags.register_validator(
  "flow_val_fraction", _open_unit_interval, "--flow_val_fraction must lie in (0, 1)"
)

# Flag -> config field, per density.
DENSITY_CONFIG_FLAGS = {
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

# Multi-host.
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-host: host:port of process 0 (calls jax.distributed.initialize); "
  "needs --num_processes and --process_id.",
)
flags.DEFINE_integer(
  "num_processes",
  None,
  "Multi-host: number of processes (with --coordinator_address).",
  lower_bound=1,
)
flags.DEFINE_integer(
  "process_id",
  None,
  "Multi-host: index of this process (with --coordinator_address).",
  lower_bound=0,
)


@flags.multi_flags_validator(
  ["coordinator_address", "num_processes", "process_id"],
  message="--coordinator_address, --num_processes and --process_id go together: give all "
  "three for a multi-host run, or none",
)
def _multihost_together(values) -> bool:
  given = [values[k] is not None for k in ("coordinator_address", "num_processes", "process_id")]
  return all(given) or not any(given)


DENSITY_FLAGS = ("density", "seed", *(f for m in DENSITY_CONFIG_FLAGS.values() for f in m))
MULTIHOST_FLAGS = ("coordinator_address", "num_processes", "process_id")


def show_in_help(names: Iterable[str]) -> None:
  """Lists these flags in the running command's ``--help``.

  absl's ``--help`` shows the key flags of the program's main module
  (``sys.argv[0]``), which is ``python -m``'s module or a console script's
  wrapper; a command calls this from its entry point with every flag it uses.
  """
  import sys

  for name in names:
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def values(names: Iterable[str], overrides: dict | None = None) -> dict:
  """``{name: value}`` of parsed flags (or their defaults before parsing), plus overrides.

  Overrides of path flags follow the same rule as the command line (``~`` expanded).
  List flags (and overrides of them) come out as tuples, hashable like the rest
  of a config.
  """
  out = {}
  for name in names:
    flag = FLAGS[name]
    out[name] = flag.value if FLAGS.is_parsed() else flag.default
  for name, value in (overrides or {}).items():
    if name in FLAGS and isinstance(FLAGS[name].parser, PathParser):
      value = FLAGS[name].parser.parse(value)
    out[name] = value
  for name, value in out.items():
    if name in FLAGS and isinstance(FLAGS[name].parser, flags.ListParser) and value is not None:
      out[name] = tuple(value)
  return out


def density_config(density: str, overrides: dict | None = None):
  """The config of ``density`` from its flags (see :data:`DENSITY_CONFIG_FLAGS`).

  Args:
    density: a registered density name.
    overrides: ``{flag name: value}`` on top of the parsed flags (or their defaults).

  Returns:
    The density's frozen config dataclass (its own checks raise ValueError
    naming the field).
  """
  model = densities.get(density)
  mapping = DENSITY_CONFIG_FLAGS.get(density, {})
  v = values(mapping, {k: w for k, w in (overrides or {}).items() if k in mapping})
  kwargs = {mapping[k]: w for k, w in v.items()}
  try:
    return model.config(**kwargs)
  except ValueError as err:  # name the flag, not only the field
    flag = next(
      (k for k, f in mapping.items() if f"{model.config.__name__}.{f} " in str(err)), None
    )
    raise ValueError(f"--{flag}: {err}" if flag else str(err)) from None


def initialize_multihost() -> None:
  """Joins the multi-host job named by the multi-host flags, if any."""
  if FLAGS.coordinator_address:
    from jax_gad import features

    features.initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
