"""Wall time of ``python -m jax_gad.predict`` as a user runs it: a fresh process per call.

:func:`measure_predict_calls` draws one category of the synthetic set as PNG
files in the folder layout, fits a detector on its training images with
``python -m jax_gad.fit``, then times whole ``predict`` processes (start,
imports, loading the detector and weights, compiling or loading the compiled
programs, reading, scoring, writing the CSV) on one image and on the
``n_images`` test images, each first with an empty compile cache (the first
call on a machine) and then again with the cache that call filled (every
later call). Each measurement is repeated ``repeats`` times, each repeat with
its own empty cache; the best (smallest) time is reported, since other
processes on the machine only ever add time. :func:`format_predict_calls`
gives the report's line.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time

from PIL import Image

from jax_gad import detector as detector_lib

_SUMMARY = re.compile(r"compile cache .*: (\d+) programs loaded, (\d+) compiled")


def _cpu_s() -> float:
  """User + system CPU seconds of this process's finished children."""
  used = resource.getrusage(resource.RUSAGE_CHILDREN)
  return used.ru_utime + used.ru_stime


def _run(args: list, env: dict) -> tuple[float, float, int, int]:
  """(wall s, CPU s, programs loaded, programs compiled) of one command in a fresh process."""
  start, cpu = time.perf_counter(), _cpu_s()
  proc = subprocess.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=1800
  )
  wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
  if proc.returncode:
    raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip()[-2000:]}")
  found = _SUMMARY.search(proc.stdout)
  if not found:
    raise RuntimeError(f"{args[0]} printed no compile cache line: {proc.stdout[-500:]}")
  return wall, cpu, int(found.group(1)), int(found.group(2))


def _write_category(root: str, category: str, n_train: int, n_test: int) -> None:
  """The synthetic category as PNG files: ``root/<category>/{train,test}/<folder>/NNN.png``."""
  from jax_gad.data import synthetic_ad  # imports TFDS: only this section needs it

  drawn = synthetic_ad.generate(category, n_train=n_train, n_test=n_test)
  for split, examples in drawn.items():
    for ex in examples:
      path = os.path.join(root, category, *ex["file_name"].split("/"))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(ex["image"]).save(path)


def measure_predict_calls(
  arch: str,
  checkpoint_dir: str,
  *,
  n_images: int = 100,
  repeats: int = 3,
  image_size: int | None = None,
  levels: tuple = (),
  category: str = "texture",
) -> dict:
  """Best-of-``repeats`` wall times of ``predict`` processes, first and second call.

  Args:
    arch: the backbone (its converted checkpoint in ``checkpoint_dir``; Lite0-2
      are converted there on first use).
    checkpoint_dir: folder of converted checkpoints.
    n_images: test images of the many-image call (half good, half defects).
    repeats: repeats of every measurement, each with a new empty compile cache.
    image_size, levels: the detector's input size and levels (default: native, all).
    category: the synthetic category drawn.

  Returns:
    ``arch``, ``category``, ``image_size``, ``levels``, ``n_images``,
    ``repeats``, ``fit_s``, ``load_average`` (before, after), and for ``one``
    (one image) and ``many`` (``n_images``): ``first_s`` / ``second_s`` (best
    wall time with an empty / a filled compile cache), ``first_all`` /
    ``second_all`` (every repeat), ``first_cpu`` / ``second_cpu`` (user +
    system CPU seconds of every repeat: less sensitive than wall time to other
    processes' load), ``second_loaded`` / ``second_compiled`` (programs the
    second call loaded from the cache / compiled, last repeat). ``image_size``
    is the detector's.
  """
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  weights = f"--checkpoint_dir={os.path.abspath(checkpoint_dir)}"
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data")
    _write_category(data, category, n_train=20, n_test=n_images)
    det = os.path.join(tmp, "detector.jgd")
    fit = ["jax_gad.fit", "--dataset=folder", f"--data_dir={data}", f"--category={category}"]
    fit += [f"--arch={arch}", weights, f"--tfds_dir={tmp}/tfds", f"--output={det}"]
    fit += ["--cache_dir=", "--noplots", f"--compile_cache={tmp}/fit_xla"]
    if image_size:
      fit.append(f"--image_size={image_size}")
    if levels:
      fit.append(f"--levels={','.join(map(str, levels))}")
    fit_s = _run(fit, env)[0]  # fit prints the compile cache line too
    inputs = {
      "one": os.path.join(data, category, "test", "good", "000.png"),
      "many": os.path.join(data, category, "test"),
    }
    times = {
      k: {f"{c}_{m}": [] for c in ("first", "second") for m in ("all", "cpu")} for k in inputs
    }
    for r in range(repeats):
      for name, path in inputs.items():
        cache = os.path.join(tmp, f"xla_{name}_{r}")  # empty before each first call
        predict = ["jax_gad.predict", f"--detector={det}", f"--input={path}", "--noplots"]
        predict += [f"--output={tmp}/{name}.csv", f"--compile_cache={cache}", weights]
        for call in ("first", "second"):
          wall, cpu, loaded, compiled = _run(predict, env)
          times[name][f"{call}_all"].append(wall)
          times[name][f"{call}_cpu"].append(cpu)
        times[name].update(second_loaded=loaded, second_compiled=compiled)
    image_size = detector_lib.read_detector(det).image_size
  for row in times.values():
    row.update(first_s=min(row["first_all"]), second_s=min(row["second_all"]))
  return {
    "arch": arch,
    "category": category,
    "image_size": image_size,
    "levels": list(levels),
    "n_images": n_images,
    "repeats": repeats,
    "fit_s": fit_s,
    "load_average": [list(load_before), list(os.getloadavg())],
    **times,
  }


def format_predict_calls(result: dict) -> str | None:
  """The report's paragraph for :func:`measure_predict_calls` (None when it did not run)."""
  row = result.get("predict_calls")
  if row is None:
    return None
  one, many = row["one"], row["many"]
  return "".join(
    [
      f"Predict in a fresh process ({row['arch']} {row['image_size']}px, synthetic "
      f"{row['category']} PNGs, "
      f"best of {row['repeats']}; load average {row['load_average'][0][0]:.1f} before): "
      f"1 image {one['first_s']:.1f} s first call (empty compile cache; CPU "
      f"{min(one['first_cpu']):.1f} s), {one['second_s']:.1f} s second call (CPU "
      f"{min(one['second_cpu']):.1f} s; {one['second_loaded']} programs loaded, "
      f"{one['second_compiled']} compiled); {row['n_images']} images {many['first_s']:.1f} s "
      f"first (CPU {min(many['first_cpu']):.1f} s), {many['second_s']:.1f} s second (CPU "
      f"{min(many['second_cpu']):.1f} s).",
    ]
  )
