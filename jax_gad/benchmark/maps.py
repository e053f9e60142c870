"""Benchmark of the per-location map fit: constant memory and speed against numpy + scikit-learn.

  python -m jax_gad.benchmark --map_fit                 # adds this section
  python -m jax_gad.benchmark --map_fit --map_counts=100,1000 --json=bench.json

An optional section of ``python -m jax_gad.benchmark`` (off by default, so the
default benchmark stays short). The level maps are random (the fit's cost does
not depend on the values), shaped as the default ``--map_levels`` (3, 4, 5) of
each architecture at its native resolution:

* **memory**: for each image count (default 100 and 1,000), a fresh
  subprocess streams that many images in batches of 16 through
  :func:`jax_gad.maps.fit.accumulate` and :func:`~jax_gad.maps.fit.finalize`
  and reports its peak resident memory (``ru_maxrss``), so each number is the
  whole process's peak, not a difference of two samples.
* **speed**: fit time per training image (accumulate; finalize once) and
  scoring time per test image, against a plain numpy + scikit-learn
  implementation in the same process: stack every map, then per location
  ``sklearn.covariance.LedoitWolf().fit`` and the Mahalanobis distance with
  its ``precision_``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

SHAPES = {
  # (h, w, C) of levels 3, 4, 5 at the native input size.
  'efficientnet-lite0': [(28, 28, 40), (14, 14, 80), (14, 14, 112)],
  'efficientnet-b4': [(48, 48, 56), (24, 24, 112), (24, 24, 160)],
}
BATCH = 16


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fit_stream(arch: str, n_images: int, seed: int = 0) -> dict:
  """Streams n_images random maps per level through the fit; returns seconds and peak MiB."""
  from jax_gad.maps import fit as mfit  # here: jax_gad.maps imports TFDS, kept out of --help

  rng = np.random.default_rng(seed)
  shapes = SHAPES[arch]
  stats = [mfit.empty(s) for s in shapes]
  start = time.perf_counter()
  for b in range(0, n_images, BATCH):
    k = min(BATCH, n_images - b)
    for i, s in enumerate(shapes):
      maps = rng.standard_normal((k,) + s, dtype=np.float32)
      stats[i] = mfit.accumulate(stats[i], maps)
  jax.block_until_ready(stats)
  accumulate_s = time.perf_counter() - start
  start = time.perf_counter()
  states = [mfit.finalize(st) for st in stats]
  jax.block_until_ready(states)
  finalize_s = time.perf_counter() - start
  return {
    'arch': arch,
    'n_images': n_images,
    'accumulate_s': accumulate_s,
    'finalize_s': finalize_s,
    'peak_rss_mb': _peak_mb(),
    'state_mb': sum(mfit.state_bytes(s) for s in shapes) / 2**20,
  }


def memory(arch: str, counts) -> list[dict]:
  """:func:`fit_stream` in a fresh subprocess per image count."""
  out = []
  for n in counts:
    code = (
      'import json, sys; from jax_gad.benchmark.maps import fit_stream; '
      f'print(json.dumps(fit_stream({arch!r}, {int(n)})))'
    )
    proc = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      check=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
    )
    out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return out


def _sklearn_fit_score(train, test):
  from sklearn.covariance import LedoitWolf  # here: keeps scikit-learn out of --help

  n, h, w, c = train.shape
  out = np.zeros(test.shape[:3])
  start = time.perf_counter()
  models = {}
  for i in range(h):
    for j in range(w):
      models[i, j] = LedoitWolf().fit(train[:, i, j].astype(np.float64))
  fit_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(h):
    for j in range(w):
      m = models[i, j]
      z = test[:, i, j] - m.location_
      out[:, i, j] = np.sqrt(np.einsum('nc,cd,nd->n', z, m.precision_, z))
  return fit_s, time.perf_counter() - start, out


def speed(arch: str, n_train: int = 64, n_test: int = 32, seed: int = 1) -> dict:
  """Per-image fit and scoring time: jax_gad.maps vs numpy + scikit-learn (same maps)."""
  from jax_gad.maps import fit as mfit  # here: jax_gad.maps imports TFDS, kept out of --help

  rng = np.random.default_rng(seed)
  result = {'arch': arch, 'n_train': n_train, 'n_test': n_test, 'jax': {}, 'sklearn': {}}
  jf = js = sf = ss = 0.0
  max_rel = 0.0
  for shape in SHAPES[arch]:
    train = rng.standard_normal((n_train,) + shape, dtype=np.float32)
    test = rng.standard_normal((n_test,) + shape, dtype=np.float32)
    # Warm-up (compilation) on the same shapes, then timed.
    st = mfit.finalize(mfit.accumulate(mfit.empty(shape), train[:BATCH]))
    jax.block_until_ready(mfit.score(st, test[:BATCH]))
    start = time.perf_counter()
    stats = mfit.empty(shape)
    for b in range(0, n_train, BATCH):
      stats = mfit.accumulate(stats, train[b : b + BATCH])
    state = mfit.finalize(stats)
    jax.block_until_ready(state)
    jf += time.perf_counter() - start
    start = time.perf_counter()
    got = []
    for b in range(0, n_test, BATCH):
      got.append(mfit.score(state, test[b : b + BATCH]))
    got = np.concatenate([np.asarray(g) for g in jax.block_until_ready(got)])
    js += time.perf_counter() - start
    fit_s, score_s, ref = _sklearn_fit_score(train, test)
    sf += fit_s
    ss += score_s
    max_rel = max(max_rel, float(np.max(np.abs(got - ref) / np.abs(ref))))
  result['jax'] = {'fit_ms_per_image': 1e3 * jf / n_train, 'score_ms_per_image': 1e3 * js / n_test}
  result['sklearn'] = {
    'fit_ms_per_image': 1e3 * sf / n_train,
    'score_ms_per_image': 1e3 * ss / n_test,
  }
  result['max_relative_difference'] = max_rel
  return result


def format_report(res: dict) -> str:
  lines = [
    'Per-location fit, peak resident memory of a fresh process (ru_maxrss):',
    '',
    '| arch | images | peak RSS (MiB) | statistics (MiB) | accumulate (s) | finalize (s) |',
    '|---|---|---|---|---|---|',
  ]
  for m in res['memory']:
    lines.append(
      f"| {m['arch']} | {m['n_images']} | {m['peak_rss_mb']:.0f} | "
      f"{m['state_mb']:.1f} | {m['accumulate_s']:.2f} | {m['finalize_s']:.2f} |"
    )
  lines += [
    '',
    'Time per image (ms), jax_gad.maps vs numpy + scikit-learn (same maps):',
    '',
    '| arch | fit jax | fit sklearn | score jax | score sklearn | max rel. diff |',
    '|---|---|---|---|---|---|',
  ]
  for s in res['speed']:
    lines.append(
      f"| {s['arch']} | {s['jax']['fit_ms_per_image']:.1f} | "
      f"{s['sklearn']['fit_ms_per_image']:.1f} | {s['jax']['score_ms_per_image']:.1f} | "
      f"{s['sklearn']['score_ms_per_image']:.1f} | {s['max_relative_difference']:.1e} |"
    )
  return '\n'.join(lines) + '\n'


def run_section(
  archs=tuple(SHAPES), counts=(100, 1000), n_train: int = 64, n_test: int = 32, log=print
) -> dict:
  """The whole section: memory at each image count and speed, for each architecture."""
  bad = [a for a in archs if a not in SHAPES]
  if bad:
    raise ValueError(f'map benchmark archs: unknown {bad}; choose from {sorted(SHAPES)}')
  res = {'memory': [], 'speed': []}
  for arch in archs:
    log(f'maps: per-location fit of {arch} level-3..5 maps on {list(counts)} images ...')
    res['memory'] += memory(arch, counts)
    log(f'maps: fit / score time per image, {arch}, vs numpy + scikit-learn ...')
    res['speed'].append(speed(arch, n_train, n_test))
  return res
