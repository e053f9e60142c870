"""The paper's density: one Ledoit-Wolf Gaussian per level (adapter over :mod:`jax_gad.gaussian`).

``fit`` is :func:`jax_gad.gaussian.fit_gaussian` (the key is unused: the fit
is closed-form); the default score is the Mahalanobis distance, and the L2 and
SED distances of :data:`jax_gad.gaussian.DISTANCES` are offered as further
scorers. The streaming route accumulates mergeable :class:`~jax_gad.gaussian.Moments`
over batches and devices and finalises with
:func:`jax_gad.gaussian.fit_from_moments`.
"""

from __future__ import annotations

import dataclasses
import numbers

from jax_gad import densities
from jax_gad import gaussian as core
from jax_gad.densities import _checks


@dataclasses.dataclass(frozen=True)
class GaussianConfig:
  """Hyper-parameters of the Gaussian.

  Attributes:
    shrinkage: ``'ledoit_wolf'`` (default, the paper's) or a fixed
      coefficient in [0, 1], as in :func:`jax_gad.gaussian.fit_gaussian`.
  """

  shrinkage: str | float = 'ledoit_wolf'

  def __post_init__(self):
    if isinstance(self.shrinkage, str):
      _checks.choice('GaussianConfig', 'shrinkage', self.shrinkage, ('ledoit_wolf',))
    elif isinstance(self.shrinkage, numbers.Real) and not isinstance(self.shrinkage, bool):
      _checks.real('GaussianConfig', 'shrinkage', self.shrinkage, low=0.0, high=1.0)
    else:
      raise ValueError(
        "GaussianConfig.shrinkage must be 'ledoit_wolf' or a number in [0, 1], "
        f'got {self.shrinkage!r}.'
      )


def fit(config: GaussianConfig, x_train, key=None) -> core.GaussianState:
  """Fits the Gaussian to rows ``x_train`` (``key`` unused)."""
  del key
  return core.fit_gaussian(x_train, config.shrinkage)


def _init(config, dim, dtype=None):
  del config
  return core.empty_moments(dim) if dtype is None else core.empty_moments(dim, dtype)


DENSITY = densities.register(
  densities.Density(
    name='gaussian',
    config=GaussianConfig,
    fit=fit,
    scorers=dict(core.DISTANCES),
    default_scorer='mahalanobis',
    streaming=densities.Streaming(
      init=_init,
      accumulate=lambda config, stats, x: core.accumulate(stats, x),
      merge=lambda config, a, b: core.merge(a, b),
      psum=lambda config, stats, axis_name: core.psum_moments(stats, axis_name),
      finalize=lambda config, stats: core.fit_from_moments(stats, config.shrinkage),
    ),
  )
)
