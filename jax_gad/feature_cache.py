"""An on-disk cache of pooled level features, keyed by everything that changes them.

Extracting features is the slow stage of the protocol; fitting is fast. The
cache lets the Table 2 runs (PCA / NPCA, other densities) reuse the features
of the Table 1 run. :class:`FeatureCache` stores each entry as
``<root>/<key>.npz`` plus a manifest ``<root>/<key>.json`` holding the full
key fields, the shapes, dtypes and a sha256 of the arrays; the key is the
sha256 of the canonical JSON of the key fields (:func:`cache_key`). A stale,
unreadable or corrupt entry is reported (:class:`CacheWarning`) and
recomputed. docs/outputs.md says what the key holds and how to clear the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence
import warnings

import numpy as np

from jax_gad import files

logger = logging.getLogger(__name__)

# Bump whenever a change in this package changes the feature values (model
# code, preprocessing, pooling); it is part of every cache key.
FEATURE_CODE_VERSION = 1


class CacheWarning(UserWarning):
  """A cache entry was stale or corrupt and is being recomputed."""


def _canonical_json(fields: Mapping[str, Any]) -> str:
  try:
    return json.dumps(
      fields, sort_keys=True, separators=(',', ':'), ensure_ascii=True, allow_nan=False
    )
  except (TypeError, ValueError) as err:
    raise ValueError(
      'key_fields must hold only JSON values (str, int, float, '
      f'bool, None, lists, dicts with str keys): {err}'
    ) from None


def _normalise_fields(key_fields: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(key_fields, Mapping) or not key_fields:
    raise ValueError(f'key_fields must be a non-empty dict, got {type(key_fields).__name__}')
  for name in key_fields:
    if not isinstance(name, str):
      raise ValueError(f'key_fields keys must be str, got {name!r}')
  fields = dict(key_fields)
  fields.setdefault('feature_code_version', FEATURE_CODE_VERSION)
  # Round trip so tuples become lists and the stored manifest compares equal.
  return json.loads(_canonical_json(fields))


def cache_key(key_fields: Mapping[str, Any]) -> str:
  """sha256 hex of the canonical JSON of ``key_fields`` (+ feature code version)."""
  return hashlib.sha256(_canonical_json(_normalise_fields(key_fields)).encode('ascii')).hexdigest()


def pooled_key(
  dataset: str,
  category: str,
  split: str,
  fingerprint: str,
  checkpoint_sha256: str,
  arch: str,
  image_size: int,
  dtype: str,
  depthwise: str,
) -> dict:
  """The key fields of one split's pooled features of every level (0-8).

  ``jax_gad.main`` and ``jax_gad.fit`` both store and look up that entry, so
  either reuses what the other extracted for the same data and weights.

  Args:
    dataset, category, split: which images ('train' / 'test').
    fingerprint: the split's content fingerprint (``Split.fingerprint``).
    checkpoint_sha256, arch, image_size, dtype: the backbone and its input.
    depthwise: the resolved depthwise implementation ('shift' or 'xla').
  """
  return {
    'dataset': dataset,
    'category': category,
    'split': split,
    'data': fingerprint,
    'checkpoint_sha256': checkpoint_sha256,
    'arch': arch,
    'image_size': image_size,
    'dtype': dtype,
    'depthwise': depthwise,
  }


def describe(path: str, hit: bool) -> str:
  """One console line after a lookup of the entry at ``path``: read (``hit``) or stored."""
  if hit:
    return f'features from cache {path} (extracted by an earlier run; nothing computed)'
  return f'features extracted and stored in cache {path}'


class FeatureCache:
  """Directory of extracted features keyed by the fields that determine them.

  Each entry ``<root>/<key>.npz`` (arrays ``level_0 .. level_{k-1}``) has a
  manifest ``<root>/<key>.json`` with the full key fields, the array shapes and
  dtypes and a checksum of the array contents. A manifest whose fields differ
  from the request (stale) or an entry that cannot be read, fails its checksum
  or has other shapes (corrupt) triggers a :class:`CacheWarning` naming the
  file, and the features are recomputed and rewritten. Files are written to a
  temporary name and moved into place with ``os.replace``.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.hits = 0
    self.misses = 0

  def paths(self, key_fields: Mapping[str, Any]) -> tuple[str, str]:
    """``(arrays_path, manifest_path)`` of the entry for ``key_fields``."""
    key = cache_key(key_fields)
    base = os.path.join(self.root, key)
    return base + '.npz', base + '.json'

  def _load(self, fields, arrays_path, manifest_path) -> list[np.ndarray] | None:
    if not os.path.exists(manifest_path) and not os.path.exists(arrays_path):
      return None
    try:
      with open(manifest_path, 'r', encoding='utf-8') as f:
        manifest = json.load(f)
      if not isinstance(manifest, dict):
        raise ValueError('manifest is not a JSON object')
    except (OSError, ValueError) as err:
      warnings.warn(
        f'feature cache manifest {manifest_path} is unreadable ({err}); recomputing',
        CacheWarning,
        stacklevel=3,
      )
      return None
    if manifest.get('key_fields') != fields:
      warnings.warn(
        f'feature cache entry {manifest_path} is stale: its key fields '
        f'{manifest.get("key_fields")!r} differ from {fields!r}; '
        'recomputing',
        CacheWarning,
        stacklevel=3,
      )
      return None
    try:
      shapes = [tuple(s) for s in manifest['shapes']]
      dtypes = list(manifest['dtypes'])
      with np.load(arrays_path, allow_pickle=False) as npz:
        names = [f'level_{i}' for i in range(len(shapes))]
        if sorted(npz.files) != sorted(names):
          raise ValueError(f'holds arrays {sorted(npz.files)}, manifest expects {names}')
        arrays = [npz[name] for name in names]
      got_shapes = [a.shape for a in arrays]
      got_dtypes = [a.dtype.str for a in arrays]
      if got_shapes != shapes or got_dtypes != dtypes:
        raise ValueError(
          f'arrays have shapes {got_shapes} dtypes {got_dtypes}, manifest says {shapes} {dtypes}'
        )
      if files.arrays_sha256(arrays) != manifest['checksum']:
        raise ValueError('checksum mismatch')
    except Exception as err:  # pylint: disable=broad-except
      warnings.warn(
        f'feature cache entry {arrays_path} is corrupt ({err}); recomputing',
        CacheWarning,
        stacklevel=3,
      )
      return None
    return arrays

  def get_or_compute(
    self, key_fields: Mapping[str, Any], compute_fn: Callable[[], Sequence[np.ndarray]]
  ) -> list[np.ndarray]:
    """Returns the cached arrays for ``key_fields`` or computes and stores them.

    Args:
      key_fields: JSON-able dict of everything that changes the features
        (dataset, category, split, data fingerprint, checkpoint identity, arch,
        image size, dtype, depthwise implementation, levels, ...);
        ``feature_code_version`` is added when absent.
      compute_fn: ``() -> sequence of arrays`` (one per level), called on a miss.

    Returns:
      The list of arrays (as computed, or as loaded from disk).
    """
    fields = _normalise_fields(key_fields)
    arrays_path, manifest_path = self.paths(fields)
    arrays = self._load(fields, arrays_path, manifest_path)
    if arrays is not None:
      self.hits += 1
      logger.info('feature cache hit: %s', arrays_path)
      return arrays
    self.misses += 1
    logger.info('feature cache miss: %s', arrays_path)
    computed = compute_fn()
    if isinstance(computed, np.ndarray) or not isinstance(computed, (list, tuple)):
      raise ValueError(f'compute_fn must return a list of arrays, got {type(computed).__name__}')
    arrays = [np.asarray(a) for a in computed]
    for i, array in enumerate(arrays):
      if array.dtype == object:
        raise ValueError(f'compute_fn returned an object array at position {i}')
    manifest = {
      'key_fields': fields,
      'key': os.path.basename(arrays_path)[:-4],
      'shapes': [list(a.shape) for a in arrays],
      'dtypes': [a.dtype.str for a in arrays],
      'checksum': files.arrays_sha256(arrays),
      'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }
    files.atomic_write(
      arrays_path, lambda f: np.savez(f, **{f'level_{i}': a for i, a in enumerate(arrays)})
    )
    files.atomic_write(
      manifest_path,
      lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode('utf-8')),
    )
    return arrays
