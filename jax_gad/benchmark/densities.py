"""Fit time per level width for every density model (optional benchmark section).

For each sample count N and each level width D (by default EfficientNet-B4's
nine level widths, 48..1792) on random correlated non-negative features:

* ``gaussian``: :func:`jax_gad.densities.gaussian.fit` (Ledoit-Wolf);
* ``gmm``: ``gmm_iter`` EM iterations (``tol=0``) with ``gmm_k`` components
  from the same explicit initial parameters as scikit-learn's
  ``GaussianMixture(covariance_type='full', max_iter=gmm_iter, tol=0)``, which
  is timed in the same run (float64, ``reg_covar`` 1e-6; ours runs float32
  with the default Ledoit-Wolf shrinkage), so both time EM and nothing else;
* ``flow``: ``flow_epochs`` epochs (no early stopping), one program per
  level, and, when ``vmap`` is on, all levels of one N in one vmapped
  program padded to the widest level.

Every timing is split into the first call (compile + run) and the best of
``repeats`` further calls; rows carry ``compile_s`` = first - best.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence
import warnings

import jax
import numpy as np

from jax_gad import densities
from jax_gad.densities import flow, gmm
from jax_gad.models import efficientnet

B4_WIDTHS = efficientnet.level_widths('efficientnet-b4')


def _features(rng, n: int, d: int) -> np.ndarray:
  """Correlated, non-negative rows (like pooled activations), float32."""
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return np.maximum(rng.normal(size=(n, d)) @ mix + 0.5, 0.0).astype(np.float32)


def _block(tree):
  return jax.block_until_ready(tree)


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
  """(first call s, best of ``repeats`` further calls s)."""
  t0 = time.perf_counter()
  _block(fn())
  first = time.perf_counter() - t0
  best = float('inf')
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    _block(fn())
    best = min(best, time.perf_counter() - t0)
  return first, best


def _gmm_init(rng, x: np.ndarray, k: int) -> gmm.GMMParams:
  means = x[rng.choice(x.shape[0], k, replace=False)].astype(np.float64)
  cov = np.cov(x.T.astype(np.float64), bias=True) + 1e-3 * np.eye(x.shape[1])
  return gmm.GMMParams(np.full(k, 1.0 / k), means, np.broadcast_to(cov, (k,) + cov.shape).copy())


def _sklearn_gmm(x, init: gmm.GMMParams, iters: int):
  from sklearn.exceptions import ConvergenceWarning  # here: keeps scikit-learn out of --help
  from sklearn.mixture import GaussianMixture  # here: as above

  precisions = np.linalg.inv(init.covariances)
  model = GaussianMixture(
    init.weights.shape[0],
    covariance_type='full',
    tol=0.0,
    max_iter=iters,
    reg_covar=1e-6,
    weights_init=init.weights,
    means_init=init.means,
    precisions_init=precisions,
  )

  def run():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', ConvergenceWarning)
      return model.fit(x.astype(np.float64))

  return run


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the density section times (the ``settings`` entry of its result).

  Attributes:
    widths: level widths D.
    ns: sample counts N.
    names: density models timed.
    gmm_k: GMM components.
    gmm_iter: EM iterations timed (``tol=0``).
    flow_epochs: flow epochs timed (no early stopping).
    flow_config: base :class:`jax_gad.densities.flow.FlowConfig` (default: its defaults).
    use_sklearn: time scikit-learn's ``GaussianMixture`` alongside.
    vmap: also time all flow levels of one N in one vmapped program.
    repeats: timed calls after the first (the best is kept).
    seed: data and PRNG seed.
  """

  widths: Sequence[int] = B4_WIDTHS
  ns: Sequence[int] = (200, 2000)
  names: Sequence[str] = ('gaussian', 'gmm', 'flow')
  gmm_k: int = 4
  gmm_iter: int = 10
  flow_epochs: int = 5
  flow_config: Any = None
  use_sklearn: bool = True
  vmap: bool = True
  repeats: int = 1
  seed: int = 0

  def timed_flow(self) -> flow.FlowConfig:
    """The flow config timed: ``flow_epochs`` epochs, no early stopping, one program per level."""
    base = self.flow_config or flow.FlowConfig()
    return dataclasses.replace(
      base, epochs=self.flow_epochs, patience=self.flow_epochs + 1, vmap_levels=False
    )

  def to_json(self) -> dict:
    return {
      'widths': [int(d) for d in self.widths],
      'ns': [int(n) for n in self.ns],
      'densities': list(self.names),
      'gmm_k': self.gmm_k,
      'gmm_iter': self.gmm_iter,
      'flow_epochs': self.flow_epochs,
      'flow_config': dataclasses.asdict(self.timed_flow()),
      'sklearn': self.use_sklearn,
      'repeats': self.repeats,
      'seed': self.seed,
    }


def _fit_row(s: Settings, name: str, x: np.ndarray, key, rng) -> dict:
  """Times one density's fit on ``x``; the row of (N, width, density), or its ``error``."""
  n, d = x.shape
  row = {'n': int(n), 'width': int(d), 'density': name}
  try:
    if name == 'gaussian':
      model = densities.get('gaussian')
      first, best = _time(lambda: model.fit(model.config(), x, key), s.repeats)
    elif name == 'gmm':
      if s.gmm_k > n:
        raise ValueError(f'gmm_k={s.gmm_k} exceeds N={n}')
      init = _gmm_init(rng, x, s.gmm_k)
      gcfg = gmm.GMMConfig(n_components=s.gmm_k, tol=0.0, max_iter=s.gmm_iter)
      first, best = _time(lambda: gmm.fit(gcfg, x, key, init=init), s.repeats)
      row['per_iter_s'] = best / s.gmm_iter
      if s.use_sklearn:
        _, sk = _time(_sklearn_gmm(x, init, s.gmm_iter), 0)
        row['sklearn_fit_s'] = sk
        row['sklearn_per_iter_s'] = sk / s.gmm_iter
        row['speedup_vs_sklearn'] = sk / best
    else:
      first, best = _time(lambda: flow.fit(s.timed_flow(), x, key).params, s.repeats)
      row['epochs'] = s.flow_epochs
      row['per_epoch_s'] = best / s.flow_epochs
    row['compile_s'] = max(first - best, 0.0)
    row['fit_s'] = best
  except ValueError as err:
    row['error'] = str(err)
  return row


def _flow_vmap_row(s: Settings, xs: list, key, loop_total: float) -> dict:
  """All levels of one N in one vmapped flow program, against one program per level."""
  vcfg = dataclasses.replace(s.timed_flow(), vmap_levels=True)
  keys = densities.level_keys(key, len(xs))
  labels = [str(x.shape[1]) for x in xs]
  first, best = _time(
    lambda: [st.params for st in flow.fit_many(vcfg, xs, keys, labels)], s.repeats
  )
  return {
    'n': int(xs[0].shape[0]),
    'widths': [int(x.shape[1]) for x in xs],
    'loop_fit_s': loop_total,
    'vmap_compile_s': max(first - best, 0.0),
    'vmap_fit_s': best,
    'vmap_speedup': loop_total / best,
  }


def bench_density_fits(s: Settings, log: Callable[[str], None] | None = None) -> dict:
  """Times each density's fit per level width; see the module docstring.

  Returns:
    ``{'rows': [...], 'flow_vmap': [...], 'settings': {...}}``. Each row:
    ``n``, ``width``, ``density``, ``compile_s``, ``fit_s``, plus
    ``per_iter_s`` / ``sklearn_fit_s`` / ``sklearn_per_iter_s`` /
    ``speedup_vs_sklearn`` (gmm) or ``epochs`` / ``per_epoch_s`` (flow), and
    ``error`` when a fit raised. ``flow_vmap`` rows: ``n``, ``widths``,
    ``loop_fit_s`` (sum over levels of one program each), ``vmap_compile_s``,
    ``vmap_fit_s``, ``vmap_speedup``.
  """
  log = log or (lambda msg: None)
  for name in s.names:
    densities.get(name)
  rng = np.random.default_rng(s.seed)
  key = jax.random.key(s.seed)
  rows, vmap_rows = [], []
  for n in s.ns:
    xs = [_features(rng, n, d) for d in s.widths]
    loop_total = 0.0
    for x in xs:
      for name in s.names:
        row = _fit_row(s, name, x, key, rng)
        rows.append(row)
        if name == 'flow' and 'error' not in row:
          loop_total += row['fit_s']
        log(
          f'density fit n={n} D={x.shape[1]} {name}: '
          + (row.get('error') or f"{row['fit_s']:.3f} s (compile {row['compile_s']:.2f} s)")
        )
    if s.vmap and 'flow' in s.names:
      vmap_rows.append(_flow_vmap_row(s, xs, key, loop_total))
      log(f'flow n={n}: loop {loop_total:.2f} s, vmap {vmap_rows[-1]["vmap_fit_s"]:.2f} s')
  return {'rows': rows, 'flow_vmap': vmap_rows, 'settings': s.to_json()}


def format_rows(result: dict) -> str:
  """A markdown table of :func:`bench_density_fits` rows plus the vmap comparison."""
  lines = [
    '| N | width | density | fit s | compile s | per iter/epoch s | sklearn s | speedup |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    if 'error' in r:
      lines.append(f"| {r['n']} | {r['width']} | {r['density']} | error: {r['error']} |||||")
      continue
    per = r.get('per_iter_s', r.get('per_epoch_s'))
    sk = r.get('sklearn_fit_s')
    sp = r.get('speedup_vs_sklearn')
    lines.append(
      f"| {r['n']} | {r['width']} | {r['density']} | {r['fit_s']:.3f} | "
      f"{r['compile_s']:.2f} | {'' if per is None else f'{per:.4f}'} | "
      f"{'' if sk is None else f'{sk:.3f}'} | {'' if sp is None else f'{sp:.2f}x'} |"
    )
  for v in result['flow_vmap']:
    lines.append('')
    lines.append(
      f"flow, N={v['n']}, all {len(v['widths'])} levels: one program per level "
      f"{v['loop_fit_s']:.2f} s; one vmapped program {v['vmap_fit_s']:.2f} s "
      f"(compile {v['vmap_compile_s']:.2f} s), speedup {v['vmap_speedup']:.2f}x"
    )
  return '\n'.join(lines)
