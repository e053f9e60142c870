"""Importing jax_gad must not pull in torch or tensorflow (torch is a test-time reference)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import importlib, json, pkgutil, sys
import jax_gad
names = ["jax_gad"] + [m.name for m in pkgutil.walk_packages(jax_gad.__path__, "jax_gad.")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow"))
print(json.dumps({"modules": names, "heavy": heavy}))
"""


def test_no_jax_gad_module_imports_torch_or_tensorflow():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  import json

  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "jax_gad.convert" in result["modules"]
  assert "jax_gad.models.efficientnet" in result["modules"]
  assert result["heavy"] == [], f"imported by jax_gad: {result['heavy'][:10]}"
