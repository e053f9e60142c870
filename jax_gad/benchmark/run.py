"""Benchmark settings and the driver that runs every enabled measurement once."""

from __future__ import annotations

import os
import time
from typing import Callable, NamedTuple

import jax

from jax_gad import features
from jax_gad.benchmark import measure
from jax_gad.benchmark.estimate import estimate_protocol
from jax_gad.models import efficientnet

SCHEMA = 'jax_gad.benchmark/1'


class Config(NamedTuple):
  """Benchmark settings (the command-line flags)."""

  arch: str = 'efficientnet-b4'
  image_size: int | None = None  # None: native resolution of arch
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
  pipeline_archs: tuple[str, ...] = ()  # more archs for the pipeline run, each per batch size
  versus_rounds: int = 0  # >0: jax_gad vs torch float32, alternating, this many rounds
  num_workers: int | None = None  # None: os.cpu_count()
  feature_diff: bool = False
  feature_diff_arch: str = 'efficientnet-lite0'
  feature_diff_n_train: int = 60
  feature_diff_n_test: int = 50
  checkpoint_dir: str = 'checkpoints'
  seed: int = 0
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
  if cfg.arch not in efficientnet.ARCHS:
    raise ValueError(f'arch must be one of {sorted(efficientnet.ARCHS)}, got {cfg.arch!r}')
  if cfg.image_size is not None and cfg.image_size < 16:
    raise ValueError(f'image_size must be >= 16 (or None: native), got {cfg.image_size}')
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
    'feature_diff_n_test',
    'density_bench_gmm_k',
    'density_bench_gmm_iter',
    'density_bench_flow_epochs',
  ):
    if getattr(cfg, name) < 1:
      raise ValueError(f'{name} must be >= 1, got {getattr(cfg, name)}')
  for name in ('kernel_n_fit', 'feature_diff_n_train'):
    if getattr(cfg, name) < 5:
      raise ValueError(f'{name} must be >= 5 (5 folds, 2 rows per fit), got {getattr(cfg, name)}')
  if cfg.num_workers is not None and cfg.num_workers < 1:
    raise ValueError(f'num_workers must be >= 1, got {cfg.num_workers}')
  if cfg.predict_images < 0:
    raise ValueError(f'predict_images must be >= 0, got {cfg.predict_images}')
  if cfg.pipeline_images < 0:
    raise ValueError(f'pipeline_images must be >= 0, got {cfg.pipeline_images}')
  for arch in cfg.pipeline_archs:
    if arch not in efficientnet.ARCHS:
      raise ValueError(f'pipeline_archs must be among {sorted(efficientnet.ARCHS)}, got {arch!r}')
  if cfg.versus_rounds < 0:
    raise ValueError(f'versus_rounds must be >= 0, got {cfg.versus_rounds}')
  if cfg.torch_threads < 0:
    raise ValueError(f'torch_threads must be >= 0 (0: cpu count), got {cfg.torch_threads}')


def run_benchmark(cfg: Config, log: Callable[[str], None] = print) -> dict:
  """Runs every enabled part of the benchmark; returns the JSON-able result."""
  _check_config(cfg)
  start = time.perf_counter()
  image_size = cfg.image_size or efficientnet.native_resolution(cfg.arch)
  num_workers = cfg.num_workers or os.cpu_count() or 2
  depthwise = [
    efficientnet.default_depthwise(jax.default_backend()) if d == 'default' else d
    for d in cfg.depthwise_impls
  ]
  depthwise = list(dict.fromkeys(depthwise))
  mesh = features.make_mesh()
  result = {
    'schema': SCHEMA,
    'machine': measure.machine_info(),
    'config': cfg._asdict(),
    'extraction': [],
    'torch': [],
    'torch_skipped': None,
    'kernel': None,
    'kernel_skipped': None,
    'sweep_d': [],
    'sweep_n': [],
    'host_preprocess_s_per_image': None,
    'estimate': None,
    'feature_diff': None,
    'peak_host_memory_mb_after': {},
    'sweeps_other_cpu': None,
    'pipeline': None,
    'predict': None,
    'predict_maps': None,
    'maps': None,
    'pipelines': [],
    'versus': None,
    'densities': None,
  }
  phases = result['peak_host_memory_mb_after']

  # Feature extraction.
  variables = efficientnet.init(cfg.arch, jax.random.key(cfg.seed))
  for batch in cfg.batch_sizes:
    for dtype in cfg.dtypes:
      for impl in depthwise:
        log(
          f'extraction: {cfg.arch} {image_size}px batch {batch} {dtype} {impl} '
          f'on {mesh.size} device(s) ...'
        )
        row = measure.bench_extraction(
          cfg.arch,
          image_size,
          batch,
          dtype,
          impl,
          cfg.num_batches,
          variables,
          mesh=mesh,
          seed=cfg.seed,
        )
        log(f'  compile {row["compile_s"]:.1f} s, {row["images_per_s"]:.2f} img/s')
        result['extraction'].append(row)
  phases['extraction'] = measure.peak_host_memory_mb()

  # torch reference.
  why = None
  if cfg.torch_reference == 'off':
    why = 'disabled (--torch_reference=off)'
  elif efficientnet.ARCHS[cfg.arch].family != 'b':
    why = f'efficientnet_pytorch has no {cfg.arch}'
  else:
    why = measure.torch_available()
    if why is not None and cfg.torch_reference == 'on':
      raise ValueError(f'--torch_reference=on but {why}')
  if why is None:
    threads = cfg.torch_threads or os.cpu_count() or 1
    for batch in sorted({r['batch_size'] for r in result['extraction']}):
      log(
        f'torch: efficientnet_pytorch {cfg.arch} {image_size}px batch {batch}, '
        f'{threads} thread(s) ...'
      )
      trow = measure.bench_torch(cfg.arch, image_size, batch, cfg.num_batches, threads, cfg.seed)
      log(f'  {trow["images_per_s"]:.2f} img/s')
      result['torch'].append(trow)
    by_batch = {r['batch_size']: r for r in result['torch']}
    for row in result['extraction']:
      trow = by_batch.get(row['batch_size'])
      if trow is not None:
        row['torch_images_per_s'] = trow['images_per_s']
        row['speedup_vs_torch'] = measure.ratio(row['images_per_s'], trow['images_per_s'])
    if cfg.versus_rounds:
      log(
        f'versus: jax_gad ({depthwise[0]}) and efficientnet_pytorch float32, batches '
        f'{tuple(cfg.batch_sizes)}, {cfg.versus_rounds} alternating rounds ...'
      )
      result['versus'] = measure.bench_versus_torch(
        cfg.arch,
        image_size,
        cfg.batch_sizes,
        depthwise[0],
        variables,
        rounds=cfg.versus_rounds,
        threads=threads,
        mesh=mesh,
        seed=cfg.seed,
      )
      for r in result['versus']['rows']:
        log(
          f'  batch {r["batch_size"]}: {r["images_per_s"]:.2f} vs '
          f'{r["torch_images_per_s"]:.2f} img/s, {r["speedup_vs_torch"]:.2f}x'
        )
    phases['torch'] = measure.peak_host_memory_mb()
  result['torch_skipped'] = why

  # Kernels and sweeps.
  sk_why = None if cfg.sklearn != 'off' else 'disabled (--sklearn=off)'
  if sk_why is None:
    sk_why = measure.sklearn_available()
    if sk_why is not None and cfg.sklearn == 'on':
      raise ValueError(f'--sklearn=on but {sk_why}')
  use_sklearn = sk_why is None
  result['sklearn_skipped'] = sk_why
  if cfg.kernel:
    widths = cfg.kernel_widths or efficientnet.level_widths(cfg.arch)
    log(
      f'kernels: fit N={cfg.kernel_n_fit}, score {cfg.kernel_n_score} rows at '
      f'widths {tuple(widths)} ...'
    )
    result['kernel'] = measure.bench_kernels(
      widths,
      cfg.kernel_n_fit,
      cfg.kernel_n_score,
      repeats=cfg.repeats,
      budget_s=cfg.time_budget_s,
      use_sklearn=use_sklearn,
      seed=cfg.seed,
    )
    phases['kernel'] = measure.peak_host_memory_mb()
  else:
    result['kernel_skipped'] = 'disabled (--nokernel)'
  before = measure.cpu_snapshot()
  for d in cfg.sweep_d:
    log(f'sweep D: N={cfg.sweep_d_n} D={d} ...')
    result['sweep_d'].append(
      measure.bench_fit(
        cfg.sweep_d_n,
        d,
        repeats=cfg.repeats,
        budget_s=cfg.time_budget_s,
        use_sklearn=use_sklearn,
        seed=cfg.seed,
      )
    )
  for n in cfg.sweep_n:
    log(f'sweep N: N={n} D={cfg.sweep_n_d} ...')
    result['sweep_n'].append(
      measure.bench_fit(
        n,
        cfg.sweep_n_d,
        repeats=cfg.repeats,
        budget_s=cfg.time_budget_s,
        use_sklearn=use_sklearn,
        seed=cfg.seed,
      )
    )
  if cfg.sweep_d or cfg.sweep_n:
    phases['sweeps'] = measure.peak_host_memory_mb()
    result['sweeps_other_cpu'] = measure.other_cpu_fraction(before, measure.cpu_snapshot())

  # End-to-end estimate.
  if cfg.estimate:
    spec = efficientnet.ARCHS[cfg.arch]
    log(f'host: decode a {cfg.host_image_side}px PNG + resize to {image_size} ...')
    result['host_preprocess_s_per_image'] = measure.bench_host_preprocess(
      cfg.host_image_side, image_size, spec.mean, spec.std, seed=cfg.seed
    )
  f32 = [r for r in result['extraction'] if r['dtype'] == 'float32']
  best = max(f32, key=lambda r: r['images_per_s']) if f32 else None
  if cfg.pipeline_images and best is not None:
    log(
      f'pipeline: {cfg.pipeline_images} PNGs of {cfg.host_image_side}px decoded by '
      f'{num_workers} thread(s) while batch {best["batch_size"]} float32 '
      f'{best["depthwise"]} runs ...'
    )
    result['pipeline'] = measure.bench_pipeline(
      cfg.arch,
      image_size,
      best['batch_size'],
      'float32',
      best['depthwise'],
      variables,
      n_images=cfg.pipeline_images,
      side=cfg.host_image_side,
      num_workers=num_workers,
      mesh=mesh,
      seed=cfg.seed,
    )
    result['pipeline']['device_only_images_per_s'] = best['images_per_s']
    log(f'  {result["pipeline"]["images_per_s"]:.2f} img/s end to end')
  if cfg.pipeline_images:
    for arch in cfg.pipeline_archs:
      size = cfg.image_size or efficientnet.native_resolution(arch)
      arch_vars = variables if arch == cfg.arch else efficientnet.init(arch, jax.random.key(0))
      for batch in cfg.batch_sizes:
        log(
          f'pipeline: {arch} {size}px batch {batch} float32 {depthwise[0]}, '
          f'{cfg.pipeline_images} PNGs ...'
        )
        row = measure.bench_pipeline(
          arch,
          size,
          batch,
          'float32',
          depthwise[0],
          arch_vars,
          n_images=cfg.pipeline_images,
          side=cfg.host_image_side,
          num_workers=num_workers,
          mesh=mesh,
          seed=cfg.seed,
        )
        log(f'  {row["images_per_s"]:.2f} img/s end to end')
        result['pipelines'].append(row)
  if cfg.estimate and best is not None and result['kernel'] is not None:
    result['estimate'] = estimate_protocol(
      images_per_s=best['images_per_s'],
      compile_s=best['compile_s'],
      kernel=result['kernel'],
      host_s_per_image=result['host_preprocess_s_per_image'],
      extraction_row=best,
      pipeline_images_per_s=(result['pipeline']['images_per_s'] if result['pipeline'] else None),
    )

  if cfg.predict_images:
    batch = best['batch_size'] if best is not None else max(cfg.batch_sizes)
    log(
      f'predict: {cfg.predict_images} PNG files of {cfg.host_image_side}px, batch {batch}, '
      f'then one image at batch 1 ...'
    )
    result['predict'] = measure.bench_predict(
      cfg.arch,
      image_size,
      batch,
      variables,
      n_images=cfg.predict_images,
      side=cfg.host_image_side,
      num_workers=num_workers,
      repeats=cfg.repeats,
      budget_s=cfg.time_budget_s,
      seed=cfg.seed,
    )
    log(
      f'  {result["predict"]["images_per_s"]:.2f} img/s, '
      f'{1000 * result["predict"]["latency_s"]:.1f} ms for one image'
    )
    phases['predict'] = measure.peak_host_memory_mb()
    result['predict_maps'] = _predict_maps(cfg, image_size, batch, variables, num_workers, log)

  if cfg.density_bench:
    from jax_gad.benchmark import densities as density_bench

    widths = cfg.density_bench_widths or efficientnet.level_widths(cfg.arch)
    log(f'densities: fit times at widths {tuple(widths)}, N in {cfg.density_bench_n} ...')
    before = measure.cpu_snapshot()
    result['densities'] = density_bench.bench_density_fits(
      widths,
      cfg.density_bench_n,
      gmm_k=cfg.density_bench_gmm_k,
      gmm_iter=cfg.density_bench_gmm_iter,
      flow_epochs=cfg.density_bench_flow_epochs,
      use_sklearn=use_sklearn,
      vmap=cfg.density_bench_vmap,
      seed=cfg.seed,
      log=log,
    )
    result['densities']['other_cpu'] = measure.other_cpu_fraction(before, measure.cpu_snapshot())
    phases['densities'] = measure.peak_host_memory_mb()

  if cfg.feature_diff:
    log(f'feature_diff: {cfg.feature_diff_arch} bfloat16 vs float32 on synthetic_ad ...')
    result['feature_diff'] = measure.feature_difference(
      cfg.feature_diff_arch,
      cfg.checkpoint_dir,
      n_train=cfg.feature_diff_n_train,
      n_test=cfg.feature_diff_n_test,
      batch_size=max(cfg.batch_sizes),
    )
    phases['feature_diff'] = measure.peak_host_memory_mb()

  if cfg.map_fit:
    from jax_gad.benchmark import maps as bench_maps

    result['maps'] = bench_maps.run_section(counts=cfg.map_counts, log=log)

  result['machine']['load_average_end'] = measure.load_average()
  result['peak_host_memory_mb'] = measure.peak_host_memory_mb()
  result['wall_s'] = time.perf_counter() - start
  return result


def _predict_maps(cfg, image_size: int, batch: int, variables, num_workers: int, log) -> dict:
  """The predict throughput with --maps_dir beside the plain rate (same files and batch)."""
  log(f'predict --maps_dir: {cfg.predict_images} PNG files, batch {batch} ...')
  row = measure.bench_predict_maps(
    cfg.arch,
    image_size,
    batch,
    variables,
    n_images=cfg.predict_images,
    side=cfg.host_image_side,
    num_workers=num_workers,
    seed=cfg.seed,
  )
  log(f'  {row["maps_images_per_s"]:.2f} img/s with maps, {row["images_per_s"]:.2f} without')
  return row
