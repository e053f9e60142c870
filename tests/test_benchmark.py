"""Tests for jax_gad.benchmark: tiny CLI run, JSON fields, estimate, references."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jax_gad import benchmark
from jax_gad.benchmark import measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
  '--arch=efficientnet-b0',
  '--image_size=32',
  '--batch_sizes=3',
  '--dtypes=float32',
  '--depthwise_impls=shift,xla',
  '--num_batches=2',
  '--torch_threads=1',
  '--kernel_n_fit=12',
  '--kernel_n_score=6',
  '--kernel_widths=8,24,16',
  '--repeats=1',
  '--sweep_d=8,16',
  '--sweep_d_n=10',
  '--sweep_n=10,30',
  '--sweep_n_d=6',
  '--host_image_side=48',
  '--pipeline_images=7',
  '--pipeline_archs=efficientnet-lite0',
  '--versus_rounds=2',
  '--num_workers=2',
]

EXTRACTION_FIELDS = {
  'arch',
  'image_size',
  'batch_size',
  'dtype',
  'depthwise',
  'device_count',
  'compile_s',
  'step_s',
  'step_s_all',
  'images_per_s',
  'num_batches',
  'compiled_memory',
  'device_peak_bytes',
  'other_cpu',
  'torch_images_per_s',
  'speedup_vs_torch',
}
KERNEL_ROW_FIELDS = {
  'level',
  'width',
  'n',
  'd',
  'jax_compile_s',
  'jax_fit_s',
  'jax_score_s',
  'jax_score_total_s',
  'sklearn_fit_s',
  'numpy_score_total_s',
  'fit_speedup',
  'score_speedup',
}
SWEEP_FIELDS = {'n', 'd', 'jax_compile_s', 'jax_fit_s', 'sklearn_fit_s', 'fit_speedup'}
ESTIMATE_FIELDS = {
  'dataset',
  'categories',
  'folds',
  'levels',
  'distances',
  'images',
  'fits',
  'scorings',
  'images_per_s',
  'pipeline_images_per_s',
  'extraction_row',
  'compile_s',
  'extraction_s',
  'host_preprocess_s',
  'fit_s',
  'score_s',
  'total_s',
  'total_min',
  'assumptions',
}


def _positive(x):
  return isinstance(x, (int, float)) and np.isfinite(x) and x > 0


def test_import_does_not_import_torch_or_sklearn():
  code = (
    'import sys, jax_gad.benchmark; '
    'bad = [m for m in ("torch", "sklearn", "tensorflow", "efficientnet_pytorch", "onnx", '
    '"onnxruntime", "openvino") '
    'if m in sys.modules]; assert not bad, bad'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=REPO),
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_tiny_configuration_writes_documented_json(tmp_path):
  out = tmp_path / 'sub' / 'bench.json'
  proc = subprocess.run(
    [sys.executable, '-m', 'jax_gad.benchmark', *TINY, f'--json={out}'],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert not [p for p in os.listdir(out.parent) if p != 'bench.json']  # no temp left

  assert result['schema'] == benchmark.SCHEMA
  assert result['machine']['cpu_count'] == os.cpu_count()
  assert result['machine']['device_count'] == jax.device_count()
  assert len(result['machine']['load_average_start']) == 3
  assert len(result['machine']['load_average_end']) == 3
  commit = result['machine']['git_commit']
  assert commit is None or len(commit) == 40
  assert result['config']['batch_sizes'] == [3]

  rows = result['extraction']
  assert [r['depthwise'] for r in rows] == ['shift', 'xla']
  for r in rows:
    assert set(r) == EXTRACTION_FIELDS
    assert r['batch_size'] % r['device_count'] == 0 and r['batch_size'] >= 3
    assert _positive(r['compile_s']) and _positive(r['step_s'])
    assert len(r['step_s_all']) == 2
    assert r['other_cpu'] is None or 0 <= r['other_cpu'] <= 1
  if measure.torch_available() is None:
    assert result['torch_skipped'] is None
    (t,) = result['torch']
    assert t['threads'] == 1 and _positive(t['images_per_s'])
    assert t['other_cpu'] is None or 0 <= t['other_cpu'] <= 1
    assert all(_positive(r['speedup_vs_torch']) for r in rows)
  else:
    assert result['torch'] == [] and result['torch_skipped']

  kernel = result['kernel']
  assert kernel['n_fit'] == 12 and kernel['n_score'] == 6
  assert [r['width'] for r in kernel['levels']] == [8, 24, 16]
  for r in kernel['levels']:
    assert set(r) == KERNEL_ROW_FIELDS
    assert set(r['jax_score_s']) == {'l2', 'sed', 'mahalanobis'}
    assert _positive(r['jax_fit_s']) and _positive(r['sklearn_fit_s'])

  assert [(r['n'], r['d']) for r in result['sweep_d']] == [(10, 8), (10, 16)]
  assert [(r['n'], r['d']) for r in result['sweep_n']] == [(10, 6), (30, 6)]
  for r in result['sweep_d'] + result['sweep_n']:
    assert set(r) == SWEEP_FIELDS

  est = result['estimate']
  assert set(est) == ESTIMATE_FIELDS
  assert est['extraction_row']['dtype'] == 'float32'
  assert _positive(result['host_preprocess_s_per_image'])
  pipe = result['pipeline']
  assert pipe['n_images'] == 7 and pipe['side'] == 48 and pipe['dtype'] == 'float32'
  assert est['pipeline_images_per_s'] == pipe['images_per_s']
  (lite,) = result['pipelines']
  assert lite['arch'] == 'efficientnet-lite0' and lite['image_size'] == 32
  assert lite['n_images'] == 7 and lite['batch_size'] >= 3 and _positive(lite['images_per_s'])
  assert '| efficientnet-lite0 | 32 |' in proc.stdout
  versus = result['versus']
  if measure.torch_available() is None:
    assert versus['rounds'] == 2 and versus['threads'] == 1 and versus['depthwise'] == 'shift'
    (v,) = versus['rows']
    assert v['batch_size'] == rows[0]['batch_size']
    assert len(v['step_s_all']) == len(v['torch_step_s_all']) == 2
    # Each turn's untimed first batch is recorded apart from the timed one.
    assert len(v['first_step_s_all']) == len(v['torch_first_step_s_all']) == 2
    assert v['first_call_images_per_s'] == pytest.approx(
      v['batch_size'] / np.median(v['first_step_s_all'])
    )
    # The ratio is the median of per-round ratios of the recorded step times.
    per_round = [t / j for j, t in zip(v['step_s_all'], v['torch_step_s_all'])]
    assert v['speedup_vs_torch'] == pytest.approx(float(np.median(per_round)))
    assert v['images_per_s'] == pytest.approx(v['batch_size'] / np.median(v['step_s_all']))
    assert f'{v["speedup_vs_torch"]:.2f}x' in proc.stdout
  else:
    assert versus is None
  assert est['host_preprocess_s'] == 0.0
  assert 'feature_diff' not in result and 'feature_diff' not in result['config']
  assert result['peak_host_memory_mb'] >= result['peak_host_memory_mb_after']['extraction'] > 0
  assert _positive(result['wall_s'])

  # The estimate uses the measured pipeline rate; the stdout table carries the same numbers.
  assert '| jax_gad (Flax) | 3 | float32 | shift |' in proc.stdout
  assert f'{rows[0]["images_per_s"]:.2f}' in proc.stdout
  assert 'Full MVTec AD protocol estimate' in proc.stdout
  assert benchmark.format_report(result).splitlines()[2] in proc.stdout


@pytest.mark.parametrize(
  'args, message',
  [
    (['--dtypes=float16'], '--dtypes'),
    (['--batch_sizes=8,8'], 'more than once'),
    (['--nonsense=1'], 'nonsense'),
    (['--depthwise_impls=fast'], 'fast'),
    (['--num_processes=2'], 'go together'),
    (['--engines_rounds=1', '--engines_archs=resnet'], "--engines_archs must be among"),
  ],
)
def test_cli_rejects_bad_flags(args, message):
  proc = subprocess.run(
    [sys.executable, '-m', 'jax_gad.benchmark', *args, '--nokernel'],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_other_cpu_fraction_counts_other_processes():
  before = measure.cpu_snapshot()
  assert measure.other_cpu_fraction(before, before) is None  # too short
  proc = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
  try:
    time.sleep(0.3)
    before = measure.cpu_snapshot()
    time.sleep(1.5)
    busy = measure.other_cpu_fraction(before, measure.cpu_snapshot())
  finally:
    proc.kill()
    proc.wait()
  if not os.path.exists('/proc/stat'):
    assert busy is None
    return
  # The spinning process alone keeps about one core of os.cpu_count() busy
  # (at least a share of it when other processes compete).
  assert 0.4 / os.cpu_count() <= busy <= 1.0


def test_numpy_reference_scores_match_jax_gaussian():
  from jax_gad import gaussian

  rng = np.random.default_rng(0)
  x = measure._features(rng, 40, 12)
  x[:, 3] = 2.0  # a dead channel, as in ReLU6 Lite models
  xs = measure._features(rng, 7, 12)
  ref = measure._numpy_scores(measure._sklearn_fit(x), xs)
  state = gaussian.fit_gaussian(x)
  for name, want in zip(('l2', 'sed', 'mahalanobis'), ref):
    np.testing.assert_allclose(
      np.asarray(gaussian.score(state, xs, name)), want, rtol=2e-4, err_msg=name
    )


def test_config_validation():
  with pytest.raises(ValueError, match='arch'):
    benchmark.run_benchmark(benchmark.Config(arch='resnet'))
  with pytest.raises(ValueError, match='batch_sizes'):
    benchmark.run_benchmark(benchmark.Config(batch_sizes=(0,)))
  with pytest.raises(ValueError, match='kernel_n_fit'):
    benchmark.run_benchmark(benchmark.Config(kernel_n_fit=2))
  with pytest.raises(ValueError, match='torch_reference'):
    benchmark.run_benchmark(benchmark.Config(torch_reference='yes'))
  with pytest.raises(ValueError, match='pipeline_archs'):
    benchmark.run_benchmark(benchmark.Config(pipeline_archs=('resnet',)))
  with pytest.raises(ValueError, match='versus_rounds'):
    benchmark.run_benchmark(benchmark.Config(versus_rounds=-1))


def test_density_fit_times_section():
  from jax_gad.benchmark import densities as density_bench

  settings = density_bench.Settings(
    widths=(3, 5), ns=(12,), gmm_k=2, gmm_iter=2, flow_epochs=1, use_sklearn=True, vmap=True
  )
  result = density_bench.bench_density_fits(settings)
  rows = result['rows']
  assert [(r['width'], r['density']) for r in rows] == [
    (w, d) for w in (3, 5) for d in ('gaussian', 'gmm', 'flow')
  ]
  for r in rows:
    assert 'error' not in r, r
    assert r['n'] == 12 and _positive(r['fit_s']) and r['compile_s'] >= 0
    if r['density'] == 'gmm':
      assert _positive(r['sklearn_fit_s']) and _positive(r['speedup_vs_sklearn'])
      assert r['per_iter_s'] == pytest.approx(r['fit_s'] / 2)
    if r['density'] == 'flow':
      assert r['epochs'] == 1
  (v,) = result['flow_vmap']
  assert v['widths'] == [3, 5] and _positive(v['vmap_fit_s']) and _positive(v['loop_fit_s'])
  text = density_bench.format_rows(result)
  assert '| 12 | 5 | gmm |' in text and 'one vmapped program' in text
  assert result['settings']['widths'] == [3, 5] and result['settings']['flow_config']['epochs'] == 1
  section = benchmark.report.format_densities({'densities': dict(result, other_cpu=None)})
  assert (
    section.startswith('Density fits per level width (GMM: k=2, 2 EM iterations')
    and text in section
  )
  assert benchmark.report.format_densities({'densities': None}) is None


def test_optional_comparisons_skip_or_refuse_as_asked():
  from jax_gad.benchmark import run

  assert run._skip_reason('off', 'sklearn', None) == 'disabled (--sklearn=off)'
  assert run._skip_reason('off', 'sklearn', 'sklearn not importable') == 'disabled (--sklearn=off)'
  assert run._skip_reason('auto', 'sklearn', 'sklearn not importable') == 'sklearn not importable'
  assert run._skip_reason('on', 'sklearn', None) is None
  with pytest.raises(ValueError, match='--torch_reference=on but torch not importable'):
    run._skip_reason('on', 'torch_reference', 'torch not importable')
  # efficientnet_pytorch has no Lite models: the reference is skipped, even when asked for.
  setup = run._setup(benchmark.Config(arch='efficientnet-lite0', torch_reference='on'), print)
  assert setup.torch_why == 'efficientnet_pytorch has no efficientnet-lite0'
  setup = run._setup(benchmark.Config(arch='efficientnet-b0', torch_reference='off'), print)
  assert setup.torch_why == 'disabled (--torch_reference=off)'
