"""Generated feature matrices shared by the Gaussian and PCA tests."""

import math

import numpy as np


def _data(case, seed=0):
  """Correlated, off-centre float64 data; 'constant_column' has two constant columns."""
  rng = np.random.default_rng(seed)
  n, d = (120, 40) if case == 'constant_column' else case
  mixing = rng.normal(size=(d, d)) / math.sqrt(d)
  x = rng.normal(size=(n, d)) @ mixing * rng.uniform(0.5, 2.0, d) + rng.normal(0.0, 3.0, d)
  if case == 'constant_column':
    x[:, 5] = 0.0  # a dead ReLU channel
    x[:, 11] = 0.1234  # a constant that is not exactly representable
  return x


def _decaying(n, d, seed=0):
  """Data with a geometrically decaying spectrum, so the PCA thresholds pick various k."""
  rng = np.random.default_rng(seed)
  r = min(d, 256)  # 0.85**256 ~ 1e-18: further directions would carry no variance anyway
  q, _ = np.linalg.qr(rng.normal(size=(d, r)))
  scales = 0.85 ** np.arange(r)
  return (rng.normal(size=(n, r)) * scales) @ q.T + rng.normal(0.0, 2.0, d)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
