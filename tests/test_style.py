"""House rules read from the source: short functions, few parameters, each option default once."""

import ast
import os

from absl import flags
import pytest

from jax_gad import cli, config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jax_gad")
MAX_LINES = 100
MAX_PARAMS = 10
CONFIG_PY = os.path.join(PACKAGE, "config.py")


def _sources():
  for root, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path, encoding="utf-8") as f:
          yield os.path.relpath(path, REPO), ast.parse(f.read())


def _params(node) -> list:
  a = node.args
  names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
  names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
  return [n for n in names if n not in ("self", "cls")]


def long_or_wide_functions(trees) -> list:
  """``path:line name: what`` for every function over MAX_LINES lines or MAX_PARAMS params."""
  bad = []
  for path, tree in trees:
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        params = _params(node)
        if lines > MAX_LINES:
          bad.append(f"{path}:{node.lineno} {node.name}: {lines} lines")
        if len(params) > MAX_PARAMS:
          bad.append(f"{path}:{node.lineno} {node.name}: {len(params)} parameters")
  return bad


def _option_defaults() -> dict:
  """``{option name: (default, kind)}`` of every section of jax_gad.config."""
  out = {}
  for section in (
    config.Data,
    config.Backbone,
    config.Levels,
    config.Density,
    config.Maps,
    config.Protocol,
    config.Calibration,
    config.Scoring,
    config.Plots,
    config.Conversion,
    config.MultiHost,
  ):
    for name in config.options(section):
      out[name] = (getattr(section, name), config.options(section)[name]["kind"])
  return out


def _literal(node):
  """The value of a literal expression (constants, tuples and lists of them), else a marker."""
  try:
    return ast.literal_eval(node)
  except ValueError:
    return _NOT_LITERAL


_NOT_LITERAL = object()
# Values that say nothing of their own (a seed of 0, a switch, nothing): not counted.
_NEUTRAL = (0, "", ())


def _same(value, default) -> bool:
  if value is _NOT_LITERAL or type(value) is not type(default):  # 1 is not True, nor 1.0
    return False
  return value == default and value not in _NEUTRAL


def _defaults(tree):
  """(name, default node, line) of every parameter default and class-level field default."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      a = node.args
      positional = [*a.posonlyargs, *a.args]
      for p, d in zip(positional[len(positional) - len(a.defaults) :], a.defaults):
        yield p.arg, d, d.lineno
      for p, d in zip(a.kwonlyargs, a.kw_defaults):
        if d is not None:
          yield p.arg, d, d.lineno
    elif isinstance(node, ast.ClassDef):
      for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
          name, value = getattr(stmt.target, "id", None), stmt.value
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
          name, value = getattr(stmt.targets[0], "id", None), stmt.value
        else:
          continue
        if isinstance(value, ast.Call):  # field(default=...), flax.struct.field(default=...)
          value = next((k.value for k in value.keywords if k.arg == "default"), None)
        if name and value is not None:
          yield name, value, value.lineno


def defaults_written_again(trees, options: dict) -> list:
  """``path:line``: an option's default written again outside jax_gad/config.py.

  A parameter or a class field named like an option whose literal default is
  the option's default writes that default a second time: it must come from
  the config (``checkpoint_dir=config.Backbone.checkpoint_dir``) or be
  required (neutral values, 0, False and empties, are not counted: a
  ``seed=0`` of a data generator is no copy of ``--seed``). The string
  default of a path option (a folder) must not appear as a literal anywhere
  else, whatever it is called there.
  """
  bad = []
  paths = {v for name, (v, kind) in options.items() if kind == "path" and v}
  for path, tree in trees:
    if os.path.join(REPO, path) == CONFIG_PY:
      continue
    for name, node, line in _defaults(tree):
      value = _literal(node)
      if name in options and value is not None and _same(value, options[name][0]):
        bad.append(f"{path}:{line} {name}={value!r}: an option's default written again")
    docstrings = {
      id(n.body[0].value)
      for n in ast.walk(tree)
      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
      and n.body
      and isinstance(n.body[0], ast.Expr)
    }
    for n in ast.walk(tree):
      if isinstance(n, ast.Constant) and n.value in paths and id(n) not in docstrings:
        bad.append(f"{path}:{n.lineno} {n.value!r}: a path option's default written again")
  return bad


def test_no_function_is_long_or_takes_many_parameters():
  bad = long_or_wide_functions(_sources())
  assert not bad, "\n".join(bad)


def test_no_option_default_is_written_twice():
  bad = defaults_written_again(_sources(), _option_defaults())
  assert not bad, "\n".join(bad)


def _parse(text):
  return [("snippet.py", ast.parse(text))]


def test_the_checks_find_what_they_look_for():
  """Each rule fails on a snippet that breaks it and passes the same snippet fixed."""
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_LINES))
  assert long_or_wide_functions(_parse(f"def f():\n{body}\n"))  # 100 body lines + def
  assert not long_or_wide_functions(_parse(f"def f():\n{body[: body.rindex(chr(10))]}\n"))
  wide = ", ".join(f"a{i}" for i in range(MAX_PARAMS + 1))
  assert long_or_wide_functions(_parse(f"def f({wide}): pass\n"))
  assert not long_or_wide_functions(_parse(f"def f(self, {wide[4:]}): pass\n"))
  assert long_or_wide_functions(_parse(f"def f(*, {wide}): pass\n"))
  options = _option_defaults()
  for text in (
    'def load(arch, checkpoint_dir="checkpoints"): pass',
    "def fit(x, *, target_fpr=0.01): pass",
    "class C:\n  batch_size: int = 16",
    "class C:\n  dtype: str = field(pytree_node=False, default='float32')",
    "CACHE = '~/.cache/jax_gad/features'",
  ):
    assert defaults_written_again(_parse(text), options), text
  for text in (
    "def load(arch, checkpoint_dir=config.Backbone.checkpoint_dir): pass",
    "def load(arch, checkpoint_dir): pass",
    "def fit(x, *, target_fpr=None): pass",
    "def extract(x, batch_size=8): pass",  # another default of its own, not the option's
    "def make(n, seed=0): pass",  # neutral
    "def f():\n  'Reads checkpoints from the folder.'\n",
  ):
    assert not defaults_written_again(_parse(text), options), text


def _define_every_command_flag():
  """Imports the commands and defines their flags (absl flags are global; idempotent)."""
  import jax_gad.benchmark.cli  # noqa: F401  (defines the benchmark's flags)
  import jax_gad.main  # noqa: F401  (defines --workdir, --maps, ...)

  for section in (config.Calibration, config.Scoring, config.Conversion):
    cli.define(section, module_name="test_style")


def test_every_flag_default_is_the_config_default():
  """A flag of an option has its field's default and help; the benchmark's own, its Config's."""
  from jax_gad.benchmark.run import Config as BenchmarkConfig

  _define_every_command_flag()
  options = {}
  for section in config.sections(config.Experiment).values():
    options.update({n: (section, m) for n, m in config.options(section).items()})
  for section in (config.MultiHost, config.Calibration, config.Scoring, config.Conversion):
    options.update({n: (section, m) for n, m in config.options(section).items()})
  by_module = flags.FLAGS.flags_by_module_dict()
  ours = {
    f.name: f
    for module, fs in by_module.items()
    if module.startswith("jax_gad") or module == "test_style"
    for f in fs
  }
  missing = [n for n in options if n not in ours]
  assert not missing, f"options without a flag: {missing}"
  bench_defaults = BenchmarkConfig()._asdict()
  for name, flag in ours.items():
    if name in options and name not in ("input", "output"):  # two commands' own, by help
      section, meta = options[name]
      default = getattr(section, name)
      if meta["kind"] == "path" and default:
        default = os.path.expanduser(default)
      if meta["kind"].endswith("list"):
        default = list(default)
      assert flag.default == default, name
      assert flag.help.endswith(meta["help"]), name  # after an enum's "<a|b>: "
    elif name not in options and name != "json":
      assert name in bench_defaults, f"--{name} is neither a config option nor a benchmark field"
      expected = bench_defaults[name]
      assert flag.default == (list(expected) if isinstance(expected, tuple) else expected), name
  # The options the benchmark shares are the config's, default included.
  shared = [n for n in bench_defaults if n in options]
  assert set(shared) >= {"arch", "image_size", "num_workers", "seed"}
  for name in shared:
    assert bench_defaults[name] == getattr(options[name][0], name), name


@pytest.mark.parametrize("section", [config.Calibration, config.Scoring, config.Conversion])
def test_command_flags_of_shared_names_keep_their_own_default(section):
  """--input / --output are defined by whichever command runs: every definition has default None."""
  for name in ("input", "output"):
    if name in config.options(section):
      assert getattr(section, name) is None


_COMMANDS = ("jax_gad.main", "jax_gad.fit", "jax_gad.predict", "jax_gad.benchmark.cli")


def test_the_package_imports_no_command_and_fit_is_a_plain_module():
  import subprocess
  import sys

  script = (
    "import sys, types, jax_gad\n"
    "jax_gad.fit_detector, jax_gad.load_detector, jax_gad.Detector\n"
    f"print(sorted(m for m in {_COMMANDS!r} if m in sys.modules))\n"
    "import jax_gad.fit\n"
    "print(type(jax_gad.fit) is types.ModuleType, callable(jax_gad.fit))\n"
  )
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[-3:-1] == ["[]", "True False"], proc.stdout


def unexplained_local_imports(sources) -> list:
  """Imports inside a function whose line carries no comment giving the reason."""
  bad = []
  for path, text in sources:
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for sub in ast.walk(node):
          if isinstance(sub, (ast.Import, ast.ImportFrom)) and "#" not in lines[sub.lineno - 1]:
            bad.append(f"{path}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
  return bad


def _texts(*folders):
  for folder in folders:
    for root, _, names in os.walk(os.path.join(REPO, folder)):
      for name in sorted(names):
        if name.endswith(".py"):
          path = os.path.join(root, name)
          with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, REPO), f.read()


def test_function_local_imports_say_why_and_no_pylint_comments():
  sources = list(_texts("jax_gad"))
  assert not unexplained_local_imports(sources), "\n".join(unexplained_local_imports(sources))
  marker = "pylint" + ":"  # spelled apart so that this file does not match itself
  found = [p for p, text in [*sources, *_texts("tests", "experiments")] if marker in text]
  assert not found, found
  # The check finds what it looks for.
  assert unexplained_local_imports([("s.py", "def f():\n  import os\n")])
  assert not unexplained_local_imports([("s.py", "def f():\n  import os  # why\n")])
  assert not unexplained_local_imports([("s.py", "import os\n")])
