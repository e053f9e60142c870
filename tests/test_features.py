"""Tests for jax_gad.features: sharded extraction, padding, multi-host, cache."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import fakes
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_gad import feature_cache, features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TinyNet(nn.Module):
  """Three 'levels' at decreasing resolution, with BatchNorm like the real one."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    a = nn.Conv(4, (3, 3), dtype=self.dtype)(x)
    a = nn.swish(nn.BatchNorm(use_running_average=True, dtype=self.dtype)(a))
    b = nn.Conv(6, (3, 3), strides=2, dtype=self.dtype)(a)
    b = nn.relu6(b)
    c = nn.Conv(5, (1, 1), dtype=self.dtype)(b[:, ::2, ::2])
    return a, b, c


def tiny_variables(seed=0):
  variables = TinyNet().init(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)))
  # Non-trivial running statistics so BatchNorm is exercised.
  stats = variables['batch_stats']['BatchNorm_0']
  stats = {'mean': stats['mean'] + 0.1, 'var': stats['var'] * 2.0}
  return {'params': variables['params'], 'batch_stats': {'BatchNorm_0': stats}}


def random_variables(arch, seed=0):
  """Random EfficientNet variables with non-trivial BatchNorm statistics."""
  from jax_gad.models import efficientnet

  return efficientnet.init(arch, jax.random.key(seed))


def assert_close_relative(got, want, rtol=1e-5):
  """Elementwise rtol, with atol scaled to the array's magnitude."""
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def simple_preprocess(image, size, mean, std):
  """Nearest-neighbour resize + normalise; independent of jax_gad.data."""
  h, w = image.shape[:2]
  rows = (np.arange(size) * h) // size
  cols = (np.arange(size) * w) // size
  x = image[rows][:, cols].astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def make_source(n, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {'image': rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8), 'label': i % 2}
    for i in range(n)
  ]


def reference_features(source, variables, levels=(0, 1, 2)):
  """Whole set in one apply call, pooled in numpy float64."""
  x = np.stack([simple_preprocess(s['image'], SIZE, MEAN, STD) for s in source])
  maps = TinyNet().apply(variables, jnp.asarray(x))
  return [np.asarray(maps[l], np.float64).mean(axis=(1, 2)) for l in levels]


def _extract(source, variables, **kwargs):
  kwargs.setdefault('batch_size', 4)
  kwargs.setdefault('levels', (0, 1, 2))
  return fakes.extract_features(
    TinyNet(),
    variables,
    source,
    image_size=SIZE,
    mean=MEAN,
    std=STD,
    progress=False,
    preprocess=simple_preprocess,
    **kwargs,
  )


# ---------------------------------------------------------------------------
# mesh / extractor
# ---------------------------------------------------------------------------


def test_make_mesh_defaults_and_validation():
  mesh = features.make_mesh()
  assert mesh.axis_names == ('batch',)
  assert mesh.size == jax.device_count()
  mesh = features.make_mesh(jax.devices()[:1], axis_name='data')
  assert mesh.axis_names == ('data',) and mesh.size == 1
  with pytest.raises(ValueError, match='devices'):
    features.make_mesh([])
  with pytest.raises(ValueError, match='axis_name'):
    features.make_mesh(axis_name='')


def test_initialize_distributed_validates_arguments():
  with pytest.raises(ValueError, match='coordinator_address'):
    features.initialize_distributed('localhost', 2, 0)
  with pytest.raises(ValueError, match='num_processes'):
    features.initialize_distributed('localhost:1234', 0, 0)
  with pytest.raises(ValueError, match='process_id'):
    features.initialize_distributed('localhost:1234', 2, 2)


def test_features_match_whole_set_reference_with_partial_batch():
  source = make_source(7)
  variables = tiny_variables()
  got = _extract(source, variables)
  want = reference_features(source, variables)
  assert [g.shape for g in got] == [(7, 4), (7, 6), (7, 5)]
  for g, w in zip(got, want):
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_level_subset_and_order():
  source = make_source(5)
  variables = tiny_variables()
  got = _extract(source, variables, levels=(2, 0))
  want = reference_features(source, variables, levels=(2, 0))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_padding_compiles_once_for_every_size():
  # A configuration (levels, batch) no other test uses, so JAX's compile cache
  # holds nothing for it yet.
  levels, batch = (2, 0, 1), 5
  variables = tiny_variables()
  extractor = features.LevelExtractor(
    TinyNet(), variables, image_size=SIZE, batch_size=batch, levels=levels
  )
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if 'compile' in event:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    outs = {}
    for n in (7, 3, 5, 1, 11):
      outs[n] = fakes.pooled(
        extractor,
        make_source(n, seed=n),
        mean=MEAN,
        std=STD,
        progress=False,
        preprocess=simple_preprocess,
      )
    # A second extractor for the same configuration reuses the executable.
    again = fakes.extract_features(
      TinyNet(),
      variables,
      make_source(7, seed=7),
      image_size=SIZE,
      mean=MEAN,
      std=STD,
      batch_size=batch,
      levels=levels,
      progress=False,
      preprocess=simple_preprocess,
    )
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  backend = [e for e in compiles if 'backend_compile' in e]
  assert len(backend) == 1, compiles
  for n, got in outs.items():
    want = reference_features(make_source(n, seed=n), variables, levels=levels)
    for g, w in zip(got, want):
      assert g.shape[0] == n
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  for g, w in zip(again, outs[7]):
    np.testing.assert_array_equal(g, w)
  # The compiled executable only accepts its one shape.
  with pytest.raises(ValueError, match='pad the last batch'):
    extractor(np.zeros((3, SIZE, SIZE, 3), np.float32))


def test_progress_rate_leaves_out_the_slow_first_batch(capsys):
  # The first batch arrives after a pause (standing in for the first run of the
  # program and the pipeline's start); the bar's rate and ETA must not count it.
  extractor = features.LevelExtractor(
    TinyNet(), tiny_variables(), image_size=SIZE, batch_size=4, levels=(0,)
  )
  extractor.compile()
  pause = 2.0
  images = np.zeros((4, SIZE, SIZE, 3), np.float32)

  def batches():
    time.sleep(pause)
    for _ in range(6):
      yield images

  got = extractor.extract(batches(), 23, progress=True, desc='slow start')
  assert got[0].shape == (23, 4)
  err = capsys.readouterr().err
  # The bar appears with the first batch done and the clock at zero.
  assert 'slow start:  17%|' in err and '4/23 [00:00<?, ?img/s]' in err, err
  # Counting the pause would cap the rate at 23 / 2 s; the batches after it take milliseconds.
  rate = float(re.findall(r'([\d.]+)img/s', err)[-1])
  assert rate > 4 * 23 / pause, err
  assert '23/23' in err, err


def test_batch_size_rounds_up_to_device_multiple():
  mesh = features.make_mesh()
  extractor = features.LevelExtractor(
    TinyNet(), tiny_variables(), image_size=SIZE, levels=(0,), batch_size=1, mesh=mesh
  )
  assert extractor.batch_size % mesh.size == 0
  assert extractor.input_shape == (extractor.batch_size, SIZE, SIZE, 3)


def test_order_preserved_when_decoding_finishes_out_of_order():
  source = make_source(9)
  variables = tiny_variables()
  threads = set()

  def slow_preprocess(image, size, mean, std):
    threads.add(threading.get_ident())
    # Earlier images (larger first row sum) take longer.
    time.sleep(0.002 * (int(image[0, 0, 0]) % 7))
    return simple_preprocess(image, size, mean, std)

  got = fakes.extract_features(
    TinyNet(),
    variables,
    source,
    image_size=SIZE,
    mean=MEAN,
    std=STD,
    batch_size=4,
    levels=(0, 1, 2),
    num_workers=3,
    progress=False,
    preprocess=slow_preprocess,
  )
  want = reference_features(source, variables)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert threading.get_ident() not in threads  # decoded in worker threads


def test_bfloat16_backbone_pools_in_float32():
  source = make_source(5)
  variables = tiny_variables()
  got = fakes.extract_features(
    TinyNet(dtype=jnp.bfloat16),
    variables,
    source,
    image_size=SIZE,
    mean=MEAN,
    std=STD,
    batch_size=4,
    levels=(0, 1, 2),
    progress=False,
    preprocess=simple_preprocess,
  )
  want = reference_features(source, variables)
  for g, w in zip(got, want):
    assert g.dtype == np.float32
    rel = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert 0 < rel < 3e-2


def test_bad_inputs_raise_clear_errors():
  variables = tiny_variables()
  with pytest.raises(ValueError, match='level 5'):
    _extract(make_source(2), variables, levels=(0, 5))
  with pytest.raises(ValueError, match="'image'"):
    _extract([{'img': np.zeros((4, 4, 3), np.uint8)}], variables)
  with pytest.raises(ValueError, match=r'uint8 \(H, W, 3\)'):
    _extract([{'image': np.zeros((4, 4, 3), np.float32)}], variables)
  with pytest.raises(ValueError, match='empty'):
    _extract([], variables)
  with pytest.raises(ValueError, match='levels'):
    _extract(make_source(2), variables, levels=(0, 0))
  with pytest.raises(ValueError, match='batch_size'):
    _extract(make_source(2), variables, batch_size=0)
  with pytest.raises(ValueError, match='preprocess returned shape'):
    fakes.extract_features(
      TinyNet(),
      variables,
      make_source(2),
      image_size=SIZE,
      mean=MEAN,
      std=STD,
      levels=(0,),
      progress=False,
      preprocess=lambda im, s, m, d: np.zeros((3, 3, 3)),
    )


# ---------------------------------------------------------------------------
# 4 devices vs 1, and two processes on localhost
# ---------------------------------------------------------------------------

_FOUR_DEVICES = textwrap.dedent('''
    import sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import fakes
    import test_features as t
    from jax_gad import features
    from jax_gad.models import efficientnet
    assert jax.device_count() == 4, jax.devices()
    source = t.make_source(7)
    variables = t.random_variables({arch!r})
    module = efficientnet.create({arch!r})
    out = {{}}
    for name, devices in (('four', jax.devices()), ('one', jax.devices()[:1])):
      extractor = features.LevelExtractor(module, variables, image_size=32, levels=range(9),
                                          batch_size=4, mesh=features.make_mesh(devices))
      assert extractor.batch_size == 4
      # Default preprocessing: jax_gad.data.preprocess.prepare_image.
      feats = fakes.pooled(extractor, source, mean=t.MEAN, std=t.STD, progress=False)
      for i, f in enumerate(feats):
        out[f'{{name}}_{{i}}'] = f
    np.savez({out!r}, **out)
''')

ARCH = 'efficientnet-b0'


def test_four_device_mesh_equals_single_device(tmp_path):
  """Acceptance 1: 4-device CPU mesh == 1 device, 7 images in batches of 4."""
  from jax_gad.data.preprocess import prepare_image
  from jax_gad.models import efficientnet

  out = str(tmp_path / 'feats.npz')
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=4',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO,
  )
  script = _FOUR_DEVICES.format(tests=os.path.join(REPO, 'tests'), out=out, arch=ARCH)
  proc = subprocess.run(
    [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  # Independent reference in this (one-device) process: all 7 images in one
  # plain apply call, pooled in numpy.
  source = make_source(7)
  x = np.stack([prepare_image(s['image'], 32, MEAN, STD) for s in source])
  maps = jax.jit(efficientnet.create(ARCH).apply)(random_variables(ARCH), jnp.asarray(x))
  widths = efficientnet.level_widths(ARCH)
  for i in range(9):
    four, one = got[f'four_{i}'], got[f'one_{i}']
    want = np.asarray(maps[i], np.float64).mean(axis=(1, 2))
    assert four.shape == one.shape == (7, widths[i])
    assert np.all(np.isfinite(four)) and np.std(four) > 0
    assert_close_relative(four, one)
    assert_close_relative(four, want)


_PROCESS = textwrap.dedent('''
    import sys
    import jax, numpy as np
    jax.config.update('jax_num_cpu_devices', 2)
    sys.path.insert(0, {tests!r})
    from jax_gad import features
    pid = int(sys.argv[1])
    assert features.initialize_distributed({address!r}, 2, pid) == (pid, 2)
    import fakes
    import test_features as t
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    # Each process decodes only its own rows of each batch.
    seen = []
    def preprocess(image, size, mean, std):
      seen.append(int(image[0, 0, 0]))
      return t.simple_preprocess(image, size, mean, std)
    from jax_gad.models import efficientnet
    feats = fakes.extract_features(
        efficientnet.create({arch!r}), t.random_variables({arch!r}), t.make_source(7),
        image_size=32, mean=t.MEAN, std=t.STD, batch_size=4, progress=False,
        preprocess=preprocess)
    np.savez({out!r} + str(pid) + '.npz', seen=np.asarray(seen),
             **{{f'level_{{i}}': f for i, f in enumerate(feats)}})
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


MULTIHOST_ARCH = 'efficientnet-lite0'


def test_two_processes_on_localhost_return_full_features(tmp_path):
  """jax.distributed on CPU (gloo): 2 processes x 2 devices, full arrays on both."""
  from jax_gad.models import efficientnet

  out = str(tmp_path / 'proc')
  script = _PROCESS.format(
    tests=os.path.join(REPO, 'tests'),
    arch=MULTIHOST_ARCH,
    address=f'localhost:{_free_port()}',
    out=out,
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', script, str(pid)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in range(2)
  ]
  logs = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    logs.append(err)
  assert all(p.returncode == 0 for p in procs), '\n'.join(l[-2000:] for l in logs)
  source = make_source(7)
  x = np.stack([simple_preprocess(s['image'], 32, MEAN, STD) for s in source])
  maps = jax.jit(efficientnet.create(MULTIHOST_ARCH).apply)(
    random_variables(MULTIHOST_ARCH), jnp.asarray(x)
  )
  results = [np.load(f'{out}{pid}.npz') for pid in range(2)]
  for result in results:
    for i in range(9):
      want = np.asarray(maps[i], np.float64).mean(axis=(1, 2))
      assert_close_relative(result[f'level_{i}'], want)
  # Global batch 4 over 4 devices (2 per process): process 0 decodes rows 0,1
  # of each batch, process 1 rows 2,3; image 7 does not exist (padding).
  first_pixel = [int(s['image'][0, 0, 0]) for s in source]
  assert sorted(results[0]['seen']) == sorted(first_pixel[i] for i in (0, 1, 4, 5))
  assert sorted(results[1]['seen']) == sorted(first_pixel[i] for i in (2, 3, 6))


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

FIELDS = {
  'dataset': 'synthetic_ad',
  'category': 'bottle',
  'split': 'train',
  'data_fingerprint': 'abc',
  'checkpoint': 'f00d',
  'arch': 'efficientnet-b0',
  'image_size': 224,
  'dtype': 'float32',
  'depthwise': 'shifted',
  'levels': (0, 1, 2),
}


class Counter:
  def __init__(self, seed=0):
    self.calls = 0
    self.seed = seed

  def __call__(self):
    self.calls += 1
    rng = np.random.default_rng(self.seed + self.calls)
    return [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)]


def test_cache_hit_returns_stored_arrays(tmp_path):
  cache = feature_cache.FeatureCache(tmp_path / 'cache')
  compute = Counter()
  first = cache.get_or_compute(FIELDS, compute)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    second = cache.get_or_compute(dict(FIELDS, levels=[0, 1, 2]), compute)
  assert compute.calls == 1 and cache.hits == 1 and cache.misses == 1
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  arrays_path, manifest_path = cache.paths(FIELDS)
  manifest = json.load(open(manifest_path))
  assert manifest['key_fields']['category'] == 'bottle'
  assert manifest['key_fields']['feature_code_version'] == feature_cache.FEATURE_CODE_VERSION
  assert manifest['shapes'] == [[5, 3], [5, 7]]
  assert sorted(os.listdir(tmp_path / 'cache')) == sorted(
    [os.path.basename(arrays_path), os.path.basename(manifest_path)]
  )


def test_cache_key_depends_on_every_field():
  base = feature_cache.cache_key(FIELDS)
  assert base == feature_cache.cache_key(dict(reversed(list(FIELDS.items()))))
  for name in FIELDS:
    changed = dict(FIELDS, **{name: 'other'})
    assert feature_cache.cache_key(changed) != base, name
  assert feature_cache.cache_key(dict(FIELDS, feature_code_version=0)) != base
  with pytest.raises(ValueError, match='JSON'):
    feature_cache.cache_key(dict(FIELDS, image_size=np.zeros(2)))
  with pytest.raises(ValueError, match='non-empty'):
    feature_cache.cache_key({})


def test_cache_stale_manifest_is_reported_and_recomputed(tmp_path):
  cache = feature_cache.FeatureCache(tmp_path)
  compute = Counter()
  cache.get_or_compute(FIELDS, compute)
  _, manifest_path = cache.paths(FIELDS)
  manifest = json.load(open(manifest_path))
  manifest['key_fields']['category'] = 'cable'
  json.dump(manifest, open(manifest_path, 'w'))
  with pytest.warns(feature_cache.CacheWarning, match='stale') as record:
    again = cache.get_or_compute(FIELDS, compute)
  assert manifest_path in str(record[0].message)
  assert compute.calls == 2
  # The recomputed entry replaced the stale one and is now a clean hit.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    hit = cache.get_or_compute(FIELDS, compute)
  assert compute.calls == 2
  np.testing.assert_array_equal(hit[1], again[1])


@pytest.mark.parametrize('damage', ['garbage', 'values', 'shape', 'missing', 'manifest'])
def test_cache_corrupt_entry_is_reported_and_recomputed(tmp_path, damage):
  cache = feature_cache.FeatureCache(tmp_path)
  compute = Counter()
  cache.get_or_compute(FIELDS, compute)
  arrays_path, manifest_path = cache.paths(FIELDS)
  if damage == 'garbage':
    open(arrays_path, 'wb').write(b'not an npz file')
  elif damage == 'values':
    with np.load(arrays_path) as npz:
      arrays = {k: npz[k] for k in npz.files}
    arrays['level_1'][0, 0] += 1.0
    np.savez(arrays_path, **arrays)
  elif damage == 'shape':
    with np.load(arrays_path) as npz:
      arrays = {k: npz[k] for k in npz.files}
    arrays['level_0'] = arrays['level_0'][:4]
    np.savez(arrays_path, **arrays)
  elif damage == 'missing':
    os.remove(arrays_path)
  else:
    open(manifest_path, 'w').write('{"key_fields": ')
  name = manifest_path if damage == 'manifest' else arrays_path
  with pytest.warns(feature_cache.CacheWarning) as record:
    got = cache.get_or_compute(FIELDS, compute)
  assert name in str(record[0].message)
  assert compute.calls == 2
  want = Counter()
  want.calls = 1
  for g, w in zip(got, want()):
    np.testing.assert_array_equal(g, w)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    cache.get_or_compute(FIELDS, compute)
  assert compute.calls == 2


def test_cache_rejects_bad_compute_results(tmp_path):
  cache = feature_cache.FeatureCache(tmp_path)
  with pytest.raises(ValueError, match='list of arrays'):
    cache.get_or_compute(FIELDS, lambda: np.zeros(3))
  assert os.listdir(tmp_path) == []


def test_cache_with_extraction_end_to_end(tmp_path):
  cache = feature_cache.FeatureCache(tmp_path)
  source = make_source(6)
  variables = tiny_variables()
  fields = dict(FIELDS, levels=[0, 1, 2], image_size=SIZE)
  first = cache.get_or_compute(fields, lambda: _extract(source, variables))
  second = cache.get_or_compute(fields, lambda: pytest.fail('should hit'))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
