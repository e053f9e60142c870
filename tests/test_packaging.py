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


# The Layers table of docs/architecture.md: which jax_gad modules each module may import.
_MAY_IMPORT = {
  "gaussian": set(),
  "metrics": set(),
  "files": set(),
  "console": set(),
  "pca": {"gaussian"},
  "densities": {"gaussian", "densities"},
  "protocol": {"gaussian", "pca", "metrics", "densities"},
  "report": {"protocol", "metrics", "files"},
  "models": set(),
  "torch_pickle": set(),
  "config": {"models", "densities"},
  "convert": {"models", "torch_pickle", "files", "checkpoint", "cli", "config", "console"},
  "checkpoint": {"models", "files", "convert"},
  "features": set(),
  "feature_cache": {"files"},
  "compile_cache": set(),
  "operating_point": {"files"},
  "data": {"data"},
  "detector": {
    "gaussian",
    "pca",
    "metrics",
    "features",
    "checkpoint",
    "files",
    "models",
    "data",
    "maps",
    "config",
  },
  "maps": {"maps", "gaussian", "metrics", "files", "features", "data", "models", "report"},
  "export_loader": set(),  # copied into every export as load.py: it must stand alone
  "export": {"detector", "gaussian", "pca", "files", "export_loader", "cli", "config", "console"},
}


def _jax_gad_imports(path):
  import ast

  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jax_gad"):
      parts = node.module.split(".")
      if len(parts) == 1:  # from jax_gad import x, y
        out |= {alias.name for alias in node.names}
      else:
        out.add(parts[1])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "jax_gad" and len(parts) > 1:
          out.add(parts[1])
  return out - {"__version__"}


def test_modules_import_only_the_layers_below_them():
  bad = []
  for root, _, names in os.walk(os.path.join(REPO, "jax_gad")):
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, os.path.join(REPO, "jax_gad")).replace(os.sep, "/")
      top = rel.split("/")[0].removesuffix(".py")
      if top not in _MAY_IMPORT:
        continue  # entry points (main, cli, benchmark, ...) may import everything
      extra = _jax_gad_imports(path) - _MAY_IMPORT[top] - {top}
      if extra:
        bad.append(f"jax_gad/{rel} imports {sorted(extra)}")
  assert not bad, "\n".join(bad)
