"""The repository as a user gets it: installable, self-contained, one style."""

import configparser
import os
import re
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pinned(path):
  """{name: version} of the `name==version` lines of a requirements file."""
  out = {}
  with open(path) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line and not line.startswith("-r"):
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path}: {line} is not pinned with =="
        out[req.name.lower().replace("_", "-")] = spec.version
  return out


def test_pyproject_dependencies_match_the_pinned_requirements():
  pins = _pinned(os.path.join(REPO, "requirements.txt"))
  deps = {}
  for text in _pyproject()["project"]["dependencies"]:
    req = Requirement(text)
    deps[req.name.lower().replace("_", "-")] = req.specifier
  assert set(deps) == set(pins), set(deps) ^ set(pins)
  for name, version in pins.items():
    assert deps[name].contains(version), f"{name}=={version} is outside pyproject's {deps[name]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The wheel `pip install .` would install, built without network or build isolation.

  Built from a copy of the sources, so that setuptools' build/ and egg-info
  folders do not land in the repository.
  """
  import shutil

  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(
    os.path.join(REPO, "jax_gad"), src / "jax_gad", ignore=shutil.ignore_patterns("__pycache__")
  )
  out = tmp_path_factory.mktemp("wheel")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(out),
      str(src),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (name,) = [n for n in os.listdir(out) if n.endswith(".whl")]
  return out / name


def test_wheel_holds_every_module_and_the_console_scripts(wheel, tmp_path):
  with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zf.read(entry).decode())
    zf.extractall(tmp_path / "site")
  for root, _, files in os.walk(os.path.join(REPO, "jax_gad")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, "/")
        assert rel in names, rel
  scripts = dict(entry_points["console_scripts"])
  assert scripts == _pyproject()["project"]["scripts"]
  # Each script's --help, from outside the repository, on the installed files only.
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
  for script, target in scripts.items():
    module, func = target.split(":")
    proc = subprocess.run(
      [
        sys.executable,
        "-c",
        f"import sys; sys.argv[0] = {script!r}; from {module} import {func}; {func}()",
        "--help",
      ],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    # absl prints the usage and exits with status 1 after --help.
    assert proc.returncode in (0, 1), (script, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (script, proc.stderr[-2000:])
    assert re.search(r"^\s+--\w+", proc.stdout + proc.stderr, re.M), (script, proc.stdout[:500])


# Paths that name a file or section in code, tests and docs must exist in the repository.
_REFERENCE = re.compile(
  r"(?:docs|experiments|tests|jax_gad|checkpoints)/[\w./-]+\.(?:md|py|cfg|png)"
)


def _text_files():
  for top in ("jax_gad", "tests", "docs", "experiments", "checkpoints"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for f in files:
        if f.endswith((".py", ".md", ".cfg")):
          yield os.path.join(root, f)
  yield os.path.join(REPO, "README.md")


def test_no_reference_to_a_file_or_section_outside_the_repository():
  missing = []
  for path in _text_files():
    if os.path.samefile(path, __file__):
      continue
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if ("design" + ".md") in text or ("../" + "shared") in text:
      missing.append(f"{os.path.relpath(path, REPO)}: points to the design notes outside the repo")
    for ref in set(_REFERENCE.findall(text)):
      if not os.path.exists(os.path.join(REPO, ref.rstrip("."))):
        missing.append(f"{os.path.relpath(path, REPO)}: {ref}")
    # `docs/<page>.md, "<Section>"` references name a heading of that page.
    for page, section in re.findall(r"(docs/\w+\.md), [\"']([^\"']+)[\"']", text):
      target = os.path.join(REPO, page)
      if os.path.exists(target):
        with open(target, encoding="utf-8") as f:
          headings = [h.strip() for h in re.findall(r"^#+ (.+)$", f.read(), re.M)]
        if not any(h == section or h.startswith(section) for h in headings):
          missing.append(f"{os.path.relpath(path, REPO)}: {page} has no section {section!r}")
  assert not missing, "\n".join(missing)


def test_one_indentation_width_and_the_linter_passes():
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "jax_gad", "tests"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "jax_gad", "tests"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]


# The layering table: docs/architecture.md, "Layers".
_ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")


def _layers(path=_ARCHITECTURE):
  """[(module, {modules it may import})] in the order of the table's rows, bottom layer first."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.M | re.S)
  assert section, f"{path} has no '## Layers' section"
  rows = []
  for line in section.group(1).splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 2 or not cells[0].startswith("`"):
      continue  # prose, the header row, the --- row
    # First column: the module; last column: what it may import (middle: its job).
    allowed = set(re.findall(r"`(\w+)`", cells[-1]))
    assert allowed or cells[-1] == "—", f"unreadable row: {line}"
    assert re.fullmatch(r"`\w+`", cells[0]), f"one module per row: {line}"
    rows.append((cells[0].strip("`"), allowed))
  assert rows, f"{path}: the Layers section holds no table"
  return rows


def _unit(name: str) -> str | None:
  """The table's name for ``jax_gad.<name>``: a module or package, else None (an attribute)."""
  top = os.path.join(REPO, "jax_gad", name)
  return name if os.path.isfile(top + ".py") or os.path.isdir(top) else None


def _jax_gad_imports(path):
  """The table names a file imports: every import statement (function-local ones too),
  ``import_module('jax_gad....')`` with a literal name, and ``jax_gad`` for the package itself."""
  import ast

  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()

  def add(module, names=()):
    parts = module.split(".")
    if parts[0] != "jax_gad":
      return
    if len(parts) > 1:
      out.add(parts[1])
    elif not names:
      out.add("jax_gad")
    else:  # from jax_gad import x, y: modules, or attributes of the package
      out.update(_unit(n) or "jax_gad" for n in names)

  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: relative import"
      add(node.module or "", [alias.name for alias in node.names])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif (
      isinstance(node, ast.Call)
      and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      add(node.args[0].value)
  return out


def _modules():
  """{table name: [files]} of every .py file of the package, __init__.py files included."""
  out = {}
  for root, _, names in os.walk(os.path.join(REPO, "jax_gad")):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), os.path.join(REPO, "jax_gad"))
        rel = rel.replace(os.sep, "/")
        unit = "jax_gad" if rel == "__init__.py" else rel.split("/")[0].removesuffix(".py")
        out.setdefault(unit, []).append(rel)
  return out


def test_layer_table_is_ordered_and_names_every_module():
  rows = _layers()
  names = [name for name, _ in rows]
  assert len(names) == len(set(names)), f"a module has two rows: {names}"
  # Each row may import only modules of the rows above it: no upward arrow, hence no circle.
  for i, (name, allowed) in enumerate(rows):
    upward = allowed - set(names[:i])
    assert not upward, f"docs/architecture.md, Layers: {name} may import {sorted(upward)} above it"
  assert set(names) == set(_modules()), set(names) ^ set(_modules())


def test_modules_import_only_the_layers_below_them():
  allowed = dict(_layers())
  bad = []
  for unit, files in sorted(_modules().items()):
    for rel in files:
      extra = _jax_gad_imports(os.path.join(REPO, "jax_gad", rel)) - allowed.get(unit, set())
      extra.discard(unit)  # a package's own modules
      if extra:
        bad.append(f"jax_gad/{rel} imports {sorted(extra)}, not in its row of the Layers table")
  assert not bad, "\n".join(bad)


def test_layer_checks_fail_on_an_upward_import_and_a_circle(tmp_path):
  table = tmp_path / "architecture.md"
  table.write_text(
    "# x\n\n## Layers\n\n| Module | Job | May import |\n| --- | --- | --- |\n"
    "| `gaussian` | core | — |\n| `pca` | `x` | `gaussian`, `protocol` |\n"
    "| `protocol` | runs | `pca` |\n"
    "\n## Next\n\n| `files` | — |\n"
  )
  rows = _layers(str(table))
  assert rows == [("gaussian", set()), ("pca", {"gaussian", "protocol"}), ("protocol", {"pca"})]
  names = [name for name, _ in rows]
  upward = [n for i, (n, allowed) in enumerate(rows) if allowed - set(names[:i])]
  assert upward == ["pca"]  # pca -> protocol -> pca is a circle, caught as pca's upward arrow
  # Function-local imports, `from jax_gad import <module>`, attributes of the package, and
  # import_module with a literal name are all read.
  src = tmp_path / "m.py"
  src.write_text(
    "import importlib\nfrom jax_gad import gaussian, __version__\n"
    "def f():\n  from jax_gad.densities import gmm\n"
    "  import jax_gad.metrics\n  return importlib.import_module('jax_gad.report')\n"
  )
  assert _jax_gad_imports(str(src)) == {"gaussian", "jax_gad", "densities", "metrics", "report"}
