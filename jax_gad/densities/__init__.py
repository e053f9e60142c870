"""Density models behind one interface, and their registry.

Every density model is a :class:`Density` record of pure functions over an
explicit, frozen hyper-parameter config and a fitted state (a pytree):

* ``fit(config, x_train, key) -> state`` fits the model to the (n, D) rows
  ``x_train``; ``key`` is a ``jax.random`` key (models without randomness
  ignore it). Same rows + same config + same key -> identical state.
* ``score(state, x) -> (n,)`` anomaly scores, larger = more anomalous: the
  negative log-likelihood for the mixture and the flow, the Mahalanobis
  distance for the Gaussian (a monotone function of its negative
  log-likelihood, so it ranks rows the same way, and it is what the paper
  reports).
* ``scorers`` names every score a model offers (the Gaussian also has its L2
  and SED distances); ``score`` is ``scorers[default_scorer]``.
* ``fit_many(config, xs, keys, names)`` (optional) fits several levels at
  once, e.g. the flow's levels in one ``vmap``-ed program; without it,
  :func:`fit_levels` loops over ``fit``.
* ``streaming`` (optional) is the mergeable-statistics route for models whose
  fit is a function of sufficient statistics (the Gaussian: moments from
  batches, across batches, across devices with ``psum``, then ``finalize``).
  Models trained iteratively from rows (GMM, flow) leave it ``None``.

Adding a density is one module that builds its :class:`Density` and calls
:func:`register`, plus its name in ``_BUILTIN`` below (or an import of the
module by the user, which registers it too). Callers select a model with
:func:`get` and never change.

Example::

  from jax_gad import densities
  model = densities.get('gmm')
  config = model.config(n_components=(1, 2, 4), covariance='ledoit_wolf')
  state = model.fit(config, x_train, jax.random.key(0))
  scores = model.score(state, x_test)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

Array = jax.Array


class Streaming(NamedTuple):
  """Fit through mergeable sufficient statistics (batches, devices).

  Attributes:
    init: ``(config, dim, dtype) -> stats`` of zero rows.
    accumulate: ``(config, stats, x) -> stats`` after adding rows ``x``.
    merge: ``(config, a, b) -> stats`` of the union of two row sets.
    psum: ``(config, stats, axis_name) -> stats`` all-reduced over a mapped
      device axis (inside ``shard_map`` / ``pmap``).
    finalize: ``(config, stats) -> state``; equals ``fit`` on all the rows.
  """

  init: Callable[..., Any]
  accumulate: Callable[..., Any]
  merge: Callable[..., Any]
  psum: Callable[..., Any]
  finalize: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Density:
  """A density model: its config type and pure fit / score functions.

  Attributes:
    name: registry name (the value of ``--density``).
    config: the frozen dataclass of hyper-parameters; ``config()`` gives the
      defaults and ``config(**overrides)`` validates overrides (ValueError).
    fit: ``(config, x_train, key) -> state``.
    scorers: score name -> ``(state, x) -> (n,)``, larger = more anomalous.
    default_scorer: the key of ``scorers`` that :attr:`score` uses.
    fit_many: optional ``(config, xs, keys, names) -> list of states``.
    streaming: optional :class:`Streaming` route.
    describe: optional ``state -> dict`` of plain JSON values that say what
      a fit chose or reached (the GMM's number of components, the flow's
      epochs); the protocol records it per (fold, level) in results.json's
      ``fits``.
  """

  name: str
  config: type
  fit: Callable[..., Any]
  scorers: Mapping[str, Callable[..., Array]]
  default_scorer: str
  fit_many: Callable[..., list] | None = None
  streaming: Streaming | None = None
  describe: Callable[[Any], dict] | None = None

  def __post_init__(self):
    if self.default_scorer not in self.scorers:
      raise ValueError(
        f'default_scorer {self.default_scorer!r} of density {self.name!r} is not '
        f'one of its scorers {sorted(self.scorers)}.'
      )
    if not dataclasses.is_dataclass(self.config) or not self.config.__dataclass_params__.frozen:
      raise ValueError(f'config of density {self.name!r} must be a frozen dataclass type.')

  @property
  def score(self) -> Callable[..., Array]:
    """The default scorer, ``(state, x) -> (n,)``."""
    return self.scorers[self.default_scorer]


DENSITIES: dict[str, Density] = {}


def register(density: Density, *, replace: bool = False) -> Density:
  """Adds ``density`` to :data:`DENSITIES` under ``density.name`` and returns it.

  Raises:
    ValueError: not a :class:`Density`, or the name is taken and ``replace``
      is False.
  """
  if not isinstance(density, Density):
    raise ValueError(f'density must be a Density, got {type(density).__name__}.')
  if density.name in DENSITIES and not replace and DENSITIES[density.name] is not density:
    raise ValueError(f'a density named {density.name!r} is already registered.')
  DENSITIES[density.name] = density
  return density


def get(name: str) -> Density:
  """The registered density called ``name``.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  if not isinstance(name, str) or name not in DENSITIES:
    raise ValueError(f'density must be one of {sorted(DENSITIES)}, got {name!r}.')
  return DENSITIES[name]


def level_keys(key, count: int) -> list:
  """``count`` independent keys ``fold_in(key, i)``, one per level."""
  return [jax.random.fold_in(key, i) for i in range(count)]


def fit_levels(density: Density, config, xs: Sequence, key, names: Sequence[str] | None = None):
  """Fits one state per level (``xs[i]`` holds level i's rows).

  Level i is fitted with the key ``fold_in(key, i)``; with ``fit_many`` the
  model may fit the levels together (the flow's vmap), otherwise this loops
  over ``fit``. ``names`` label levels in error messages.

  Returns:
    list of states, one per level.
  """
  names = [str(i) for i in range(len(xs))] if names is None else [str(n) for n in names]
  if len(names) != len(xs):
    raise ValueError(f'names must have one entry per level ({len(xs)}), got {len(names)}.')
  keys = level_keys(key, len(xs))
  if density.fit_many is not None:
    return density.fit_many(config, list(xs), keys, names)
  states = []
  for x, k, name in zip(xs, keys, names):
    try:
      states.append(density.fit(config, x, k))
    except ValueError as err:
      raise ValueError(f'level {name}: {err}') from err
  return states


def fit_batches(density: Density, config, batches) -> Any:
  """Fits a streaming density by passing batches of rows through its statistics.

  Args:
    density: a :class:`Density` with a :class:`Streaming` route.
    config: its config.
    batches: iterable of (n_i, D) arrays with a common D; float64 batches
      (under x64) accumulate in float64, anything else in float32.

  Returns:
    The fitted state.
  """
  if density.streaming is None:
    raise ValueError(f'density {density.name!r} has no streaming fit; call its fit() on rows.')
  from jax_gad import gaussian  # local: only for validating the first batch

  stream = density.streaming
  stats = None
  for i, batch in enumerate(batches):
    if stats is None:
      batch = gaussian.check_features(batch, f'batches[{i}]', min_samples=1)
      stats = stream.init(config, batch.shape[1], batch.dtype)
    stats = stream.accumulate(config, stats, batch)
  if stats is None:
    raise ValueError('batches is empty; at least one batch of rows is needed.')
  return stream.finalize(config, stats)


def check_rows(config, n_rows: int, where: str = "") -> None:
  """Refuses, before any feature is extracted, a config with more components than fit rows.

  Args:
    config: a density config; only one with ``n_components`` (the GMM) is checked.
    n_rows: the fewest training rows any fit will see (a fold's fit part).
    where: what the rows are, for the message (e.g. ``"bottle, fold 0"``).
  """
  ks = getattr(config, "n_components", None)
  if ks is None:
    return
  too_many = [k for k in ks if k > n_rows]
  if too_many:
    raise ValueError(
      f"--gmm_components={','.join(str(k) for k in ks)}: {too_many} exceed the {n_rows} training "
      f"rows {where or 'of a fit'} (each component needs at least one row); give at most {n_rows}"
    )


_BUILTIN = ('gaussian', 'gmm', 'flow')

for _module in _BUILTIN:
  importlib.import_module(f'{__name__}.{_module}')
del _module

__all__ = [
  'Density',
  'Streaming',
  'DENSITIES',
  'register',
  'get',
  'fit_levels',
  'fit_batches',
  'level_keys',
]
