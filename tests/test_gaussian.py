"""Tests for jax_gad.gaussian against scikit-learn, scipy and numpy as independent references."""

import math
import os
import subprocess
import sys
import textwrap

from gaussian_data import _data, _rel
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import distance as sp_distance
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

from jax_gad import gaussian, pca

SHAPES = [(500, 64), (48, 1792), (200, 448)]
CASES = SHAPES + ['constant_column']
THRESHOLDS = (0.95, 0.99, 0.999, 0.9999)
HYPOTHESIS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------
# Ledoit-Wolf and Mahalanobis against scikit-learn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('case', CASES, ids=str)
def test_ledoit_wolf_matches_sklearn_float64(case):
  x = _data(case)
  ref_cov, ref_shrinkage = sk_ledoit_wolf(x)
  with jax.enable_x64(True):
    cov, shrinkage = gaussian.ledoit_wolf(x)
    assert cov.dtype == jnp.float64
    cov, shrinkage = np.asarray(cov), float(shrinkage)
  assert 0.0 < ref_shrinkage < 1.0
  assert shrinkage == pytest.approx(ref_shrinkage, rel=1e-6)
  assert _rel(cov, ref_cov) < 1e-6
  np.testing.assert_allclose(cov, ref_cov, rtol=1e-6, atol=1e-12 * np.abs(ref_cov).max())


@pytest.mark.parametrize('case', CASES, ids=str)
def test_ledoit_wolf_float32(case):
  x = _data(case)
  ref_cov, ref_shrinkage = sk_ledoit_wolf(x.astype(np.float32).astype(np.float64))
  cov, shrinkage = gaussian.ledoit_wolf(x.astype(np.float32))
  assert cov.dtype == jnp.float32
  assert _rel(cov, ref_cov) < 1e-3
  assert float(shrinkage) == pytest.approx(ref_shrinkage, rel=1e-3)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_mahalanobis_matches_sklearn_float32(case):
  x = _data(case).astype(np.float32)
  rng = np.random.default_rng(1)
  x_test = (x[:30] + rng.normal(0.0, 0.5, x[:30].shape)).astype(np.float32)
  ref = LedoitWolf().fit(x.astype(np.float64)).mahalanobis(x_test.astype(np.float64))  # squared
  state = gaussian.fit_gaussian(x)
  dist = np.asarray(gaussian.mahalanobis(state, x_test), np.float64)
  assert dist.shape == (30,)
  np.testing.assert_allclose(dist**2, ref, rtol=1e-4)


@pytest.mark.parametrize(
  'shape', [(48, 448), (200, 448), (500, 64)], ids=['gram_route', 'cholesky_n<D', 'cholesky_n>D']
)
def test_fit_gaussian_state_matches_sklearn_float64(shape):
  x = _data(shape)
  lw = LedoitWolf().fit(x)
  with jax.enable_x64(True):
    state = gaussian.fit_gaussian(x)
    prec = np.asarray(gaussian.precision(state))
    state = jax.tree.map(np.asarray, state)
  np.testing.assert_allclose(state.mean, lw.location_, rtol=1e-12)
  np.testing.assert_allclose(state.std, x.std(axis=0, ddof=1), rtol=1e-10)
  assert float(state.shrinkage) == pytest.approx(lw.shrinkage_, rel=1e-10)
  assert float(state.n) == shape[0]
  f = state.factor
  if 4 * shape[0] <= shape[1]:  # Gram route, whitening W: W W^T is the precision
    assert bool(state.whitening)
    np.testing.assert_allclose(f @ f.T, lw.precision_, atol=1e-9 * np.abs(lw.precision_).max())
  else:  # Cholesky L: L L^T is the covariance
    assert not bool(state.whitening)
    np.testing.assert_array_equal(f, np.tril(f))
    np.testing.assert_allclose(f @ f.T, lw.covariance_, atol=1e-10 * np.abs(lw.covariance_).max())
  assert _rel(prec, lw.precision_) < 1e-8


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_singular_covariance_uses_pseudo_inverse_like_sklearn(dtype):
  # No shrinkage, fewer samples than features and a dead column: the covariance
  # is singular, and scikit-learn's precision is its pseudo-inverse. Both
  # routes: the Gram fit (D >= 4 n) and the moments fit (Cholesky fails -> eigh).
  x = _data('constant_column')[:10]
  x_test = _data('constant_column', seed=3)[:10]
  ref = EmpiricalCovariance().fit(x).mahalanobis(x_test)
  with jax.enable_x64(dtype == np.float64):
    for state in (
      gaussian.fit_gaussian(x.astype(dtype), shrinkage=0.0),
      gaussian.fit_from_moments(gaussian.moments(x.astype(dtype)), shrinkage=0.0),
    ):
      dist = np.asarray(gaussian.mahalanobis(state, x_test.astype(dtype)), np.float64)
      assert bool(state.whitening) and float(state.shrinkage) == 0.0
      assert np.isfinite(dist).all()
      np.testing.assert_allclose(dist**2, ref, rtol=1e-9 if dtype == np.float64 else 1e-4)


def test_tiny_ridge_counts_every_direction_like_sklearn():
  # Singular sample covariance plus a tiny positive ridge: positive definite,
  # so every direction counts (no pseudo-inverse), as in scikit-learn.
  from sklearn.covariance import ShrunkCovariance

  x = _data('constant_column')[:10]
  x_test = _data('constant_column', seed=3)[:10]
  ref = ShrunkCovariance(shrinkage=1e-7).fit(x).mahalanobis(x_test)
  with jax.enable_x64(True):
    gram = gaussian.fit_gaussian(x, shrinkage=1e-7)
    chol = gaussian.fit_from_moments(gaussian.moments(x), shrinkage=1e-7)
    assert not bool(chol.whitening)  # the Cholesky factor was accepted
    for state in (gram, chol):
      dist = np.asarray(gaussian.mahalanobis(state, x_test))
      np.testing.assert_allclose(dist**2, ref, rtol=1e-5)


def test_fixed_shrinkage_matches_sklearn_shrunk_covariance():
  from sklearn.covariance import ShrunkCovariance

  x = _data((60, 20))
  x_test = _data((60, 20), seed=5)[:7]
  ref = ShrunkCovariance(shrinkage=0.3).fit(x)
  with jax.enable_x64(True):
    state = gaussian.fit_gaussian(x, shrinkage=0.3)
    dist = np.asarray(gaussian.mahalanobis(state, x_test))
  np.testing.assert_allclose(dist**2, ref.mahalanobis(x_test), rtol=1e-10)


# ---------------------------------------------------------------------------
# L2 and SED against scipy
# ---------------------------------------------------------------------------


def test_l2_and_sed_match_scipy():
  x = _data((80, 30))
  x_test = _data((80, 30), seed=2)[:12]
  mean = x.mean(axis=0, keepdims=True)
  var = x.var(axis=0, ddof=1)
  ref_l2 = sp_distance.cdist(x_test, mean, 'euclidean')[:, 0] / math.sqrt(30)
  ref_sed = sp_distance.cdist(x_test, mean, 'seuclidean', V=var)[:, 0] / math.sqrt(30)
  with jax.enable_x64(True):
    state = gaussian.fit_gaussian(x)
    np.testing.assert_allclose(np.asarray(gaussian.l2(state, x_test)), ref_l2, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gaussian.sed(state, x_test)), ref_sed, rtol=1e-12)
  assert set(gaussian.DISTANCES) == {'l2', 'sed', 'mahalanobis'}


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_sed_leaves_out_zero_variance_dimensions(dtype):
  x = _data('constant_column')
  x_test = _data('constant_column', seed=4)[:9]
  x_test[:, 5] = 3.0  # the dead channel fires at test time
  x_test[:, 11] = -1.0  # the constant column moves
  live = np.setdiff1d(np.arange(x.shape[1]), [5, 11])
  ref = sp_distance.cdist(
    x_test[:, live], x[:, live].mean(0, keepdims=True), 'seuclidean', V=x[:, live].var(0, ddof=1)
  )[:, 0] / math.sqrt(live.size)
  with jax.enable_x64(dtype == np.float64):
    state = gaussian.fit_gaussian(x.astype(dtype))
    std = np.asarray(state.std)
    dist = np.asarray(gaussian.sed(state, x_test.astype(dtype)), np.float64)
  assert std[5] == 0.0 and std[11] == 0.0  # exactly zero, not rounding noise
  assert np.isfinite(dist).all()
  np.testing.assert_allclose(dist, ref, rtol=1e-10 if dtype == np.float64 else 1e-5)


def test_sed_all_dimensions_constant_is_zero():
  x = np.tile(np.array([[1.0, 0.0, -2.5]], np.float32), (6, 1))
  state = gaussian.fit_gaussian(x)
  dist = np.asarray(gaussian.sed(state, np.array([[3.0, 1.0, 0.0]], np.float32)))
  np.testing.assert_array_equal(dist, [0.0])
  assert np.isfinite(np.asarray(gaussian.mahalanobis(state, x[:2]))).all()


def test_score_dispatches_by_name():
  x = _data((40, 6)).astype(np.float32)
  state = gaussian.fit_gaussian(x)
  for name, fn in gaussian.DISTANCES.items():
    np.testing.assert_array_equal(gaussian.score(state, x, name), fn(state, x))
  with pytest.raises(ValueError, match="distance must be one of"):
    gaussian.score(state, x, 'cosine')


# ---------------------------------------------------------------------------
# PCA / NPCA against scikit-learn
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Streaming: batches and devices
# ---------------------------------------------------------------------------


def _assert_states_close(a, b, rtol, x_test=None):
  """Same Gaussian: equal fields, precision and distances (factors may differ in kind)."""
  names = ['mean', 'std', 'shrinkage', 'n']
  if not bool(a.whitening) and not bool(b.whitening):  # Cholesky factors are unique
    names.append('factor')
  for name in names:  # (shrinkage may be 0 in one and rounding noise in the other)
    x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
    assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y) + 1e-14, name
  assert _rel(gaussian.precision(a), gaussian.precision(b)) <= rtol
  if x_test is not None:
    np.testing.assert_allclose(
      gaussian.mahalanobis(a, x_test), gaussian.mahalanobis(b, x_test), rtol=rtol
    )


@pytest.mark.parametrize('shape', [(300, 48), (15, 64)], ids=['cholesky_route', 'gram_route'])
def test_streaming_seven_uneven_batches_equals_one_shot(shape):
  n, d = shape
  x = _data(shape) + 1e3  # a large common offset: a naive one-pass formula would cancel
  x_test = _data(shape, seed=7)[:20] + 1e3
  cuts = {300: [1, 3, 40, 41, 170, 260], 15: [1, 3, 4, 8, 9, 12]}[n]  # 7 uneven batches
  with jax.enable_x64(True):
    one_shot = gaussian.fit_gaussian(x)
    parts = [gaussian.moments(b) for b in np.array_split(x, cuts)]
    assert len(parts) == 7 and len({int(p.n) for p in parts}) > 3
    m = gaussian.empty_moments(d, jnp.float64)
    for part in parts:  # sequential, as a stream would arrive
      m = gaussian.merge(m, part)
    streamed = gaussian.fit_from_moments(m)
    _assert_states_close(streamed, one_shot, 1e-6, x_test)
    # Merge order does not matter: a balanced tree of the same per-batch moments.
    while len(parts) > 1:
      parts = [
        gaussian.merge(*parts[i : i + 2]) if i + 1 < len(parts) else parts[i]
        for i in range(0, len(parts), 2)
      ]
    _assert_states_close(gaussian.fit_from_moments(parts[0]), one_shot, 1e-6, x_test)
    ref = LedoitWolf().fit(x)
    assert float(streamed.shrinkage) == pytest.approx(ref.shrinkage_, rel=1e-6)


def test_moments_mask_ignores_padding():
  x = _data((30, 8))
  padded = np.concatenate([x, np.full((5, 8), 7.0)])
  mask = np.r_[np.ones(30, bool), np.zeros(5, bool)]
  with jax.enable_x64(True):
    a = gaussian.moments(padded, mask)
    b = gaussian.moments(x)
    for u, v in zip(a, b):
      np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-10)
    empty = gaussian.moments(padded, np.zeros(35, bool))
    assert float(empty.n) == 0.0
    merged = gaussian.merge(empty, b)
    for u, v in zip(merged, b):
      np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match='mask must have shape'):
    gaussian.moments(x, np.ones(3, bool))
  with pytest.raises(ValueError, match='mask must be boolean'):
    gaussian.moments(x, np.ones(30))


_MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    jax.config.update('jax_enable_x64', True)
    from jax_gad import gaussian
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 24)) @ rng.normal(size=(24, 24)) + 50.0
    x[:, 3] = 0.25
    x = x[np.argsort(x[:, 0])]        # devices see different means
    counts = [30, 30, 25, 15]         # uneven: pad each device to 30 rows
    xs, ms, start = [], [], 0
    for c in counts:
      xs.append(np.concatenate([x[start:start + c], np.zeros((30 - c, 24))]))
      ms.append(np.arange(30) < c)
      start += c
    xs, ms = np.concatenate(xs), np.concatenate(ms)
    mesh = jax.make_mesh((4,), ('d',))
    shard = jax.sharding.NamedSharding(mesh, P('d'))
    xs, ms = jax.device_put(xs, shard), jax.device_put(ms, shard)

    def fit(xb, mb):  # per device: its (30, 24) block and mask
      return gaussian.psum_moments(gaussian.moments(xb, mb), 'd')

    m = jax.jit(jax.shard_map(fit, mesh=mesh, in_specs=(P('d'), P('d')), out_specs=P()))(xs, ms)
    sharded = gaussian.fit_from_moments(m)
    one_shot = gaussian.fit_gaussian(x)
    out = {}
    for name in ('mean', 'factor', 'std', 'shrinkage', 'n'):
      a, b = np.asarray(getattr(sharded, name)), np.asarray(getattr(one_shot, name))
      out[name] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out['std3'] = float(np.asarray(sharded.std)[3])
    print(json.dumps(out))
''')


def test_psum_over_four_device_mesh_equals_one_shot():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run(
    [sys.executable, '-c', _MESH_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=root,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json

  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  assert errors.pop('std3') == 0.0  # constant column stays exactly constant across devices
  assert max(errors.values()) < 1e-6, errors


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def test_nan_and_inf_are_rejected_with_location():
  x = _data((20, 5)).astype(np.float32)
  x[3, 2] = np.nan
  for fn in (gaussian.fit_gaussian, gaussian.ledoit_wolf, pca.fit_pca, gaussian.moments):
    with pytest.raises(ValueError, match=r'x contains NaN at row 3, column 2'):
      fn(x)
  x[3, 2] = 0.0
  x[7, 4] = -np.inf
  with pytest.raises(ValueError, match=r'x contains -inf at row 7, column 4'):
    gaussian.fit_gaussian(jnp.asarray(x))  # device arrays too
  x[7, 4] = 0.0
  state = gaussian.fit_gaussian(x)
  bad = x[:4].copy()
  bad[1, 0] = np.inf
  for fn in gaussian.DISTANCES.values():
    with pytest.raises(ValueError, match=r'x contains inf at row 1, column 0'):
      fn(state, bad)


def test_too_few_samples_are_rejected():
  one = np.ones((1, 4), np.float32)
  for fn in (gaussian.fit_gaussian, gaussian.ledoit_wolf, pca.fit_pca):
    with pytest.raises(ValueError, match=r'x has 1 sample\(s\); at least 2 are needed'):
      fn(one)
  with pytest.raises(ValueError, match=r'moments hold 1 sample\(s\); at least 2'):
    gaussian.fit_from_moments(gaussian.moments(one))
  with pytest.raises(ValueError, match='at least 2'):
    gaussian.fit_from_moments(gaussian.empty_moments(4))


def test_width_mismatch_is_rejected():
  x = _data((20, 6)).astype(np.float32)
  state = gaussian.fit_gaussian(x)
  for fn in gaussian.DISTANCES.values():
    with pytest.raises(ValueError, match=r'state was fitted on D=6 features, got x with 5'):
      fn(state, x[:, :5])
  with pytest.raises(ValueError, match=r'm \(moments\) holds D=6 features, got x with 7'):
    gaussian.accumulate(gaussian.moments(x), np.ones((2, 7)))
  with pytest.raises(ValueError, match='cannot merge moments of width 6 and 3'):
    gaussian.merge(gaussian.moments(x), gaussian.moments(x[:, :3]))
  proj = pca.reduce(pca.fit_pca(x), 'pca', 0.9)
  with pytest.raises(ValueError, match=r'projection was fitted on D=6 features'):
    pca.project(proj, x[:, :4])


def test_other_bad_input_is_rejected():
  x = _data((20, 6)).astype(np.float32)
  with pytest.raises(ValueError, match=r'must be 2-D \(n_samples, n_features\), got shape \(20,\)'):
    gaussian.fit_gaussian(x[:, 0])
  with pytest.raises(ValueError, match='real numbers'):
    gaussian.fit_gaussian(x.astype(np.complex64))
  with pytest.raises(ValueError, match='0 features'):
    gaussian.fit_gaussian(np.zeros((5, 0)))
  for bad in ('oas', 1.5, -0.1, None, True):
    with pytest.raises(ValueError, match='shrinkage'):
      gaussian.fit_gaussian(x, shrinkage=bad)
  with pytest.raises(ValueError, match='state must be a GaussianState'):
    gaussian.mahalanobis((x.mean(0), np.eye(6)), x)
  with pytest.raises(ValueError, match='dim must be a positive integer'):
    gaussian.empty_moments(0)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([1, 3, 5]), n=st.sampled_from([12, 20]))
def test_mahalanobis_invariant_under_affine_map_without_shrinkage(seed, d, n):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0, d) + rng.normal(0.0, 5.0, d)
  t = rng.normal(size=(4, d)) * 3.0
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a = q * rng.uniform(0.2, 5.0, d)  # invertible, condition number <= 25
  b = rng.normal(0.0, 10.0, d)
  with jax.enable_x64(True):
    d0 = np.asarray(gaussian.mahalanobis(gaussian.fit_gaussian(x, 0.0), t))
    d1 = np.asarray(gaussian.mahalanobis(gaussian.fit_gaussian(x @ a + b, 0.0), t @ a + b))
  np.testing.assert_allclose(d1, d0, rtol=1e-7)


@HYPOTHESIS
@given(
  seed=st.integers(0, 2**31 - 1),
  n=st.sampled_from([2, 3, 5]),
  d=st.sampled_from([20, 33]),
  shrinkage=st.sampled_from(['ledoit_wolf', 0.0, 0.5]),
  dead=st.booleans(),
)
def test_gram_route_equals_moments_route(seed, n, d, shrinkage, dead):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0, d) + rng.normal(0.0, 5.0, d)
  if dead:
    x[:, :3] = 0.0
  t = rng.normal(size=(4, d)) * 3.0
  with jax.enable_x64(True):
    gram = gaussian.fit_gaussian(x, shrinkage)  # D >= 4 n: Gram route
    dense = gaussian.fit_from_moments(gaussian.moments(x), shrinkage)
    assert bool(gram.whitening)
    _assert_states_close(gram, dense, 1e-7, t)


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(1, 29))
def test_merge_is_exact_and_symmetric_for_any_split(seed, split):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(30, 4)) * rng.uniform(0.1, 3.0, 4) + rng.normal(0.0, 100.0, 4)
  with jax.enable_x64(True):
    a, b = gaussian.moments(x[:split]), gaussian.moments(x[split:])
    whole = gaussian.moments(x)
    for ab, ba, w in zip(gaussian.merge(a, b), gaussian.merge(b, a), whole):
      scale = np.abs(np.asarray(w)).max() + 1e-300
      np.testing.assert_allclose(ab, w, rtol=1e-9, atol=1e-9 * scale)
      np.testing.assert_allclose(ba, w, rtol=1e-9, atol=1e-9 * scale)


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([3, 8, 40]))
def test_shrinkage_in_unit_interval_and_sed_scale_invariant(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)) ** 3  # heavy tails
  t = rng.normal(size=(3, 6))
  scale = rng.uniform(0.01, 100.0, 6)
  with jax.enable_x64(True):
    state = gaussian.fit_gaussian(x)
    scaled = gaussian.fit_gaussian(x * scale)
    assert 0.0 <= float(state.shrinkage) <= 1.0
    np.testing.assert_allclose(gaussian.sed(scaled, t * scale), gaussian.sed(state, t), rtol=1e-9)
    assert np.isfinite(np.asarray(gaussian.mahalanobis(state, t))).all()


# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# jit and dtypes
# ---------------------------------------------------------------------------


def test_public_functions_are_jittable():
  x = _data((50, 10)).astype(np.float32)
  eager = gaussian.fit_gaussian(x)
  jitted = jax.jit(gaussian.fit_gaussian)(x)
  for a, b in zip(jitted, eager):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for fn in (gaussian.mahalanobis, gaussian.l2, gaussian.sed):
    np.testing.assert_allclose(jax.jit(fn)(eager, x), fn(eager, x), rtol=1e-6)
  cov, s = jax.jit(gaussian.ledoit_wolf)(x)
  np.testing.assert_allclose(cov, gaussian.ledoit_wolf(x)[0], rtol=1e-6, atol=1e-7)
  m = jax.jit(gaussian.merge)(gaussian.moments(x[:20]), gaussian.moments(x[20:]))
  np.testing.assert_allclose(
    jax.jit(gaussian.fit_from_moments)(m).factor, eager.factor, rtol=1e-4, atol=1e-5
  )


def test_dtypes_are_promoted_to_float32():
  x = _data((40, 7))
  for dtype in (np.float16, np.int32, np.float64):
    state = gaussian.fit_gaussian(x.astype(dtype))
    assert state.mean.dtype == jnp.float32  # x64 is off here
