"""experiments/engine_profile.py: its categories, scaling, after-idle timing and a tiny run."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_gad.models import efficientnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'experiments', 'engine_profile.py')


@pytest.fixture(scope='module')
def ep():
  """The script as a module; the XLA_FLAGS it sets on import are put back afterwards."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))
    spec = importlib.util.spec_from_file_location('engine_profile', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert '--xla_cpu_enable_xprof_traceme=true' in os.environ['XLA_FLAGS']
  return module


HLO = """\
%fused_conv (p0: f32[1,8,8,3], p1: f32[3,3,3,8]) -> f32[1,4,4,8] {
  %p0 = f32[1,8,8,3]{3,2,1,0} parameter(0)
  ROOT %c = f32[1,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}
}

%fused_dot (p0: f32[16,8], p1: f32[8,4]) -> f32[16,4] {
  ROOT %d = f32[16,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}
}

%fused_reduce (p0: f32[1,4,4,8]) -> f32[1,8] {
  ROOT %r = f32[1,8]{1,0} reduce(%p0, %c0), dimensions={1,2}
}

%fused_loop (p0: f32[1,4,4,8]) -> f32[1,4,4,8] {
  ROOT %m = f32[1,4,4,8]{3,2,1,0} multiply(%p0, %p0)
}

ENTRY %main (images: f32[1,8,8,3]) -> f32[1,8] {
  %stem = f32[1,4,4,8]{3,2,1,0} fusion(%images, %k), kind=kCustom, calls=%fused_conv
  %expand = f32[16,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  %gate = f32[1,8]{1,0} fusion(%a, %variables__se_reduce__kernel), kind=kLoop, calls=%fused_loop
  %taps = f32[1,4,4,8]{3,2,1,0} fusion(%x, %b0__depthwise_conv__k), kind=kLoop, calls=%fused_loop
  %pool = f32[1,8]{1,0} fusion(%x), kind=kCustom, calls=%fused_reduce
  %act = f32[1,4,4,8]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_loop
  %joined = f32[1,4,4,16]{3,2,1,0} concatenate(%x, %x), dimensions={3}
  %padded = f32[1,6,6,8]{3,2,1,0} pad(%x, %zero), padding=0_0x1_1x1_1x0_0
  %squeeze = f32[1,2]{1,0} dot(%s, %w), lhs_contracting_dims={1}
  ROOT %tuple = (f32[1,8]) tuple(%pool)
}
"""


def test_every_thunk_kind_gets_its_category(ep):
  instructions, bodies = ep.hlo_instructions(HLO)
  assert bodies['fused_dot'].strip().startswith('ROOT %d')
  expected = {
    'stem': ep.STEM,
    'expand': ep.POINTWISE,
    'gate': ep.SQUEEZE,
    'taps': ep.DEPTHWISE,
    'pool': ep.SQUEEZE,
    'act': ep.ELEMENTWISE,
    'joined': ep.LAYOUT,
    'padded': ep.ELEMENTWISE,
    'squeeze': ep.SQUEEZE,
    'tuple': ep.OTHER,  # neither a fusion nor a known kind
    'no_such_thunk': ep.OTHER,
  }
  for name, category in expected.items():
    assert ep.jax_category(name, instructions, bodies) == category, name


def test_thunk_totals_count_xla_threads_only_and_skip_the_executor(ep):
  instructions, bodies = ep.hlo_instructions(HLO)
  event = types.SimpleNamespace
  line = lambda name, *events: types.SimpleNamespace(name=name, events=events)
  planes = [
    types.SimpleNamespace(
      lines=[
        line(
          'tf_XLAEigen/123', event(name='expand', duration_ns=5), event(name='taps', duration_ns=7)
        ),
        line('tf_XLAPjRtCpuClient/4', event(name='stem', duration_ns=3)),
        line('tf_XLAPjRtCpuClient/4', event(name='ThunkExecutor::Execute', duration_ns=100)),
        line('tf_XLAEigen/123', event(name='SlinkyThreadPool::Await', duration_ns=50)),
        line('python', event(name='expand', duration_ns=1000)),
      ]
    )
  ]
  totals = ep.thunk_totals(planes, instructions, bodies)
  assert totals == {ep.POINTWISE: 5, ep.DEPTHWISE: 7, ep.STEM: 3}


def test_a_real_compiled_network_has_its_main_categories(ep):
  module = efficientnet.create('efficientnet-b0', depthwise='shift')
  variables = efficientnet.init('efficientnet-b0', jax.random.key(0))
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  compiled = jax.jit(lambda v, x: module.apply(v, x, pool=True)).lower(variables, x).compile()
  instructions, bodies = ep.hlo_instructions(compiled.as_text())
  found = {ep.jax_category(name, instructions, bodies) for name in instructions}
  assert {ep.STEM, ep.POINTWISE, ep.DEPTHWISE, ep.SQUEEZE, ep.ELEMENTWISE} <= found


@pytest.mark.parametrize(
  'name, op, shapes, category',
  [
    ('/net/_swish/Clip_output_0_nchwc', 'Conv', [[1, 3, 64, 64], [32, 3, 3, 3]], 'stem'),
    ('/net/_blocks.1/_swish/Clip', 'Conv', [[1, 96, 8, 8], [96, 1, 3, 3]], 'depthwise'),
    ('/net/_blocks.1/_swish_1/Clip', 'FusedConv', [[1, 96, 8, 8], [24, 96, 1, 1]], 'pointwise'),
    ('/net/_blocks.1/Conv', 'Conv', [[1, 96, 1, 1], [24, 96, 1, 1]], 'squeeze'),
    ('/net/_blocks.2/_expand_conv/Conv', 'Convolution', [], 'pointwise'),  # no shapes: by name
    ('/net/_blocks.2/_depthwise_conv/Conv', 'GroupConvolution', [[1, 2]], 'depthwise'),
    ('/net/_conv_stem/Conv', 'Convolution', [], 'stem'),
    ('/net/_conv_head/Conv', 'Convolution', [], 'pointwise'),
    ('/net/_blocks.2/_se_reduce/Conv', 'Convolution', [], 'squeeze'),
    ('/net/_blocks.2/GlobalAveragePool', 'GlobalAveragePool', [], 'squeeze'),
    ('/net/ReduceMean_3', 'ReduceMean', [], 'squeeze'),
    ('/net/_blocks.2/Mul', 'Mul', [], 'squeeze'),
    ('/net/_blocks.2/_swish/Mul', 'Mul', [], 'elementwise'),
    ('/net/_blocks.2/Add', 'Add', [], 'elementwise'),
    ('/net/_blocks.2/_swish/Mul/QuickGeluFusion', 'QuickGelu', [], 'elementwise'),
    ('x_nchwc', 'ReorderInput', [], 'layout'),
    ('reorder_3', 'Reorder', [], 'layout'),
    ('level0', 'Result', [], 'other'),
  ],
)
def test_engine_nodes_get_their_category(ep, name, op, shapes, category):
  names = {
    'stem': ep.STEM,
    'depthwise': ep.DEPTHWISE,
    'pointwise': ep.POINTWISE,
    'squeeze': ep.SQUEEZE,
    'elementwise': ep.ELEMENTWISE,
    'layout': ep.LAYOUT,
    'other': ep.OTHER,
  }
  assert ep.node_category(name, op, shapes) == names[category]


def test_scaling_keeps_the_shares_and_sums_to_the_unprofiled_time(ep):
  traced = dict.fromkeys(ep.CATEGORIES, 0.0)
  traced[ep.POINTWISE], traced[ep.DEPTHWISE] = 30.0, 10.0
  out = ep.scaled(20.0, traced)
  assert out[ep.POINTWISE] == pytest.approx(15.0) and out[ep.DEPTHWISE] == pytest.approx(5.0)
  assert sum(out.values()) == pytest.approx(20.0)
  assert set(ep.scaled(20.0, dict.fromkeys(ep.CATEGORIES, 0.0)).values()) == {0.0}
  text = ep.table({'a': (20.0, traced), 'b': (8.0, {**traced, ep.STEM: 40.0})})
  assert f'| {ep.STEM} | 0.0 | 4.0 |' in text
  assert ep.OTHER not in text  # an all-zero row is left out
  assert '| **unprofiled, per image** | **20.0** | **8.0** |' in text


def test_after_idle_times_every_engine_after_every_pause(ep):
  calls = {'a': 0, 'b': 0}

  def step(name):
    def run():
      calls[name] += 1

    return run

  result = ep.after_idle({n: step(n) for n in calls}, (0.001, 0.002), repeats=3)
  assert set(result) == {'a', 'b'}
  for row in result.values():
    assert list(row) == [0.0, 0.001, 0.002] and all(v >= 0 for v in row.values())
  assert calls == {'a': 2 * 3 * 3, 'b': 2 * 3 * 3}  # each trial: one call back to back, one timed
  text = ep.idle_table({'a': {0.0: 10.0, 0.2: 12.5}, 'b': {0.0: 8.0, 0.2: 8.25}})
  assert text.splitlines() == [
    '| engine | back to back | after 0.2 s idle |',
    '|---|---|---|',
    '| a | 10.0 | 12.5 |',
    '| b | 8.0 | 8.2 |',
  ]


def _run(*args, timeout=600):
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=timeout,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
  )


@pytest.mark.parametrize(
  'args, message',
  [
    (['--steps=0'], '--steps must be >= 1, got 0'),
    (['--batch_size=0'], '--batch_size must be >= 1, got 0'),
    (['--image_size=-1'], '--image_size must be >= 0'),
    (['--arch=resnet'], '--arch must be one of'),
    (['--after_idle=soon'], '--after_idle must be comma-separated seconds'),
    (['--after_idle=0'], '--after_idle pauses must lie in (0, 60]'),
  ],
)
def test_bad_arguments_are_refused_before_work(args, message):
  proc = _run(*args, timeout=120)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_tiny_profile_of_the_three_engines(tmp_path):
  for name in ('torch', 'onnx', 'onnxruntime', 'openvino', 'efficientnet_lite_pytorch'):
    pytest.importorskip(name)
  out = tmp_path / 'profile.json'
  proc = _run('--arch=efficientnet-lite0', '--image_size=48', '--steps=1', f'--json={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record['image_size'] == 48 and record['batch_size'] == 1
  for name in ('jax_gad', 'onnxruntime', 'openvino'):
    engine = record['engines'][name]
    assert engine['unprofiled_ms'] > 0 and sum(engine['traced_ms'].values()) > 0
    assert sum(engine['scaled_ms'].values()) == pytest.approx(engine['unprofiled_ms'])
    assert engine['traced_ms']['1x1 convolutions (expand, project, head)'] > 0
  unprofiled = record['engines']['jax_gad']['unprofiled_ms']
  assert f'**{unprofiled:.1f}**' in proc.stdout
  assert np.isfinite(record['engines']['openvino']['unprofiled_ms'])
