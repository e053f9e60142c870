"""Command-line flags of jax_gad's commands, generated from :mod:`jax_gad.config`.

Every option is a field of a config section (its default, rule and help are
written there once); :func:`define` turns a section's fields into absl flags
and :func:`build` turns the parsed flags back into a command's config. The
shared sections (data, backbone, levels, density, multi-host) are defined when
this module is imported; a command defines its own sections and lists the
flags it uses in its ``--help`` with :func:`show_in_help`. The rules of a kind
of flag live in its parser:

* path flags (:class:`PathParser`) expand ``~`` when parsed;
* list flags refuse a value given twice or out of range, with a message that
  names the flag (the rules of :mod:`jax_gad.config`).

Bounds are not checked while parsing: :func:`jax_gad.config.validate` checks
them, once, for configs built from flags and from Python alike.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterable

from absl import flags

from jax_gad import config, features

FLAGS = flags.FLAGS
DATASETS = config.DATASETS


# ---------------------------------------------------------------------------
# Parsers: one rule per kind of flag (the rules themselves are jax_gad.config's)
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


class UniqueListParser(flags.ListParser):
  """A comma-separated list in which no value appears twice."""

  def parse(self, argument):
    values = super().parse(argument)
    config.check_unique(values)
    return values


class EnumListParser(flags.ListParser):
  """A comma-separated list of distinct values from a fixed set."""

  def __init__(self, choices: Iterable[str], allow_empty: bool = False):
    super().__init__()
    self.choices = tuple(choices)
    self.allow_empty = allow_empty
    self.syntactic_help = f"a comma-separated list of distinct values from {list(self.choices)}"

  def parse(self, argument):
    values = super().parse(argument)
    config.check_enum_list(values, self.choices, self.allow_empty)
    return values


class IntListParser(flags.ListParser):
  """A comma-separated list of distinct integers in [low, high]."""

  def __init__(self, low: int, high: int, allow_empty: bool = False):
    super().__init__()
    self.low, self.high, self.allow_empty = low, high, allow_empty
    self.syntactic_help = f"a comma-separated list of distinct integers in {low}..{high}"

  def parse(self, argument):
    if isinstance(argument, (list, tuple)) and all(isinstance(v, int) for v in argument):
      values = list(argument)
    else:
      strings = super().parse(argument)
      try:
        values = [int(v) for v in strings]
      except ValueError:
        raise ValueError(f"must be integers, got {','.join(strings)!r}") from None
    config.check_int_list(values, self.low, self.high, self.allow_empty)
    return values


def _caller_module() -> str:
  """The module that called a ``DEFINE_*`` below, named as absl names modules."""
  name = sys._getframe(2).f_globals.get("__name__", "")  # noqa: SLF001 (absl's own convention)
  return sys.argv[0] if name == "__main__" else name


def _define(parser, name: str, default, help_: str, **kwargs):
  if isinstance(parser, flags.ListParser):
    kwargs["serializer"] = flags.CsvListSerializer(",")
  return flags.DEFINE(parser, name, default, help_, **kwargs)


def DEFINE_path(name: str, default: str | None, help_: str, **kwargs):  # noqa: N802 (absl style)
  """A path flag; ``~`` is expanded when parsed."""
  kwargs.setdefault("module_name", _caller_module())
  return _define(PathParser(), name, default, help_, **kwargs)


def DEFINE_unique_list(name: str, default, help_: str, **kwargs):  # noqa: N802
  """A comma-separated list flag that refuses repeated values."""
  kwargs.setdefault("module_name", _caller_module())
  return _define(UniqueListParser(), name, default, help_, **kwargs)


def DEFINE_enum_list(  # noqa: N802
  name: str, default, choices: Iterable[str], help_: str, allow_empty: bool = False, **kwargs
):
  """A comma-separated list flag of distinct values from ``choices`` (empty if allowed)."""
  kwargs.setdefault("module_name", _caller_module())
  return _define(EnumListParser(choices, allow_empty), name, default, help_, **kwargs)


def DEFINE_int_list(  # noqa: N802
  name: str, default, low: int, high: int, help_: str, allow_empty: bool = False, **kwargs
):
  """A comma-separated list flag of distinct integers in [low, high] (empty if allowed)."""
  kwargs.setdefault("module_name", _caller_module())
  return _define(IntListParser(low, high, allow_empty), name, default, help_, **kwargs)


# ---------------------------------------------------------------------------
# Flags from config sections, and configs from flags
# ---------------------------------------------------------------------------


def _parser(meta: dict):
  kind = meta["kind"]
  if kind == "path":
    return PathParser()
  if kind == "int_list":
    return IntListParser(meta["low"], meta["high"], meta["allow_empty"])
  if kind == "enum_list":
    return EnumListParser(meta["choices"], meta["allow_empty"])
  if kind == "unique_list":
    return UniqueListParser()
  return flags.ArgumentParser()  # a string


def define(section, module_name: str | None = None, flag_values=FLAGS) -> None:
  """Defines an absl flag for every option of a config section (class or instance).

  The flag's name, default and help are the field's; flags already defined
  (a name two commands share) are left as they are.
  """
  module_name = module_name or _caller_module()
  for field in dataclasses.fields(section):
    meta = field.metadata
    if "kind" not in meta or field.name in flag_values:
      continue
    kind, name, default, help_ = meta["kind"], field.name, field.default, meta["help"]
    where = {"module_name": module_name, "flag_values": flag_values}
    if kind.endswith("list"):
      _define(_parser(meta), name, list(default), help_, **where)
    elif kind == "enum":
      flags.DEFINE_enum(name, default, list(meta["choices"]), help_, **where)
    elif kind == "bool":  # absl's bool flags also accept --noname
      flags.DEFINE_bool(name, default, help_, **where)
    elif kind == "int":  # the bounds show in --help and are checked when parsed too
      flags.DEFINE_integer(name, default, help_, lower_bound=meta["low"], **where)
    elif kind == "float":
      flags.DEFINE_float(name, default, help_, lower_bound=meta["low"], **where)
    else:
      flags.DEFINE(_parser(meta), name, default, help_, **where)


def values(names: Iterable[str]) -> dict:
  """``{name: value}`` of the parsed flags among ``names`` (their defaults before parsing).

  Names without a flag are left out (they keep the config's default); lists
  come out as tuples, hashable like the rest of a config.
  """
  out = {}
  for name in names:
    if name in FLAGS:
      value = FLAGS[name].value if FLAGS.is_parsed() else FLAGS[name].default
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def build(command: type, overrides: dict | None = None):
  """A command's config (:mod:`jax_gad.config`) from the flags, with ``overrides`` on top."""
  flat = values(config.option_names(command))
  return config.from_flat(command, {**flat, **(overrides or {})})


def show_in_help(
  command: type | None = None, extra: Iterable[str] = (), exclude: Iterable[str] = ()
) -> None:
  """Lists the flags of a command's config (and ``extra``, less ``exclude``) in its ``--help``.

  absl's ``--help`` shows the key flags of the program's main module
  (``sys.argv[0]``), which is ``python -m``'s module or a console script's
  wrapper; a command calls this from its entry point.
  """
  names = config.option_names(command) if command is not None else []
  for name in (*names, *extra):
    if name in FLAGS and name not in exclude:
      FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


MULTIHOST_FLAGS = tuple(config.options(config.MultiHost))


def initialize_multihost() -> None:
  """Joins the multi-host job named by the multi-host flags, if any (ValueError if incomplete)."""
  multihost = config.MultiHost(**values(config.options(config.MultiHost)))
  config.validate(multihost)
  if multihost.coordinator_address:
    features.initialize_distributed(
      multihost.coordinator_address, multihost.num_processes, multihost.process_id
    )


# The shared sections: every command's data, backbone, levels, density and multi-host flags.
for _section in (config.Data, config.Backbone, config.Levels, config.Density, config.MultiHost):
  define(_section, module_name=__name__)
