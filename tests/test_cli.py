"""Tests for jax_gad.cli: one rule per kind of flag, and the shared flags' agreement with data."""

import os

from absl import flags
import pytest

from jax_gad import cli


def test_path_parser_expands_home_for_every_path_flag():
  assert cli.PathParser().parse("~/runs/x") == os.path.join(os.path.expanduser("~"), "runs/x")
  assert cli.PathParser().parse("") == ""
  shared = flags.FLAGS.flags_by_module_dict()["jax_gad.cli"]
  paths = {f.name for f in shared if isinstance(f.parser, cli.PathParser)}
  assert paths == {
    "data_dir",
    "tfds_dir",
    "checkpoint",
    "checkpoint_dir",
    "cache_dir",
    "compile_cache",
  }
  from jax_gad import main  # noqa: F401  (defines --workdir)

  assert isinstance(flags.FLAGS["workdir"].parser, cli.PathParser)
  # The default of a path flag is parsed too: no literal '~' survives.
  assert "~" not in flags.FLAGS["cache_dir"].default
  assert "~" not in flags.FLAGS["compile_cache"].default


@pytest.mark.parametrize(
  "parser, text, message",
  [
    (cli.EnumListParser(["l2", "sed"]), "l2,l2", "l2 more than once"),
    (cli.EnumListParser(["l2", "sed"]), "l2,cosine", "unknown ['cosine']"),
    (cli.EnumListParser(["l2", "sed"]), "", "at least one"),
    (cli.IntListParser(0, 4), "0,1,1", "1 more than once"),
    (cli.IntListParser(0, 4), "0,5", "0..4"),
    (cli.IntListParser(0, 4), "a", "integers"),
    (cli.UniqueListParser(), "bottle,bottle", "bottle more than once"),
  ],
)
def test_list_parsers_refuse_repeats_and_unknown_values(parser, text, message):
  with pytest.raises(ValueError) as err:
    parser.parse(text)
  assert message in str(err.value)


def test_list_parsers_accept_good_lists():
  assert cli.EnumListParser(["l2", "sed"]).parse("sed,l2") == ["sed", "l2"]
  assert cli.IntListParser(0, 8).parse("8,0,3") == [8, 0, 3]
  assert cli.IntListParser(0, 8, allow_empty=True).parse("") == []


def test_dataset_names_agree_with_the_data_package():
  from jax_gad import data

  assert set(cli.DATASETS) == set(data.CATEGORIES)


def test_configs_built_in_python_expand_home_too():
  from jax_gad import config

  cfg = config.from_flat(config.Experiment, dict(workdir="~/runs/x", cache_dir="~/c"))
  assert cfg.protocol.workdir == os.path.join(os.path.expanduser("~"), "runs/x")
  assert cfg.backbone.cache_dir == os.path.join(os.path.expanduser("~"), "c")
