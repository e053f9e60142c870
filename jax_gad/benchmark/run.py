"""Benchmark settings and the driver that runs every enabled measurement once."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import jax

from jax_gad import config, features
from jax_gad.benchmark import densities as density_bench
from jax_gad.benchmark import engines, measure, predict_calls
from jax_gad.benchmark import maps as bench_maps
from jax_gad.benchmark.estimate import estimate_protocol
from jax_gad.models import efficientnet

SCHEMA = 'jax_gad.benchmark/1'
# The options the benchmark shares with jax_gad's commands (jax_gad.config; same flags).
SHARED_OPTIONS = ('arch', 'image_size', 'num_workers', 'seed')


class Config(NamedTuple):
  """Benchmark settings (the command-line flags)."""

  arch: str = config.Backbone.arch
  image_size: int | None = config.Backbone.image_size  # None: native resolution of arch
  batch_sizes: tuple[int, ...] = (8,)
  dtypes: tuple[str, ...] = ('float32', 'bfloat16')
  depthwise_impls: tuple[str, ...] = ('default',)
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
  predict_images: int = 0  # 0: skip the predict throughput / latency run (files on disk)
  predict_calls: int = 0  # 0: skip; else images of the many-image predict process timing
  checkpoint_dir: str = config.Backbone.checkpoint_dir  # real weights of --arch for predict_calls
  pipeline_archs: tuple[str, ...] = ()  # more archs for the pipeline run, each per batch size
  versus_rounds: int = 0  # >0: jax_gad vs torch float32, alternating, this many rounds
  engines_rounds: int = 0  # >0: jax_gad vs ONNX Runtime, OpenVINO, PyTorch, this many rounds
  # The engines section's architectures, each at --image_size or else its native size.
  engines_archs: tuple[str, ...] = ('efficientnet-b4', 'efficientnet-lite0')
  num_workers: int | None = config.Backbone.num_workers  # None: os.cpu_count()
  seed: int = config.Density.seed
  map_fit: bool = False  # the anomaly-map section (jax_gad.benchmark.maps)
  map_counts: tuple[int, ...] = (100, 1000)
  # Density fit times (jax_gad.benchmark.densities): optional, off by default (minutes).
  density_bench: bool = False
  density_bench_n: tuple[int, ...] = (200, 2000)
  density_bench_widths: tuple[int, ...] = ()  # empty: level_widths(arch)
  density_bench_gmm_k: int = 4
  density_bench_gmm_iter: int = 10
  density_bench_flow_epochs: int = 5
  density_bench_vmap: bool = True


def _check_config(cfg: Config) -> None:
  shared = {**config.options(config.Backbone), **config.options(config.Density)}
  for name in SHARED_OPTIONS:  # the rules of jax_gad's shared options
    config.check_field(name, getattr(cfg, name), shared[name])
  for name in (
    'batch_sizes',
    'sweep_d',
    'sweep_n',
    'kernel_widths',
    'density_bench_n',
    'density_bench_widths',
  ):
    for value in getattr(cfg, name):
      if value < 1:
        raise ValueError(f'{name} must hold positive ints, got {getattr(cfg, name)!r}')
  if not cfg.batch_sizes:
    raise ValueError('batch_sizes must name at least one batch size')
  for dtype in cfg.dtypes:
    if dtype not in measure.DTYPES:
      raise ValueError(f'dtypes must be among {sorted(measure.DTYPES)}, got {dtype!r}')
  for impl in cfg.depthwise_impls:
    if impl != 'default' and impl not in efficientnet.DEPTHWISE_IMPLS:
      raise ValueError(
        f"depthwise_impls must be among {efficientnet.DEPTHWISE_IMPLS} or 'default', got {impl!r}"
      )
  for name in ('torch_reference', 'sklearn'):
    if getattr(cfg, name) not in ('auto', 'on', 'off'):
      raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {getattr(cfg, name)!r}")
  for name in (
    'num_batches',
    'kernel_n_score',
    'repeats',
    'sweep_d_n',
    'sweep_n_d',
    'host_image_side',
    'density_bench_gmm_k',
    'density_bench_gmm_iter',
    'density_bench_flow_epochs',
  ):
    if getattr(cfg, name) < 1:
      raise ValueError(f'{name} must be >= 1, got {getattr(cfg, name)}')
  if cfg.kernel_n_fit < 5:
    raise ValueError(f'kernel_n_fit must be >= 5 (5 folds, 2 rows per fit), got {cfg.kernel_n_fit}')
  if cfg.predict_calls < 0:
    raise ValueError(f'predict_calls must be >= 0, got {cfg.predict_calls}')
  if cfg.predict_images < 0:
    raise ValueError(f'predict_images must be >= 0, got {cfg.predict_images}')
  if cfg.pipeline_images < 0:
    raise ValueError(f'pipeline_images must be >= 0, got {cfg.pipeline_images}')
  for arch in cfg.pipeline_archs:
    if arch not in efficientnet.ARCHS:
      raise ValueError(f'pipeline_archs must be among {sorted(efficientnet.ARCHS)}, got {arch!r}')
  if cfg.versus_rounds < 0:
    raise ValueError(f'versus_rounds must be >= 0, got {cfg.versus_rounds}')
  if cfg.engines_rounds < 0:
    raise ValueError(f'--engines_rounds must be >= 0 (0: skip), got {cfg.engines_rounds}')
  for arch in cfg.engines_archs:
    if arch not in efficientnet.ARCHS:
      raise ValueError(f'--engines_archs must be among {sorted(efficientnet.ARCHS)}, got {arch!r}')
  if cfg.engines_rounds and not cfg.engines_archs:
    raise ValueError('--engines_archs must name an architecture when --engines_rounds > 0')
  if cfg.torch_threads < 0:
    raise ValueError(f'torch_threads must be >= 0 (0: cpu count), got {cfg.torch_threads}')


class _Run(NamedTuple):
  """What every section of one benchmark run shares."""

  cfg: Config
  image_size: int
  num_workers: int
  depthwise: list  # implementations timed, the backend's default resolved
  mesh: Any
  variables: Any  # random weights of cfg.arch
  torch_why: str | None  # why the torch reference does not run, or None
  engines_why: str | None  # why the engines section cannot run (with --engines_rounds), or None
  sklearn_why: str | None  # why scikit-learn is not compared, or None
  log: Callable[[str], None]


def _skip_reason(setting: str, flag: str, why: str | None) -> str | None:
  """Why an optional comparison does not run (None: it runs); raises when 'on' cannot be kept."""
  if setting == 'off':
    return f'disabled (--{flag}=off)'
  if why is not None and setting == 'on':
    raise ValueError(f'--{flag}=on but {why}')
  return why


def _setup(cfg: Config, log: Callable[[str], None]) -> _Run:
  # First, before JAX starts its threads: importing openvino forks a telemetry process.
  engines_why = engines.available() if cfg.engines_rounds else None
  torch_why = _skip_reason(cfg.torch_reference, 'torch_reference', None)
  if torch_why is None and efficientnet.ARCHS[cfg.arch].family != 'b':
    torch_why = f'efficientnet_pytorch has no {cfg.arch}'
  elif torch_why is None:
    torch_why = _skip_reason(cfg.torch_reference, 'torch_reference', measure.torch_available())
  sklearn_why = _skip_reason(cfg.sklearn, 'sklearn', None)
  if sklearn_why is None:
    sklearn_why = _skip_reason(cfg.sklearn, 'sklearn', measure.sklearn_available())
  depthwise = [
    efficientnet.default_depthwise(jax.default_backend()) if d == 'default' else d
    for d in cfg.depthwise_impls
  ]
  return _Run(
    cfg=cfg,
    image_size=cfg.image_size or efficientnet.native_resolution(cfg.arch),
    num_workers=config.worker_count(cfg.num_workers),
    depthwise=list(dict.fromkeys(depthwise)),
    mesh=features.make_mesh(),
    variables=efficientnet.init(cfg.arch, jax.random.key(cfg.seed)),
    torch_why=torch_why,
    engines_why=engines_why,
    sklearn_why=sklearn_why,
    log=log,
  )


def _empty_result(cfg: Config) -> dict:
  return {
    'schema': SCHEMA,
    'machine': measure.machine_info(),
    'config': cfg._asdict(),
    'extraction': [],
    'torch': [],
    'torch_skipped': None,
    'sklearn_skipped': None,
    'kernel': None,
    'kernel_skipped': None,
    'sweep_d': [],
    'sweep_n': [],
    'host_preprocess_s_per_image': None,
    'estimate': None,
    'peak_host_memory_mb_after': {},
    'sweeps_other_cpu': None,
    'pipeline': None,
    'predict': None,
    'predict_maps': None,
    'predict_calls': None,
    'maps': None,
    'pipelines': [],
    'versus': None,
    'engines': None,
    'engines_skipped': None,
    'densities': None,
  }


def _best_float32(result: dict) -> dict | None:
  """The fastest float32 extraction row (the pipeline, predict and estimate use it)."""
  f32 = [r for r in result['extraction'] if r['dtype'] == 'float32']
  return max(f32, key=lambda r: r['images_per_s']) if f32 else None


# ---------------------------------------------------------------------------
# Sections: each measures one thing into ``result`` (report.py formats it)
# ---------------------------------------------------------------------------


def extraction_section(run: _Run, result: dict) -> None:
  """Pooled extraction per (batch size, dtype, depthwise)."""
  cfg = run.cfg
  for batch in cfg.batch_sizes:
    for dtype in cfg.dtypes:
      for impl in run.depthwise:
        run.log(
          f'extraction: {cfg.arch} {run.image_size}px batch {batch} {dtype} {impl} '
          f'on {run.mesh.size} device(s) ...'
        )
        setup = measure.Setup(cfg.arch, run.image_size, batch, dtype, impl)
        row = measure.bench_extraction(
          setup, run.variables, cfg.num_batches, mesh=run.mesh, seed=cfg.seed
        )
        run.log(f'  compile {row["compile_s"]:.1f} s, {row["images_per_s"]:.2f} img/s')
        result['extraction'].append(row)
  result['peak_host_memory_mb_after']['extraction'] = measure.peak_host_memory_mb()


def torch_section(run: _Run, result: dict) -> None:
  """efficientnet_pytorch at every extraction batch size; the ratio joins the extraction rows."""
  result['torch_skipped'] = run.torch_why
  if run.torch_why is not None:
    return
  cfg = run.cfg
  threads = cfg.torch_threads or os.cpu_count() or 1
  for batch in sorted({r['batch_size'] for r in result['extraction']}):
    run.log(
      f'torch: efficientnet_pytorch {cfg.arch} {run.image_size}px batch {batch}, '
      f'{threads} thread(s) ...'
    )
    trow = measure.bench_torch(cfg.arch, run.image_size, batch, cfg.num_batches, threads, cfg.seed)
    run.log(f'  {trow["images_per_s"]:.2f} img/s')
    result['torch'].append(trow)
  by_batch = {r['batch_size']: r for r in result['torch']}
  for row in result['extraction']:
    trow = by_batch.get(row['batch_size'])
    if trow is not None:
      row['torch_images_per_s'] = trow['images_per_s']
      row['speedup_vs_torch'] = measure.ratio(row['images_per_s'], trow['images_per_s'])
  result['peak_host_memory_mb_after']['torch'] = measure.peak_host_memory_mb()


def versus_section(run: _Run, result: dict) -> None:
  """jax_gad and efficientnet_pytorch timed in alternation (``--versus_rounds``)."""
  cfg = run.cfg
  if run.torch_why is not None or not cfg.versus_rounds:
    return
  run.log(
    f'versus: jax_gad ({run.depthwise[0]}) and efficientnet_pytorch float32, batches '
    f'{tuple(cfg.batch_sizes)}, {cfg.versus_rounds} alternating rounds ...'
  )
  result['versus'] = measure.bench_versus_torch(
    cfg.arch,
    run.image_size,
    cfg.batch_sizes,
    run.depthwise[0],
    run.variables,
    rounds=cfg.versus_rounds,
    threads=cfg.torch_threads or os.cpu_count() or 1,
    mesh=run.mesh,
    seed=cfg.seed,
  )
  for r in result['versus']['rows']:
    run.log(
      f'  batch {r["batch_size"]}: {r["images_per_s"]:.2f} vs '
      f'{r["torch_images_per_s"]:.2f} img/s, {r["speedup_vs_torch"]:.2f}x'
    )
  result['peak_host_memory_mb_after']['torch'] = measure.peak_host_memory_mb()


def engines_section(run: _Run, result: dict) -> None:
  """jax_gad, ONNX Runtime, OpenVINO and PyTorch on the same weights (``--engines_rounds``)."""
  cfg = run.cfg
  if not cfg.engines_rounds:
    return
  if run.engines_why is not None:
    result['engines_skipped'] = run.engines_why
    run.log(f'engines: skipped, {run.engines_why}')
    return
  threads = cfg.torch_threads or os.cpu_count() or 1
  result['engines'] = []
  for arch in cfg.engines_archs:
    size = cfg.image_size or efficientnet.native_resolution(arch)
    run.log(
      f'engines: {arch} {size}px, jax_gad ({run.depthwise[0]}), ONNX Runtime, OpenVINO and '
      f'PyTorch float32 ({threads} threads), batches {tuple(cfg.batch_sizes)}, '
      f'{cfg.engines_rounds} alternating rounds ...'
    )
    setup = engines.ArchSetup(
      arch, size, tuple(cfg.batch_sizes), cfg.engines_rounds, threads, run.depthwise[0], cfg.seed
    )
    section = engines.bench_arch(setup, log=run.log)
    for r in section['rows']:
      rates = ', '.join(f'{n} {v:.2f}' for n, v in r['images_per_s'].items())
      run.log(f'  batch {r["batch_size"]}: img/s {rates}')
    result['engines'].append(section)
  result['peak_host_memory_mb_after']['engines'] = measure.peak_host_memory_mb()


def kernel_section(run: _Run, result: dict) -> None:
  """Gaussian fit + scoring at each level width, against scikit-learn + numpy."""
  cfg = run.cfg
  result['sklearn_skipped'] = run.sklearn_why
  if not cfg.kernel:
    result['kernel_skipped'] = 'disabled (--nokernel)'
    return
  widths = cfg.kernel_widths or efficientnet.level_widths(cfg.arch)
  run.log(
    f'kernels: fit N={cfg.kernel_n_fit}, score {cfg.kernel_n_score} rows at '
    f'widths {tuple(widths)} ...'
  )
  result['kernel'] = measure.bench_kernels(
    widths,
    cfg.kernel_n_fit,
    cfg.kernel_n_score,
    repeats=cfg.repeats,
    budget_s=cfg.time_budget_s,
    use_sklearn=run.sklearn_why is None,
    seed=cfg.seed,
  )
  result['peak_host_memory_mb_after']['kernel'] = measure.peak_host_memory_mb()


def sweep_section(run: _Run, result: dict) -> None:
  """The Gaussian fit over widths D at fixed N, and over sample counts N at fixed D."""
  cfg = run.cfg
  if not (cfg.sweep_d or cfg.sweep_n):
    return
  points = [('D', cfg.sweep_d_n, d, 'sweep_d') for d in cfg.sweep_d]
  points += [('N', n, cfg.sweep_n_d, 'sweep_n') for n in cfg.sweep_n]
  before = measure.cpu_snapshot()
  for label, n, d, key in points:
    run.log(f'sweep {label}: N={n} D={d} ...')
    result[key].append(
      measure.bench_fit(
        n,
        d,
        repeats=cfg.repeats,
        budget_s=cfg.time_budget_s,
        use_sklearn=run.sklearn_why is None,
        seed=cfg.seed,
      )
    )
  result['peak_host_memory_mb_after']['sweeps'] = measure.peak_host_memory_mb()
  result['sweeps_other_cpu'] = measure.other_cpu_fraction(before, measure.cpu_snapshot())


def host_section(run: _Run, result: dict) -> None:
  """Decoding one large PNG and resizing it to the input, on one thread (for the estimate)."""
  cfg = run.cfg
  if not cfg.estimate:
    return
  spec = efficientnet.ARCHS[cfg.arch]
  run.log(f'host: decode a {cfg.host_image_side}px PNG + resize to {run.image_size} ...')
  result['host_preprocess_s_per_image'] = measure.bench_host_preprocess(
    cfg.host_image_side, run.image_size, spec.mean, spec.std, seed=cfg.seed
  )


def pipeline_section(run: _Run, result: dict) -> None:
  """Decode + extract end to end at the fastest float32 setting, against its device-only rate."""
  cfg = run.cfg
  best = _best_float32(result)
  if not cfg.pipeline_images or best is None:
    return
  run.log(
    f'pipeline: {cfg.pipeline_images} PNGs of {cfg.host_image_side}px decoded by '
    f'{run.num_workers} thread(s) while batch {best["batch_size"]} float32 '
    f'{best["depthwise"]} runs ...'
  )
  setup = measure.Setup(cfg.arch, run.image_size, best['batch_size'], 'float32', best['depthwise'])
  result['pipeline'] = measure.bench_pipeline(
    setup,
    run.variables,
    n_images=cfg.pipeline_images,
    side=cfg.host_image_side,
    num_workers=run.num_workers,
    mesh=run.mesh,
    seed=cfg.seed,
  )
  result['pipeline']['device_only_images_per_s'] = best['images_per_s']
  run.log(f'  {result["pipeline"]["images_per_s"]:.2f} img/s end to end')


def pipelines_section(run: _Run, result: dict) -> None:
  """Decode + extract end to end for each of ``--pipeline_archs`` at every batch size."""
  cfg = run.cfg
  if not cfg.pipeline_images:
    return
  for arch in cfg.pipeline_archs:
    size = cfg.image_size or efficientnet.native_resolution(arch)
    arch_vars = run.variables if arch == cfg.arch else efficientnet.init(arch, jax.random.key(0))
    for batch in cfg.batch_sizes:
      run.log(
        f'pipeline: {arch} {size}px batch {batch} float32 {run.depthwise[0]}, '
        f'{cfg.pipeline_images} PNGs ...'
      )
      row = measure.bench_pipeline(
        measure.Setup(arch, size, batch, 'float32', run.depthwise[0]),
        arch_vars,
        n_images=cfg.pipeline_images,
        side=cfg.host_image_side,
        num_workers=run.num_workers,
        mesh=run.mesh,
        seed=cfg.seed,
      )
      run.log(f'  {row["images_per_s"]:.2f} img/s end to end')
      result['pipelines'].append(row)


def estimate_section(run: _Run, result: dict) -> None:
  """The full-protocol time from the measured rates (needs extraction and kernel rows)."""
  best = _best_float32(result)
  if not run.cfg.estimate or best is None or result['kernel'] is None:
    return
  result['estimate'] = estimate_protocol(
    images_per_s=best['images_per_s'],
    compile_s=best['compile_s'],
    kernel=result['kernel'],
    host_s_per_image=result['host_preprocess_s_per_image'],
    extraction_row=best,
    pipeline_images_per_s=(result['pipeline']['images_per_s'] if result['pipeline'] else None),
  )


def predict_section(run: _Run, result: dict) -> None:
  """``jax_gad.predict`` throughput on files and single-image latency (``--predict_images``)."""
  cfg = run.cfg
  if not cfg.predict_images:
    return
  best = _best_float32(result)
  batch = best['batch_size'] if best is not None else max(cfg.batch_sizes)
  run.log(
    f'predict: {cfg.predict_images} PNG files of {cfg.host_image_side}px, batch {batch}, '
    f'then one image at batch 1 ...'
  )
  result['predict'] = measure.bench_predict(
    cfg.arch,
    run.image_size,
    batch,
    run.variables,
    n_images=cfg.predict_images,
    side=cfg.host_image_side,
    num_workers=run.num_workers,
    repeats=cfg.repeats,
    budget_s=cfg.time_budget_s,
    seed=cfg.seed,
  )
  run.log(
    f'  {result["predict"]["images_per_s"]:.2f} img/s, '
    f'{1000 * result["predict"]["latency_s"]:.1f} ms for one image'
  )
  result['peak_host_memory_mb_after']['predict'] = measure.peak_host_memory_mb()


def predict_maps_section(run: _Run, result: dict) -> None:
  """``jax_gad.predict`` with ``--maps_dir`` beside the plain rate (``--predict_images``)."""
  cfg = run.cfg
  if not cfg.predict_images:
    return
  best = _best_float32(result)
  batch = best['batch_size'] if best is not None else max(cfg.batch_sizes)
  run.log(f'predict --maps_dir: {cfg.predict_images} PNG files, batch {batch} ...')
  row = measure.bench_predict_maps(
    cfg.arch,
    run.image_size,
    batch,
    run.variables,
    n_images=cfg.predict_images,
    side=cfg.host_image_side,
    num_workers=run.num_workers,
    seed=cfg.seed,
  )
  result['predict_maps'] = row
  run.log(f'  {row["maps_images_per_s"]:.2f} img/s with maps, {row["images_per_s"]:.2f} without')


def predict_calls_section(run: _Run, result: dict) -> None:
  """Whole ``predict`` processes, empty then warm compile cache (``--predict_calls``)."""
  cfg = run.cfg
  if not cfg.predict_calls:
    return
  run.log(f'predict processes: 1 and {cfg.predict_calls} images, empty then warm compile cache')
  result['predict_calls'] = predict_calls.measure_predict_calls(
    cfg.arch,
    cfg.checkpoint_dir,
    n_images=cfg.predict_calls,
    repeats=cfg.repeats,
    image_size=cfg.image_size,
  )


def density_section(run: _Run, result: dict) -> None:
  """Fit times of every density model per level width (``--density_bench``)."""
  cfg = run.cfg
  if not cfg.density_bench:
    return
  settings = density_bench.Settings(
    widths=cfg.density_bench_widths or efficientnet.level_widths(cfg.arch),
    ns=cfg.density_bench_n,
    gmm_k=cfg.density_bench_gmm_k,
    gmm_iter=cfg.density_bench_gmm_iter,
    flow_epochs=cfg.density_bench_flow_epochs,
    use_sklearn=run.sklearn_why is None,
    vmap=cfg.density_bench_vmap,
    seed=cfg.seed,
  )
  run.log(f'densities: fit times at widths {tuple(settings.widths)}, N in {settings.ns} ...')
  before = measure.cpu_snapshot()
  result['densities'] = density_bench.bench_density_fits(settings, log=run.log)
  result['densities']['other_cpu'] = measure.other_cpu_fraction(before, measure.cpu_snapshot())
  result['peak_host_memory_mb_after']['densities'] = measure.peak_host_memory_mb()


def map_section(run: _Run, result: dict) -> None:
  """The per-location map fit: memory at ``--map_counts`` images and speed (``--map_fit``)."""
  if run.cfg.map_fit:
    result['maps'] = bench_maps.run_section(counts=run.cfg.map_counts, log=run.log)


SECTIONS = (
  extraction_section,
  torch_section,
  versus_section,
  engines_section,
  kernel_section,
  sweep_section,
  host_section,
  pipeline_section,
  pipelines_section,
  estimate_section,
  predict_section,
  predict_maps_section,
  predict_calls_section,
  density_section,
  map_section,
)


def run_benchmark(cfg: Config, log: Callable[[str], None] = print) -> dict:
  """Runs every enabled section of the benchmark once; returns the JSON-able result."""
  _check_config(cfg)
  start = time.perf_counter()
  run = _setup(cfg, log)
  result = _empty_result(cfg)
  for section in SECTIONS:
    section(run, result)
  result['machine']['load_average_end'] = measure.load_average()
  result['peak_host_memory_mb'] = measure.peak_host_memory_mb()
  result['wall_s'] = time.perf_counter() - start
  return result
