"""Timed measurements of each stage: extraction (JAX and torch), kernels, decoding, pipeline.

Each ``bench_*`` function measures one thing and returns a JSON-able row; the
helpers at the top time calls, read the machine's load and memory.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_gad import backbone as backbone_lib
from jax_gad import config, features, gaussian
from jax_gad import detector as detector_lib
from jax_gad.models import efficientnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DISTANCE_NAMES = tuple(gaussian.DISTANCES)
_LEVELS = tuple(range(efficientnet.NUM_LEVELS))


# ---------------------------------------------------------------------------
# Timing, load and memory
# ---------------------------------------------------------------------------


def peak_host_memory_mb() -> float:
  """Peak resident set size of this process so far, in MiB (Linux ru_maxrss)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return rss / (1024.0 * 1024.0) if sys.platform == 'darwin' else rss / 1024.0


def cpu_snapshot():
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


def _timed_steps(step: Callable[[], Any], num_batches: int) -> tuple[list[float], float | None]:
  """Seconds of each of ``num_batches`` calls after one warm-up call, and the foreign CPU share."""
  step()  # warm-up (first execution, allocations)
  before = cpu_snapshot()
  times = [_timed(step, 1, 0.0)[0] for _ in range(max(1, num_batches))]
  return times, other_cpu_fraction(before, cpu_snapshot())


def ratio(num, den):
  if num is None or den is None or den <= 0:
    return None
  return float(num) / float(den)


def optional_version(module_name: str) -> str | None:
  """The installed version of a module's distribution, or None when it is not installed."""
  dist = {'sklearn': 'scikit-learn'}.get(module_name, module_name)
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def load_average():
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
  try:
    out = subprocess.run(
      ['git', 'rev-parse', 'HEAD'],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.abspath(__file__)),
      timeout=10,
    )
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
    'jaxlib': optional_version('jaxlib'),
    'backend': jax.default_backend(),
    'device_kind': devices[0].device_kind,
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'process_count': jax.process_count(),
    'torch': optional_version('torch'),
    'sklearn': optional_version('sklearn'),
    'load_average_start': load_average(),
    'git_commit': _git_commit(),
  }


def _memory_analysis(compiled) -> dict | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # backends without a memory analysis raise various errors: no figure
    return None
  if stats is None:
    return None
  out = {}
  for key, attr in (
    ('argument_bytes', 'argument_size_in_bytes'),
    ('output_bytes', 'output_size_in_bytes'),
    ('temp_bytes', 'temp_size_in_bytes'),
    ('generated_code_bytes', 'generated_code_size_in_bytes'),
  ):
    value = getattr(stats, attr, None)
    out[key] = int(value) if value is not None else None
  return out


def _device_peak_bytes() -> int | None:
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # backends without memory statistics raise various errors: no figure
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------


class Setup(NamedTuple):
  """One extraction configuration: network, input size, global batch, dtype, depthwise."""

  arch: str
  image_size: int
  batch_size: int
  dtype: str = config.Backbone.dtype
  depthwise: str | None = None  # None: the backend's default

  def extractor(self, variables, mesh=None) -> features.LevelExtractor:
    """The sharded extractor of all 9 levels, pooled on device (not compiled yet)."""
    module = efficientnet.create(self.arch, depthwise=self.depthwise, dtype=DTYPES[self.dtype])
    return features.LevelExtractor(
      module,
      variables,
      image_size=self.image_size,
      levels=_LEVELS,
      mesh=mesh,
      batch_size=self.batch_size,
    )


def bench_extraction(setup: Setup, variables, num_batches: int, mesh=None, seed: int = 0) -> dict:
  """Times the sharded extractor on random normalised images.

  Args:
    setup: the configuration (the batch is rounded up to the device count).
    variables: model variables (e.g. :func:`jax_gad.models.efficientnet.init`).
    num_batches: timed batches after one warm-up batch.
    mesh: device mesh (default every device).
    seed: input seed.

  Returns:
    One ``extraction`` row (see the package docstring).
  """
  extractor = setup.extractor(variables, mesh)
  compile_s = extractor.compile()
  rng = np.random.default_rng(seed)
  size = setup.image_size
  host = rng.normal(size=(len(extractor.local_rows), size, size, 3)).astype(np.float32)

  def step():
    jax.device_get(extractor(extractor.device_batch(host)))

  times, others = _timed_steps(step, num_batches)
  step_s = float(np.median(times))
  return {
    **setup._asdict(),
    'batch_size': extractor.batch_size,
    'other_cpu': others,
    'device_count': extractor.mesh.size,
    'compile_s': compile_s,
    'step_s': step_s,
    'step_s_all': times,
    'images_per_s': extractor.batch_size / step_s,
    'num_batches': len(times),
    'compiled_memory': _memory_analysis(extractor.compiled),
    'device_peak_bytes': _device_peak_bytes(),
    'torch_images_per_s': None,
    'speedup_vs_torch': None,
  }


def torch_available() -> str | None:
  """None when torch and efficientnet_pytorch import, else the reason."""
  try:
    import efficientnet_pytorch  # noqa: F401  (only whether it imports)
    import torch  # noqa: F401
  except ImportError as err:
    return f'{err.name or err} not importable'
  return None


def bench_torch(
  arch: str, image_size: int, batch_size: int, num_batches: int, threads: int, seed: int = 0
) -> dict:
  """Times ``efficientnet_pytorch`` ``EfficientNet.extract_features`` (random weights).

  ``extract_features`` runs stem, all blocks and the head convolution, i.e.
  the same network the JAX extractor runs (without the pooling of 9 levels,
  which is negligible), in float32 under ``torch.no_grad``.
  """
  from efficientnet_pytorch import EfficientNet  # here: keeps torch out of --help
  import torch  # here: keeps torch out of --help

  if arch not in efficientnet.ARCHS or efficientnet.ARCHS[arch].family != 'b':
    raise ValueError(f'efficientnet_pytorch has only the B family, got arch {arch!r}')
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = EfficientNet.from_name(arch, image_size=image_size).eval()
  x = torch.from_numpy(
    np.random.default_rng(seed)
    .normal(size=(batch_size, 3, image_size, image_size))
    .astype(np.float32)
  )

  def step():
    with torch.no_grad():
      model.extract_features(x)

  times, others = _timed_steps(step, num_batches)
  step_s = float(np.median(times))
  return {
    'arch': arch,
    'image_size': image_size,
    'batch_size': batch_size,
    'threads': threads,
    'other_cpu': others,
    'step_s': step_s,
    'step_s_all': times,
    'images_per_s': batch_size / step_s,
    'num_batches': len(times),
  }


def bench_versus_torch(
  arch: str,
  image_size: int,
  batch_sizes: Sequence[int],
  depthwise: str,
  variables,
  *,
  rounds: int,
  threads: int,
  mesh=None,
  seed: int = 0,
) -> dict:
  """jax_gad and ``efficientnet_pytorch`` float32 extraction, timed in alternation.

  Every round gives each (implementation, batch size) one turn, so load from
  other processes falls on both alike. A turn runs one untimed batch, then
  times one: the first call after the other framework's turn is slower for
  reasons that have nothing to do with its own speed (torch's OpenMP workers
  keep spinning for a few milliseconds after torch returns, and caches hold
  the other network's data), so the steady-state rate is what is compared,
  for both alike. The untimed first calls are kept (``first_step_s_all``,
  ``torch_first_step_s_all``) and reported. Rates are medians over the
  rounds and ``speedup_vs_torch`` is the median of the per-round ratios.

  Returns:
    ``arch``, ``image_size``, ``depthwise``, ``threads``, ``rounds``,
    ``other_cpu``, ``rows`` (per batch size: ``batch_size``,
    ``images_per_s``, ``torch_images_per_s``, ``speedup_vs_torch``,
    ``first_call_images_per_s``, ``torch_first_call_images_per_s``,
    ``step_s_all``, ``torch_step_s_all``, ``first_step_s_all``,
    ``torch_first_step_s_all``).
  """
  from efficientnet_pytorch import EfficientNet  # here: keeps torch out of --help
  import torch  # here: keeps torch out of --help

  if efficientnet.ARCHS[arch].family != 'b':
    raise ValueError(f'efficientnet_pytorch has only the B family, got arch {arch!r}')
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = EfficientNet.from_name(arch, image_size=image_size).eval()
  rng = np.random.default_rng(seed)
  steps = []
  for batch in batch_sizes:
    extractor = Setup(arch, image_size, batch, 'float32', depthwise).extractor(variables, mesh)
    extractor.compile()
    host = rng.normal(size=(len(extractor.local_rows), image_size, image_size, 3))
    host = host.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(host.transpose(0, 3, 1, 2)))

    def jax_step(extractor=extractor, host=host):
      jax.device_get(extractor(extractor.device_batch(host)))

    def torch_step(x=x):
      with torch.no_grad():
        model.extract_features(x)

    jax_step()  # warm-up
    torch_step()
    steps.append((extractor.batch_size, jax_step, torch_step))
  before = cpu_snapshot()
  times, first = _alternate(steps, rounds)
  return {
    'arch': arch,
    'image_size': image_size,
    'depthwise': depthwise,
    'threads': threads,
    'rounds': max(1, rounds),
    'other_cpu': other_cpu_fraction(before, cpu_snapshot()),
    'rows': [_versus_row(b, times, first) for b, _, _ in steps],
  }


def _alternate(steps, rounds: int) -> tuple[dict, dict]:
  """Per (batch, 'jax' | 'torch'): timed step seconds and untimed first-call seconds.

  Each round gives every (batch, framework) one turn, the framework order
  swapped every other round; a turn runs one batch to settle, then one timed.
  """
  times = {(b, who): [] for b, _, _ in steps for who in ('jax', 'torch')}
  first = {key: [] for key in times}
  for r in range(max(1, rounds)):
    for b, jax_step, torch_step in steps:
      pair = [('jax', jax_step), ('torch', torch_step)]
      for who, step in pair if r % 2 == 0 else pair[::-1]:
        first[(b, who)].append(_timed(step, 1, 0.0)[0])  # settles; not compared
        times[(b, who)].append(_timed(step, 1, 0.0)[0])
  return times, first


def _versus_row(b: int, times: dict, first: dict) -> dict:
  """One batch size's row of :func:`bench_versus_torch` (medians over the rounds)."""
  jt, tt = times[(b, 'jax')], times[(b, 'torch')]
  jf, tf = first[(b, 'jax')], first[(b, 'torch')]
  return {
    'batch_size': b,
    'images_per_s': b / float(np.median(jt)),
    'torch_images_per_s': b / float(np.median(tt)),
    'speedup_vs_torch': float(np.median([t / j for j, t in zip(jt, tt)])),
    'first_call_images_per_s': b / float(np.median(jf)),
    'torch_first_call_images_per_s': b / float(np.median(tf)),
    'step_s_all': jt,
    'torch_step_s_all': tt,
    'first_step_s_all': jf,
    'torch_first_step_s_all': tf,
  }


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
    import sklearn.covariance  # noqa: F401  (only whether it imports)
  except ImportError as err:
    return f'{err.name or err} not importable'
  return None


def _sklearn_fit(x):
  from sklearn.covariance import LedoitWolf  # here: keeps scikit-learn out of --help

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


def bench_fit(
  n: int,
  d: int,
  *,
  repeats: int,
  budget_s: float,
  use_sklearn: bool,
  n_score: int = 0,
  seed: int = 0,
) -> dict:
  """Times ``gaussian.fit_gaussian`` (and the scorers) vs scikit-learn + numpy.

  Compilation is triggered and timed separately before the timed runs.

  Returns:
    A row ``n``, ``d``, ``jax_compile_s``, ``jax_fit_s``, ``sklearn_fit_s``,
    ``fit_speedup`` and, when ``n_score > 0``, ``jax_score_s`` (per distance),
    ``jax_score_total_s``, ``numpy_score_total_s``, ``score_speedup``.
  """
  rng = np.random.default_rng(seed + 7919 * d + n)
  x = _features(rng, n, d)

  def jax_fit():
    return jax.block_until_ready(gaussian.fit_gaussian(x))

  t0 = time.perf_counter()
  state = jax_fit()
  compile_s = time.perf_counter() - t0
  jax_fit_s = float(np.median(_timed(jax_fit, repeats, budget_s)))
  row = {
    'n': n,
    'd': d,
    'jax_compile_s': compile_s,
    'jax_fit_s': jax_fit_s,
    'sklearn_fit_s': None,
    'fit_speedup': None,
  }
  if use_sklearn:
    row['sklearn_fit_s'] = float(np.median(_timed(lambda: _sklearn_fit(x), repeats, budget_s)))
    row['fit_speedup'] = ratio(row['sklearn_fit_s'], jax_fit_s)
  if n_score > 0:
    xs = _features(rng, n_score, d)
    scorers = {'l2': gaussian.l2, 'sed': gaussian.sed, 'mahalanobis': gaussian.mahalanobis}
    row['jax_score_s'] = {}
    for name, fn in scorers.items():
      jax.block_until_ready(fn(state, xs))  # compile
      row['jax_score_s'][name] = float(
        np.median(_timed(lambda fn=fn: jax.block_until_ready(fn(state, xs)), repeats, budget_s))
      )
    row['jax_score_total_s'] = float(sum(row['jax_score_s'].values()))
    row['numpy_score_total_s'] = None
    row['score_speedup'] = None
    if use_sklearn:
      fit = _sklearn_fit(x)
      row['numpy_score_total_s'] = float(
        np.median(_timed(lambda: _numpy_scores(fit, xs), repeats, budget_s))
      )
      row['score_speedup'] = ratio(row['numpy_score_total_s'], row['jax_score_total_s'])
  return row


def bench_kernels(
  widths: Sequence[int],
  n_fit: int,
  n_score: int,
  *,
  repeats: int,
  budget_s: float,
  use_sklearn: bool,
  seed: int = 0,
) -> dict:
  """Fit + score at each level width (e.g. ``efficientnet.level_widths(arch)``)."""
  rows = []
  before = cpu_snapshot()
  for level, width in enumerate(widths):
    row = bench_fit(
      n_fit,
      width,
      repeats=repeats,
      budget_s=budget_s,
      use_sklearn=use_sklearn,
      n_score=n_score,
      seed=seed,
    )
    rows.append(dict(level=level, width=width, **row))
  total = {
    'jax_fit_s': sum(r['jax_fit_s'] for r in rows),
    'jax_score_total_s': sum(r['jax_score_total_s'] for r in rows),
    'sklearn_fit_s': (sum(r['sklearn_fit_s'] for r in rows) if use_sklearn else None),
    'numpy_score_total_s': (sum(r['numpy_score_total_s'] for r in rows) if use_sklearn else None),
  }
  total['fit_speedup'] = ratio(total['sklearn_fit_s'], total['jax_fit_s'])
  total['score_speedup'] = ratio(total['numpy_score_total_s'], total['jax_score_total_s'])
  total['other_cpu'] = other_cpu_fraction(before, cpu_snapshot())
  return {'n_fit': n_fit, 'n_score': n_score, 'levels': rows, 'total': total}


# ---------------------------------------------------------------------------
# Host preprocessing and the decode + extract pipeline
# ---------------------------------------------------------------------------


def bench_host_preprocess(
  side: int, image_size: int, mean, std, repeats: int = 5, seed: int = 0
) -> float:
  """Seconds per image to decode a ``side``-pixel PNG and prepare it (one thread)."""
  from jax_gad.data import common  # here: jax_gad.data imports TFDS, kept out of --help
  from jax_gad.data.preprocess import prepare_image  # here: as above (TFDS)

  png = _test_png(side, seed)

  def run():
    prepare_image(common.decode_image(png), image_size, mean, std)

  run()
  return float(np.median(_timed(run, repeats, 10.0)))


def _test_png(side: int, seed: int) -> bytes:
  """A smooth colour image with mild noise (compresses like a photo), as PNG."""
  from jax_gad.data import common  # here: jax_gad.data imports TFDS, kept out of --help

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
    from jax_gad.data import common  # here: jax_gad.data imports TFDS, kept out of --help

    return {'image': common.decode_image(self._pngs[index])}


def bench_pipeline(
  setup: Setup, variables, *, n_images: int, side: int, num_workers: int, mesh=None, seed: int = 0
) -> dict:
  """End-to-end :meth:`LevelExtractor.extract` over PNG-encoded images.

  Decoding (PIL) and resizing + normalising (``prepare_image``) run in the
  extractor's thread pool while the device computes, as in a real run. The
  images are ``side`` x ``side`` PNGs held in memory (no disk reads). The
  executable is compiled before timing.

  Returns:
    ``arch``, ``image_size``, ``n_images``, ``side``, ``num_workers``, ``batch_size``, ``dtype``,
    ``depthwise``, ``wall_s``, ``images_per_s``, ``other_cpu``.
  """
  from jax_gad.data import pipeline  # here: jax_gad.data imports TFDS, kept out of --help

  spec = efficientnet.ARCHS[setup.arch]
  extractor = setup.extractor(variables, mesh)
  extractor.compile()
  pngs = [_test_png(side, seed + i) for i in range(min(n_images, 8))]
  source = _PngSource([pngs[i % len(pngs)] for i in range(n_images)])
  before = cpu_snapshot()
  t0 = time.perf_counter()
  pipeline.pooled_features(
    extractor,
    source,
    image_size=setup.image_size,
    mean=spec.mean,
    std=spec.std,
    num_workers=num_workers,
    progress=False,
  )
  wall = time.perf_counter() - t0
  return {
    **setup._asdict(),
    'n_images': n_images,
    'side': side,
    'num_workers': num_workers,
    'batch_size': extractor.batch_size,
    'wall_s': wall,
    'images_per_s': n_images / wall,
    'other_cpu': other_cpu_fraction(before, cpu_snapshot()),
  }


# ---------------------------------------------------------------------------
# Predict on files
# ---------------------------------------------------------------------------


def _predict_detector(setup: Setup, variables, pngs, num_workers: int):
  """A detector (every level) fitted on the features of ``pngs``, with ``variables`` attached.

  With random weights the scores mean nothing; the work per image is the same.
  """
  from jax_gad.data import pipeline  # here: jax_gad.data imports TFDS, kept out of --help

  spec = efficientnet.ARCHS[setup.arch]
  extractor = setup.extractor(variables)
  feats = pipeline.pooled_features(
    extractor,
    _PngSource(pngs),
    image_size=setup.image_size,
    mean=spec.mean,
    std=spec.std,
    num_workers=num_workers,
    progress=False,
  )
  det = detector_lib.fit_features(
    feats,
    levels=_LEVELS,
    n_folds=min(5, len(pngs)),
    arch=setup.arch,
    image_size=setup.image_size,
    mean=tuple(spec.mean),
    std=tuple(spec.std),
  )
  return det.replace(backbone=backbone_lib.Backbone(extractor.module, variables, ''))


def bench_predict_maps(
  arch: str,
  image_size: int,
  batch_size: int,
  variables,
  *,
  n_images: int,
  side: int,
  num_workers: int,
  seed: int = 0,
) -> dict:
  """Throughput of :func:`jax_gad.predict.predict` with ``maps_dir``, beside the plain rate.

  As :func:`bench_predict` (PNG files, a detector fitted on 10 of them), but
  the detector also holds map statistics of the arch's default map levels
  (``jax_gad.detector.fit_maps``), and both runs are timed on the same files
  after a compiling run: without maps, and with an anomaly map (``.npy``) and
  an overlay (``.png``) written per image.

  Returns:
    ``n_images``, ``side``, ``image_size``, ``batch_size``, ``map_levels``,
    ``images_per_s`` (plain) and ``maps_images_per_s``.
  """
  from jax_gad import predict  # imports TFDS: only this section needs it

  with tempfile.TemporaryDirectory() as tmp:
    pngs = [_test_png(side, seed + i) for i in range(n_images)]
    paths = [os.path.join(tmp, f'{i:05d}.png') for i in range(n_images)]
    for path, png in zip(paths, pngs):
      with open(path, 'wb') as f:
        f.write(png)
    fit_images = predict._ImageFiles(paths[: min(10, n_images)], False, image_size)
    setup = Setup(arch, image_size, batch_size)
    det = _predict_detector(setup, variables, pngs[: min(10, n_images)], num_workers)
    settings = detector_lib.map_settings(arch)
    det = detector_lib.fit_maps(
      det, fit_images, settings, batch_size=batch_size, num_workers=num_workers
    )
    inputs = predict.Inputs(paths, None, root=tmp)
    rates = {}
    for key, maps_dir in (('images_per_s', None), ('maps_images_per_s', os.path.join(tmp, 'm'))):
      kwargs = {'batch_size': batch_size, 'num_workers': num_workers, 'progress': False}
      first = predict.Inputs(paths[:batch_size], None, root=tmp)
      predict.predict(det, first, os.path.join(tmp, 's.csv'), maps_dir=maps_dir, **kwargs)
      t0 = time.perf_counter()
      predict.predict(det, inputs, os.path.join(tmp, 's.csv'), maps_dir=maps_dir, **kwargs)
      rates[key] = n_images / (time.perf_counter() - t0)
  return {
    'arch': arch,
    'n_images': n_images,
    'side': side,
    'image_size': image_size,
    'batch_size': batch_size,
    'map_levels': list(settings.levels),
    **rates,
  }


def bench_predict(
  arch: str,
  image_size: int,
  batch_size: int,
  variables,
  *,
  n_images: int,
  side: int,
  num_workers: int,
  repeats: int = 5,
  budget_s: float = 30.0,
  seed: int = 0,
) -> dict:
  """Throughput and single-image latency of :func:`jax_gad.predict.predict` on files.

  Writes ``n_images`` PNGs of ``side`` px into a temporary folder, fits a
  detector (every level) on the features of 10 of them, then times
  ``predict`` over the folder: read, decode, resize, extract, score and write
  the CSV, compiled beforehand. Latency: batch size 1, one image, median of
  ``repeats`` runs after a compiling one.

  Returns:
    ``arch``, ``n_images``, ``side``, ``image_size``, ``batch_size``, ``num_workers``,
    ``images_per_s``, ``latency_s``.
  """
  from jax_gad import predict  # here: jax_gad.predict imports TFDS, kept out of --help

  pngs = [_test_png(side, seed + i) for i in range(n_images)]
  det = _predict_detector(Setup(arch, image_size, batch_size), variables, pngs[:10], num_workers)
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, f'{i:05d}.png') for i in range(n_images)]
    for path, png in zip(paths, pngs):
      with open(path, 'wb') as f:
        f.write(png)
    out = os.path.join(tmp, 'scores.csv')

    def run(inputs, batch):
      predict.predict(det, inputs, out, batch_size=batch, num_workers=num_workers, progress=False)

    run(predict.Inputs(paths[:batch_size], None), batch_size)  # compile
    t0 = time.perf_counter()
    run(predict.Inputs(paths, None), batch_size)
    images_per_s = n_images / (time.perf_counter() - t0)
    one = predict.Inputs(paths[:1], None)
    if batch_size != 1:
      run(one, 1)  # compile batch 1
    latency = float(np.median(_timed(lambda: run(one, 1), repeats, budget_s)))
  return {
    'arch': arch,
    'n_images': n_images,
    'side': side,
    'image_size': image_size,
    'batch_size': batch_size,
    'num_workers': num_workers,
    'images_per_s': images_per_s,
    'latency_s': latency,
  }
