"""Tests for jax_gad.config: each option's rule, checked once, with the flag in the message."""

import dataclasses
import os

from absl import flags
import pytest

from jax_gad import cli, config


def _experiment(**options):
  return config.from_flat(config.Experiment, dict(options, workdir=options.get("workdir", "w")))


@pytest.mark.parametrize(
  "options, message",
  [
    (dict(image_size=8), "--image_size must be at least 16, got 8"),
    (dict(image_size=15), "--image_size must be at least 16, got 15"),
    (dict(batch_size=0), "--batch_size must be at least 1, got 0"),
    (dict(batch_size=2.5), "--batch_size must be an integer, got 2.5"),
    (dict(batch_size=True), "--batch_size must be an integer, got True"),
    (dict(num_workers=0), "--num_workers must be at least 1, got 0"),
    (dict(dtype="float16"), "--dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
    (dict(depthwise="fast"), "--depthwise must be one of"),
    (dict(arch="resnet"), "--arch must be one of"),
    (dict(pca=1.0), "--pca must lie in (0, 1), got 1.0"),
    (dict(npca=0.0), "--npca must lie in (0, 1), got 0.0"),
    (dict(pca="0.5"), "--pca must be a number, got '0.5'"),
    (dict(pca=0.9, npca=0.9), "--pca and --npca are mutually exclusive"),
    (dict(map_sigma=-1.0), "--map_sigma must be at least 0.0, got -1.0"),
    (dict(map_channels=0), "--map_channels must be at least 1, got 0"),
    (dict(plots="yes"), "--plots must be true or false, got 'yes'"),
    (dict(levels=(0, 9)), "--levels: must list integers in 0..8, got [0, 9]."),
    (dict(levels=()), "--levels: must list integers in 0..8, got []."),
    (dict(levels=(1, 1)), "--levels: lists 1 more than once"),
    (dict(levels=(True,)), "--levels: must list integers in 0..8"),
    (dict(folds=(5,)), "--folds: must list integers in 0..4"),
    (dict(categories=("a", "a")), "--categories: lists a more than once"),
    (dict(distances=("cosine",)), "--distances: unknown ['cosine']"),
    (dict(density="gmm", distances=("l2",)), "--distances: unknown ['l2']; choose from ['nll']"),
    (dict(seed=-1), "--seed must be at least 0, got -1"),
    (dict(flow_val_fraction=1.0), "--flow_val_fraction must lie in (0, 1), got 1.0"),
    (dict(save_maps=True), "--save_maps needs --maps"),
    (dict(workdir=""), "--workdir is required"),
    (dict(dataset="folder"), "--categories is required for --dataset=folder"),
  ],
)
def test_validate_names_the_flag_and_the_number(options, message):
  cfg = _experiment(**options)
  with pytest.raises(ValueError) as err:
    config.validate(cfg)
  assert message in str(err.value)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize(
  "options",
  [
    dict(image_size=16),  # the bound itself is allowed
    dict(batch_size=1, num_workers=1, seed=0, map_sigma=0.0),
    dict(pca=0.5),
    dict(levels=(0, 8), folds=(0, 4)),
    dict(density="gmm", distances=("nll",)),
    dict(maps=True, save_maps=True, map_levels=()),
    dict(dataset="folder", categories=("x",)),
  ],
)
def test_validate_accepts_good_options(options):
  config.validate(_experiment(**options))


def test_the_defaults_validate_and_distances_follow_the_density():
  config.validate(_experiment())
  assert _experiment().distances == ("l2", "sed", "mahalanobis")
  assert _experiment(density="flow").distances == ("nll",)
  assert _experiment(distances=("l2",)).distances == ("l2",)


def test_fit_predict_require_their_inputs():
  with pytest.raises(ValueError, match="--category is required"):
    config.validate(config.Fit())
  with pytest.raises(ValueError, match="--target_fpr must lie in"):
    config.validate(config.from_flat(config.Fit, dict(category="c", target_fpr=1.5)))
  with pytest.raises(ValueError, match="--calibration_folds must be at least 2, got 1"):
    config.validate(config.from_flat(config.Fit, dict(category="c", calibration_folds=1)))
  with pytest.raises(ValueError, match="--detector is required"):
    config.validate(config.Predict())
  with pytest.raises(ValueError, match="--output is required"):
    config.validate(config.from_flat(config.Predict, dict(detector="d")))
  config.validate(config.from_flat(config.Predict, dict(detector="d", output="o")))


@pytest.mark.parametrize(
  "given", [dict(coordinator_address="h:1"), dict(num_processes=2, process_id=0)]
)
def test_multihost_options_go_together(given):
  with pytest.raises(ValueError, match="go together"):
    config.validate(config.MultiHost(**given))
  config.validate(config.MultiHost(coordinator_address="h:1", num_processes=2, process_id=0))
  config.validate(config.MultiHost())


def test_sections_expand_home_and_make_lists_tuples():
  cfg = _experiment(workdir="~/w", data_dir="~/d", levels=[3, 4], categories=["a"])
  home = os.path.expanduser("~")
  assert cfg.protocol.workdir == os.path.join(home, "w")
  assert cfg.data.data_dir == os.path.join(home, "d")
  assert cfg.levels.levels == (3, 4) and cfg.data.categories == ("a",)
  hash(cfg)  # frozen and hashable: a config can key a cache
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.backbone.arch = "x"


def test_from_flat_refuses_unknown_options():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['target_fpr'\] of Experiment"):
    config.from_flat(config.Experiment, {"target_fpr": 0.1})
  # Every option of a command's sections, once each, and a flat view back.
  names = config.option_names(config.Experiment)
  assert len(names) == len(set(names)) == len(config.flat(_experiment()))


def test_derived_values():
  assert config.Backbone().depthwise_impl is None
  assert config.Backbone(depthwise="xla").depthwise_impl == "xla"
  assert config.worker_count(3) == 3
  assert config.worker_count(None) == (os.cpu_count() or 2)
  assert config.Backbone(num_workers=5).workers == 5


def test_density_config_names_the_flag():
  cfg = _experiment(density="gmm", gmm_components=(2, 4), gmm_max_iter=7)
  model = cfg.density.model_config()
  assert model.n_components == (2, 4) and model.max_iter == 7
  assert _experiment().density.model_config() is not None
  with pytest.raises(ValueError, match="^--flow_hidden: "):
    _experiment(density="flow", flow_hidden=0).density.model_config()


def test_flags_are_built_into_the_same_config():
  """cli.build: the flags' values (defaults before parsing) with overrides, as from_flat."""
  assert cli.build(config.Experiment, {"workdir": "w"}) == _experiment()
  built = cli.build(config.Experiment, {"workdir": "w", "levels": [2], "dtype": "bfloat16"})
  assert built == _experiment(levels=(2,), dtype="bfloat16")


def _flag_values():
  fv = flags.FlagValues()
  cli.define(config.Backbone, module_name="t", flag_values=fv)
  cli.define(config.Levels, module_name="t", flag_values=fv)
  cli.define(config.Maps, module_name="t", flag_values=fv)
  return fv


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--image_size=8", "image_size"),
    ("--batch_size=0", "batch_size"),
    ("--levels=1,1", "more than once"),
    ("--levels=9", "0..8"),
    ("--dtype=float16", "float16"),
  ],
)
def test_flag_bounds_are_the_config_bounds(arg, message):
  """The generated absl flags parse with the field's bounds and list rules."""
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    _flag_values()(["prog", arg])


def test_generated_flags_parse_each_kind():
  fv = _flag_values()
  fv(["prog", "--image_size=16", "--levels=8,0", "--checkpoint_dir=~/c", "--maps", "--pca=0.5"])
  assert fv.image_size == 16 and fv.levels == [8, 0] and fv.maps is True and fv.pca == 0.5
  assert fv.checkpoint_dir == os.path.join(os.path.expanduser("~"), "c")
  assert fv["map_levels"].default == [] and fv["arch"].default == config.Backbone.arch
