"""Tests of jax_gad.maps: per-location fits, postprocessing, pixel metrics, overlays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from jax_gad import gaussian
from jax_gad.data import preprocess
from jax_gad.maps import fit as mfit
from jax_gad.maps import metrics, overlay, postprocess


def _maps(seed, n, h=2, w=3, c=5, dtype=np.float32):
  rng = np.random.default_rng(seed)
  # Correlated channels with a location-dependent mean and scale.
  mix = rng.normal(size=(c, c))
  base = rng.normal(size=(n, h, w, c)) @ mix
  loc = rng.normal(size=(1, h, w, c)) * 3.0
  scale = rng.uniform(0.5, 2.0, size=(1, h, w, 1))
  return (base * scale + loc).astype(dtype)


# ---------------------------------------------------------------------------
# Per-location fit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  'n,c,shrinkage', [(12, 5, 'ledoit_wolf'), (6, 9, 'ledoit_wolf'), (10, 4, 0.3), (4, 6, 0.0)]
)
def test_per_location_fit_equals_fit_gaussian_per_location(n, c, shrinkage):
  train = _maps(0, n, c=c)
  test = _maps(1, 4, c=c)
  state = mfit.fit(train, shrinkage=shrinkage)
  dist = np.asarray(mfit.score(state, test))
  assert dist.shape == (4, 2, 3)
  for i in range(2):
    for j in range(3):
      ref = gaussian.fit_gaussian(train[:, i, j], shrinkage=shrinkage)
      np.testing.assert_allclose(state.mean[i, j], ref.mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.shrinkage[i, j], ref.shrinkage, rtol=1e-5, atol=1e-7)
      w = np.asarray(state.whitening[i, j], np.float64)
      prec = np.asarray(gaussian.precision(ref), np.float64)
      scale = np.abs(prec).max()
      np.testing.assert_allclose(w @ w.T / scale, prec / scale, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(dist[:, i, j], gaussian.mahalanobis(ref, test[:, i, j]), rtol=1e-5)


def test_ridge_adds_to_the_shrunk_covariance():
  train = _maps(2, 8, c=4)
  state = mfit.fit(train, ridge=0.5)
  x = train[:, 1, 2].astype(np.float64)
  cov, _ = gaussian.ledoit_wolf(x)
  cov = np.asarray(cov, np.float64) + 0.5 * np.eye(4)
  w = np.asarray(state.whitening[1, 2], np.float64)
  np.testing.assert_allclose(w @ w.T, np.linalg.inv(cov), rtol=1e-4)


def test_streamed_fit_equals_one_shot_float64():
  with jax.enable_x64(True):
    maps = _maps(3, 23, h=3, w=2, c=6, dtype=np.float64)
    one = mfit.finalize(mfit.batch_moments(maps))
    # Uneven batches, a padded (masked) last batch, and a merge of two halves.
    stats = mfit.empty((3, 2, 6), jnp.float64)
    for start in range(0, 20, 7):
      stats = mfit.accumulate(stats, maps[start : min(start + 7, 20)])
    padded = np.concatenate([maps[20:], np.zeros((4,) + maps.shape[1:])])
    stats = mfit.accumulate(stats, padded, mask=np.arange(7) < 3)
    streamed = mfit.finalize(stats)
    merged = mfit.finalize(mfit.merge(mfit.batch_moments(maps[:9]), mfit.batch_moments(maps[9:])))
    # psum over a named axis (as over devices in shard_map), here a vmapped axis.
    parts = [mfit.batch_moments(maps[k::3]) for k in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts)
    reduced = jax.vmap(lambda s: mfit.psum(s, 'd'), axis_name='d')(stacked)
    summed = mfit.finalize(jax.tree_util.tree_map(lambda a: a[1], reduced))
    for other in (streamed, merged, summed):
      assert other.mean.dtype == jnp.float64
      for a, b in zip(one, other):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-9)
    test = _maps(4, 3, h=3, w=2, c=6, dtype=np.float64)
    np.testing.assert_allclose(mfit.score(streamed, test), mfit.score(one, test), rtol=1e-6)


def test_statistics_size_does_not_depend_on_image_count():
  small = mfit.accumulate(mfit.empty((2, 3, 5)), _maps(5, 4))
  large = mfit.accumulate(mfit.empty((2, 3, 5)), _maps(5, 40))
  assert [a.shape for a in small] == [a.shape for a in large]
  assert mfit.state_bytes((2, 3, 5)) == sum(a.nbytes for a in small)


def test_random_channels_deterministic_subset():
  a = mfit.random_channels(100, 10, seed=3)
  assert np.array_equal(a, mfit.random_channels(100, 10, seed=3))
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
  assert np.all(np.diff(a) > 0)
  assert not np.array_equal(a, mfit.random_channels(100, 10, seed=4))
  assert np.array_equal(mfit.random_channels(7, None), np.arange(7))


def test_fit_bad_input():
  with pytest.raises(ValueError, match='4-D'):
    mfit.fit(np.zeros((3, 4, 5)))
  with pytest.raises(ValueError, match='at least 2'):
    mfit.fit(_maps(0, 1))
  with pytest.raises(ValueError, match='per-image shape'):
    mfit.accumulate(mfit.empty((2, 3, 4)), _maps(0, 3))
  with pytest.raises(ValueError, match='ridge'):
    mfit.fit(_maps(0, 4), ridge=-1.0)


# ---------------------------------------------------------------------------
# Postprocessing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('sigma', [0.7, 2.0, 4.0])
def test_blur_equals_scipy_gaussian_filter(sigma):
  x = np.random.default_rng(6).normal(size=(2, 13, 7)).astype(np.float32)
  ref = np.stack([ndimage.gaussian_filter(a.astype(np.float64), sigma, mode='reflect') for a in x])
  np.testing.assert_allclose(postprocess.blur(x, sigma), ref, atol=1e-5)


@pytest.mark.parametrize('size', [(19, 23), (3, 2)])
def test_resize_equals_resize_bilinear(size):
  x = np.random.default_rng(7).normal(size=(2, 7, 5)).astype(np.float32)
  ref = np.stack([preprocess.resize_bilinear(a, size) for a in x])
  np.testing.assert_allclose(postprocess.resize(x, size), ref, atol=1e-5)


def test_combine_mean_and_chi():
  rng = np.random.default_rng(8)
  a, b = rng.uniform(size=(2, 4, 4)), rng.uniform(size=(2, 2, 2))
  ref = [preprocess.resize_bilinear(m, 16) for m in a]
  ref_b = [preprocess.resize_bilinear(m, 16) for m in b]
  mean = np.stack(
    [ndimage.gaussian_filter((x + y) / 2, 1.5, mode='reflect') for x, y in zip(ref, ref_b)]
  )
  chi = np.stack(
    [ndimage.gaussian_filter((x / 2 + y / 3) / 2, 1.5, mode='reflect') for x, y in zip(ref, ref_b)]
  )
  np.testing.assert_allclose(postprocess.combine([a, b], 16, sigma=1.5), mean, atol=1e-5)
  np.testing.assert_allclose(
    postprocess.combine([a, b], 16, rule='chi', widths=[4, 9], sigma=1.5), chi, atol=1e-5
  )
  with pytest.raises(ValueError, match='combine rule'):
    postprocess.combine([a], 16, rule='max')


def test_to_original_and_image_scores():
  maps = np.random.default_rng(9).uniform(size=(2, 8, 8)).astype(np.float32)
  out = postprocess.to_original(maps, [(8, 8), (20, 12)])
  assert out[0].shape == (8, 8) and out[1].shape == (20, 12)
  np.testing.assert_allclose(out[1], preprocess.resize_bilinear(maps[1], (20, 12)), atol=1e-6)
  np.testing.assert_array_equal(postprocess.image_scores(out), [m.max() for m in out])


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def _masks_and_maps(seed):
  """Three images of different sizes: several regions, one region, defect-free."""
  rng = np.random.default_rng(seed)
  m1 = np.zeros((12, 10), np.uint8)
  m1[1:4, 1:3] = 255
  m1[6:9, 5:9] = 255
  m1[10, 0] = 255
  m1[4, 3] = 255  # touches the first region diagonally: one region with 8-connectivity
  m2 = np.zeros((9, 9), np.uint8)
  m2[2:7, 3:5] = 255
  m3 = np.zeros((8, 11), np.uint8)
  masks = [m1, m2, m3]
  # Scores: higher inside regions, quantised to create ties.
  maps = [np.round(rng.normal(size=g.shape) + 1.2 * (g > 0), 1).astype(np.float32) for g in masks]
  return maps, masks


def _reference_aupro(maps, masks, limit=0.3):
  """Brute force: every distinct threshold, binarise, per-region overlap via ndimage.label."""
  regions = []
  for m, g in zip(maps, masks):
    lab, k = ndimage.label(g > 0, structure=np.ones((3, 3)))
    regions += [(m, lab == r) for r in range(1, k + 1)]
  normal = np.concatenate([m[g == 0] for m, g in zip(maps, masks)])
  points = [(0.0, 0.0)]
  for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
    pro = np.mean([np.mean(m[r] >= t) for m, r in regions])
    points.append((np.mean(normal >= t), pro))
  x, y = np.array(points).T
  keep = x <= limit
  xs, ys = list(x[keep]), list(y[keep])
  if xs[-1] < limit:
    i = int(np.argmax(x > limit))
    xs.append(limit)
    ys.append(y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1]))
  return np.trapezoid(ys, xs) / limit


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_pixel_auroc_equals_sklearn_and_aupro_equals_reference(seed):
  maps, masks = _masks_and_maps(seed)
  got = metrics.pixel_metrics(maps, masks)
  flat_maps = np.concatenate([m.ravel() for m in maps])
  flat_masks = np.concatenate([g.ravel() > 0 for g in masks])
  assert got.pixel_auroc == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
  assert got.aupro == pytest.approx(_reference_aupro(maps, masks), abs=1e-6)
  assert got.n_regions == 4
  for limit in (0.05, 1.0):
    assert metrics.aupro(maps, masks, limit) == pytest.approx(
      _reference_aupro(maps, masks, limit), abs=1e-6
    )


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_metrics_do_not_depend_on_the_chunk_size(monkeypatch, chunk):
  maps, masks = _masks_and_maps(3)
  whole = metrics.pixel_metrics(maps, masks)
  monkeypatch.setattr(metrics, "_CHUNK", chunk)
  chunked = metrics.pixel_metrics(maps, masks)
  assert chunked.pixel_auroc == pytest.approx(whole.pixel_auroc, abs=1e-12)
  assert chunked.aupro == pytest.approx(whole.aupro, abs=1e-12)


def test_aupro_perfect_and_no_defects():
  _, masks = _masks_and_maps(0)
  perfect = [(g > 0).astype(np.float32) for g in masks]
  assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
  assert metrics.pixel_auroc(perfect, masks) == pytest.approx(1.0)
  empty = metrics.pixel_metrics([np.zeros((4, 4))], [np.zeros((4, 4))])
  assert np.isnan(empty.pixel_auroc) and np.isnan(empty.aupro) and empty.n_regions == 0
  with pytest.raises(ValueError, match='same shape'):
    metrics.pixel_metrics([np.zeros((4, 4))], [np.zeros((4, 5))])
  with pytest.raises(ValueError, match='fpr_limit'):
    metrics.aupro(perfect, masks, 0.0)


# ---------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------


def test_select_first_per_defect_type():
  kinds = ['good', 'good', 'good', 'crack', 'hole', 'crack', 'crack']
  assert overlay.select(kinds, 2) == [0, 1, 3, 4, 5]
  assert overlay.select(kinds, 0) == []


def test_write_overlay_png(tmp_path):
  from PIL import Image

  image = np.random.default_rng(10).integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
  amap = np.random.default_rng(11).uniform(size=(24, 32)).astype(np.float32)
  mask = np.zeros((24, 32), np.uint8)
  mask[5:10, 5:12] = 255
  path = tmp_path / overlay.file_name(3, 'test/crack/000.png')
  assert path.name == '003_test_crack_000.png'
  overlay.write_overlay(str(path), image, amap, mask, vmin=0.0, vmax=1.0, title='crack')
  with Image.open(path) as png:
    assert png.format == 'PNG' and png.size[0] > 100
  with pytest.raises(ValueError, match='agree'):
    overlay.render(image, amap[:5], None, vmin=0, vmax=1)


def _biased_cov(x):
  """The empirical covariance (divided by n), as Ledoit-Wolf's shrinkage target is built on."""
  x = np.asarray(x, np.float64)
  z = x - x.mean(axis=0)
  return z.T @ z / len(x)


def _fallback_maps():
  """(train, test) maps whose location (0, 1) makes the Cholesky route fail, so that every
  location is refitted by the eigendecomposition route; (0, 0) is rank-deficient (3 rows, 3
  channels) and needs the ridge to be invertible."""
  rng = np.random.default_rng(3)
  train = np.zeros((3, 1, 2, 3), np.float32)
  train[:, 0, 0] = rng.normal(size=(3, 3))
  train[:, 0, 1] = np.outer(rng.normal(size=3), [1e5, -1e5, 3e4])  # rank 1, huge scale
  test = rng.normal(size=(4, 1, 2, 3)).astype(np.float32)
  return train, test


def test_eigendecomposition_fallback_keeps_the_ridge():
  train, test = _fallback_maps()
  stats = mfit.accumulate(mfit.empty(train.shape[1:], jnp.float32), jnp.asarray(train))
  value, ridge = jnp.float32(0.0), jnp.float32(1.0)
  _, ok = mfit._finalize_fast_jit(stats, 'fixed', value, ridge)
  assert not bool(np.all(ok))  # the fallback route runs
  state = mfit.finalize(stats, shrinkage=0.0, ridge=1.0)
  cov = _biased_cov(train[:, 0, 0]) + np.eye(3)
  z = test[:, 0, 0].astype(np.float64) - train[:, 0, 0].mean(axis=0)
  expected = np.sqrt(np.einsum('ni,ij,nj->n', z, np.linalg.inv(cov), z))
  np.testing.assert_allclose(np.asarray(mfit.score(state, test))[:, 0, 0], expected, rtol=1e-3)


@pytest.mark.parametrize('seed', [0, 7, 10])
def test_cholesky_route_rejects_rounding_size_pivots(seed):
  # 3 rows in 3 channels: a singular covariance (rank 2) whose float32 Cholesky factorisation
  # completes with a rounding-size last pivot (seeds chosen so; asserted below). No
  # shrinkage, no ridge: the distances of new points must be the pseudo-inverse ones (null
  # space ignored, as scikit-learn's), not those of the rounding-size pivot (100x larger).
  rng = np.random.default_rng(seed)
  train = rng.normal(size=(3, 1, 1, 3)).astype(np.float32)
  test = rng.normal(size=(5, 1, 1, 3)).astype(np.float32)
  stats = mfit.accumulate(mfit.empty(train.shape[1:], jnp.float32), jnp.asarray(train))
  cov, _, _ = gaussian.shrunk_covariance(
    jax.tree_util.tree_map(lambda a: a[0, 0], stats), 'fixed', jnp.float32(0.0)
  )
  pivots = np.diagonal(np.asarray(jnp.linalg.cholesky(cov, symmetrize_input=False)))
  cutoff = 3 * np.finfo(np.float32).eps * float(np.max(np.diagonal(np.asarray(cov))))
  assert np.all(np.isfinite(pivots)) and pivots.min() ** 2 <= cutoff  # the case under test
  got = np.asarray(mfit.score(mfit.fit(train, shrinkage=0.0), test))[:, 0, 0]
  x = train[:, 0, 0].astype(np.float64)
  w, v = np.linalg.eigh(_biased_cov(x))
  keep = w > 3 * np.finfo(np.float32).eps * w.max()
  pinv = (v[:, keep] / w[keep]) @ v[:, keep].T
  z = test[:, 0, 0].astype(np.float64) - x.mean(axis=0)
  expected = np.sqrt(np.einsum('ni,ij,nj->n', z, pinv, z))
  np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-3)


def test_map_channels_up_to_the_narrowest_map_level():
  from jax_gad.maps import pipeline

  # efficientnet-lite0 levels 3 and 5 have 40 and 112 channels.
  settings = pipeline.settings_for('efficientnet-lite0', (3, 5), 40, 'mean', 4.0, 0.01)
  assert [len(c) for c in settings.channels] == [40, 40]
  with pytest.raises(ValueError, match=r'--map_channels=41 exceeds the 40 channels of map level 3'):
    pipeline.settings_for('efficientnet-lite0', (5, 3), 41, 'mean', 4.0, 0.01)
