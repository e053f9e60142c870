"""A fitted anomaly detector: backbone identity, per-level Gaussians, thresholds; saved safely.

A :class:`Detector` holds everything needed to score new images the way the
protocol scores test images: which backbone (arch, the checkpoint's sha256,
input size, mean/std, dtype), which levels, the optional PCA / NPCA projection
of each level, the Ledoit-Wolf Gaussian of each level, the aggregation of the
level scores (their mean, as in the paper: ``total = mean_l d_l`` with ``d_l``
the Mahalanobis distance at level ``l``) and the decision thresholds:

* ``threshold``: calibrated from normal images only. The training images are
  split into k folds (``jax_gad.protocol.folds``, KFold(shuffle=True,
  random_state=0)); each image is scored by a detector fitted on the other
  folds ("out of fold"), and the threshold is the out-of-fold score quantile at
  the target false-positive rate ``a`` (``target_fpr``): with the n scores
  sorted ascending, ``s_(m)`` with ``m = max(1, ceil(n (1 - a)))``, the
  product ``n (1 - a)`` taken less ``1e-12`` so that a product that is an
  integer up to floating-point rounding gives that integer. This is not
  always numpy's ``quantile(..., method='inverted_cdf')``, which takes the
  ceiling of the product as it comes out: for n = 25, a = 0.44 the product is
  14.000000000000002, numpy takes ``s_(15)``, this takes ``s_(14)``. An image is
  flagged when its total score is strictly above the threshold, so on the
  out-of-fold scores the false-positive rate is at most ``a``. The FPR on
  those scores moves in steps of ``1 / n``: with fewer than ``1 / a``
  training images the threshold is the highest out-of-fold score and ``a``
  cannot be resolved; :func:`fit_features` warns (and records it).
* ``sigma_thresholds``: the poster's chi-squared thresholds, per level the
  distance with the n-sigma tail mass of a ``k_l``-dimensional Gaussian
  (``jax_gad.metrics.sigma_threshold``) for n in ``sigmas``; the threshold of
  the total score at n sigma is their mean over levels (the same aggregation
  as the scores).

With maps (``python -m jax_gad.fit --maps``, :func:`fit_maps`) it also holds
per-location Gaussians of the unpooled ``map_levels``, the pixel threshold
and the overlay colour scale, both from out-of-fold maps of the training
images (:mod:`jax_gad.maps.deploy`); ``python -m jax_gad.predict --maps_dir``
then writes an anomaly map per image.

The detector's own pieces (Gaussians, projections, thresholds) are a pytree
(``flax.struct.dataclass``); the backbone weights are not part of it: they
stay in the checkpoint file, identified by sha256, and are attached when the
detector is fitted or loaded.

File format (``Detector.save`` / :func:`load_detector`), version 2: one
JSON header line (format name ``jax_gad.detector``, ``format_version``, the
payload's length, every non-array field, and ``content_sha256``), a newline,
then the payload: the arrays as msgpack (``flax.serialization``, plain numbers
and arrays only). ``content_sha256`` covers the whole content: the header's
other fields (as canonical JSON: sorted keys, no spaces) and the payload, so
an edited threshold is refused like a flipped payload byte. After the checksum
the header's fields are checked against each other and against the arrays
(:func:`check_detector`: levels against the state widths of the arch,
image_size, mean / std, a finite threshold that is the calibrated quantile of
the stored out-of-fold scores, target_fpr in (0, 1), ...) and, when the
backbone is attached, against the checkpoint (arch, mean / std), all before
anything is compiled. Nothing in the file can run code when loaded (no
pickle); a truncated, altered, foreign or other-version file (version 1 had
no checksum over its header: fit it again) is refused naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, NamedTuple, Sequence
import warnings

import flax.serialization
import flax.struct
import jax
import numpy as np

from jax_gad import backbone as backbone_lib
from jax_gad import config, densities, features, files, gaussian, metrics, pca, protocol
from jax_gad.models import efficientnet

FORMAT_NAME = "jax_gad.detector"
FORMAT_VERSION = 2  # 2: content_sha256 covers the header too
DEFAULT_SIGMAS = tuple(range(1, 9))
_MAX_HEADER = 1 << 20


class Scores(NamedTuple):
  """Scores of n images: ``per_level`` (n, L) Mahalanobis distances, ``total`` (n,) their mean."""

  per_level: np.ndarray
  total: np.ndarray


@flax.struct.dataclass
class Detector:
  """A fitted detector (see the module docstring). Build with :func:`jax_gad.fit`.

  Attributes:
    states: per level, a ``jax_gad.gaussian.GaussianState``.
    projections: per level, a ``jax_gad.pca.Projection`` or None.
    calibration_scores: (n_train,) out-of-fold total scores of the training images.
    arch, checkpoint_sha256, image_size, mean, std, dtype: the backbone's identity.
    levels: the level indices used, in order.
    reduction: None, or ``{'mode': 'pca' | 'npca', 'threshold': t}``.
    aggregation: 'mean' (the total score is the mean of the level scores).
    threshold: calibrated threshold of the total score.
    target_fpr: the false-positive rate it was calibrated for.
    n_folds: folds of the calibration.
    sigmas, sigma_thresholds: chi-squared thresholds, (L, len(sigmas)) per
      level; ``total_sigma_thresholds`` their mean over levels.
    info: provenance (dataset, category, data fingerprint, counts, versions).
    map_states: per map level, a ``jax_gad.maps.fit.MapState`` (empty: no maps).
    map_settings: the maps' levels, channels, shrinkage, ridge, combine rule and
      blur sigma (``jax_gad.maps.deploy.settings_to_json``), or None.
    map_threshold: calibrated pixel threshold of the maps.
    map_scale: (vmin, vmax) colour scale of the overlays, from normal images.
    backbone: the attached ``jax_gad.backbone.Backbone`` (not saved; None until attached).
  """

  states: tuple
  projections: tuple
  calibration_scores: Any
  arch: str = flax.struct.field(pytree_node=False, default="")
  checkpoint_sha256: str = flax.struct.field(pytree_node=False, default="")
  image_size: int = flax.struct.field(pytree_node=False, default=0)
  mean: tuple = flax.struct.field(pytree_node=False, default=())
  std: tuple = flax.struct.field(pytree_node=False, default=())
  dtype: str = flax.struct.field(pytree_node=False, default=config.Backbone.dtype)
  levels: tuple = flax.struct.field(pytree_node=False, default=())
  reduction: Any = flax.struct.field(pytree_node=False, default=None)
  aggregation: str = flax.struct.field(pytree_node=False, default="mean")
  threshold: float = flax.struct.field(pytree_node=False, default=math.inf)
  target_fpr: float = flax.struct.field(pytree_node=False, default=config.Calibration.target_fpr)
  n_folds: int = flax.struct.field(pytree_node=False, default=config.Calibration.calibration_folds)
  sigmas: tuple = flax.struct.field(pytree_node=False, default=DEFAULT_SIGMAS)
  sigma_thresholds: tuple = flax.struct.field(pytree_node=False, default=())
  info: Any = flax.struct.field(pytree_node=False, default=None)
  map_states: tuple = ()
  map_settings: Any = flax.struct.field(pytree_node=False, default=None)
  map_threshold: float = flax.struct.field(pytree_node=False, default=math.inf)
  map_scale: tuple = flax.struct.field(pytree_node=False, default=())
  backbone: Any = flax.struct.field(pytree_node=False, default=None)

  @property
  def total_sigma_thresholds(self) -> tuple:
    return tuple(
      float(np.mean([row[i] for row in self.sigma_thresholds])) for i in range(len(self.sigmas))
    )

  @property
  def has_maps(self) -> bool:
    """Whether the detector holds per-location statistics (fitted with --maps)."""
    return len(self.map_states) > 0

  def map_scorer(self, batch_size: int = 8, mesh=None):
    """A ``jax_gad.maps.deploy.MapScorer`` for this detector's map statistics."""
    from jax_gad.maps import deploy  # local: the maps import the data package (TFDS)

    if not self.has_maps:
      raise ValueError("this detector holds no map statistics: fit it again with --maps")
    if self.backbone is None:
      raise ValueError("this detector has no backbone attached; load it with load_detector")
    return deploy.MapScorer(
      self.backbone.module,
      self.backbone.variables,
      image_size=self.image_size,
      states=self.map_states,
      settings=deploy.settings_from_json(self.map_settings),
      batch_size=batch_size,
      mesh=mesh,
    )

  def score_features(self, features: Sequence[np.ndarray]) -> Scores:
    """Scores pooled features (one (n, C_l) array per level of ``self.levels``)."""
    return score_features(self, features)

  def decide(self, total, sigma: int | None = None) -> np.ndarray:
    """bool (n,): total score strictly above the calibrated (or n-sigma) threshold."""
    return np.asarray(total) > self.threshold_for(sigma)

  def threshold_for(self, sigma: int | None = None) -> float:
    if sigma is None:
      return float(self.threshold)
    if sigma not in self.sigmas:
      raise ValueError(f"sigma must be one of {list(self.sigmas)}, got {sigma!r}")
    return self.total_sigma_thresholds[list(self.sigmas).index(sigma)]

  def extractor(self, batch_size: int = 8, mesh=None):
    """A compiled ``jax_gad.features.LevelExtractor`` for this detector's backbone and levels."""
    if self.backbone is None:
      raise ValueError(
        "this detector has no backbone attached; load it with "
        "jax_gad.load_detector(path) or attach_backbone(...)"
      )
    return self.backbone.extractor(
      image_size=self.image_size, levels=self.levels, mesh=mesh, batch_size=batch_size
    )

  def score(
    self, images, *, batch_size: int = 8, num_workers: int = 2, progress: bool = False
  ) -> Scores:
    """Scores images: a sequence of uint8 (H, W, 3) arrays, or a dataset ``Split``.

    Returns:
      :class:`Scores` (per-level and total), float64.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
      images = [images]
    from jax_gad.data import pipeline  # local: the data package imports TFDS (kept out of --help)

    source = images if _is_source(images) else _ArraySource(images)
    feats = pipeline.pooled_features(
      self.extractor(batch_size),
      source,
      image_size=self.image_size,
      mean=self.mean,
      std=self.std,
      num_workers=num_workers,
      progress=progress,
      desc="score",
    )
    return score_features(self, feats)

  def save(self, path) -> None:
    """Writes the detector to ``path`` atomically (format in the module docstring)."""
    save_detector(self, path)


def _is_source(obj) -> bool:
  try:
    first = obj[0] if len(obj) else None
  except Exception:  # noqa: BLE001 - anything not indexable is not a source
    return False
  return isinstance(first, dict)


class _ArraySource:
  def __init__(self, images):
    self._images = list(images)

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    image = np.asarray(self._images[i])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"images[{i}] must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return {"image": image}


# ---------------------------------------------------------------------------
# Fitting and scoring (pure functions on features)
# ---------------------------------------------------------------------------


def _fit_levels(features: Sequence[np.ndarray], reduction):
  """(states, projections): the paper's Gaussian per level, through ``densities.fit_levels``.

  The Gaussian's fit is closed-form, so the key (``key(0)``) is unused;
  features are fitted in float32, as they are scored.
  """
  model = densities.get("gaussian")
  if reduction is not None:
    reduction = (reduction["mode"], reduction["threshold"])
  fits = densities.fit_levels(
    model,
    model.config(),
    [np.asarray(x, np.float32) for x in features],
    jax.random.key(0),
    reduction=reduction,
  )
  return tuple(fits.states), tuple(fits.projections)


def _score_levels(states, projections, features) -> Scores:
  if len(features) != len(states):
    raise ValueError(f"expected features of {len(states)} levels, got {len(features)}")
  per_level = []
  for state, projection, x in zip(states, projections, features):
    x = np.asarray(x, np.float32)
    if projection is not None:
      x = pca.project(projection, x)
    per_level.append(np.asarray(gaussian.mahalanobis(state, x), np.float64))
  per_level = np.stack(per_level, axis=1)
  return Scores(per_level, per_level.mean(axis=1))


def score_features(detector: Detector, features: Sequence[np.ndarray]) -> Scores:
  """Per-level Mahalanobis distances and their mean, for pooled features of ``detector.levels``."""
  return _score_levels(detector.states, detector.projections, features)


def calibrated_threshold(scores, target_fpr: float) -> float:
  """The ``max(1, ceil(n (1 - a) - 1e-12))``-th smallest score (module docstring)."""
  s = np.sort(np.asarray(scores, np.float64))
  m = math.ceil(len(s) * (1.0 - target_fpr) - 1e-12)
  return float(s[max(m, 1) - 1])


def check_target_fpr(target_fpr) -> float:
  """``target_fpr`` as a float, by the rule of ``--target_fpr`` (ValueError naming it)."""
  if isinstance(target_fpr, np.floating):
    target_fpr = float(target_fpr)
  config.check_field("target_fpr", target_fpr, config.options(config.Calibration)["target_fpr"])
  return float(target_fpr)


def out_of_fold_scores(features: Sequence[np.ndarray], n_folds: int, reduction=None):
  """Total score of every training row from a fit on the folds that do not contain it."""
  n = len(features[0])
  oof = np.full(n, np.nan)
  for fit_idx in protocol.folds(n, n_folds):
    held = np.setdiff1d(np.arange(n), fit_idx)
    states, projections = _fit_levels([f[fit_idx] for f in features], reduction)
    oof[held] = _score_levels(states, projections, [f[held] for f in features]).total
  return oof


class FitWarning(UserWarning):
  """A fit that runs but whose threshold or scores mean little (in ``info["warnings"]``)."""


def min_images(target_fpr: float) -> int:
  """The fewest training images whose out-of-fold FPR can resolve ``target_fpr`` (``1 / a``)."""
  return math.ceil(1.0 / target_fpr - 1e-9)


def fit_warnings(features, levels, target_fpr: float, threshold: float) -> list:
  """What makes a fit meaningless, one line each: too few images, constant features, a 0 threshold.

  * fewer than ``1 / target_fpr`` images: the out-of-fold FPR moves in steps of
    ``1 / n`` and the threshold is the highest out-of-fold score;
  * a level whose training features all have zero variance (the check
    ``jax_gad.main`` applies per fold: ``gaussian.has_no_variance``);
  * a calibrated threshold of 0 (or below): every out-of-fold score is 0.
  """
  n = len(features[0])
  notes = []
  if n < min_images(target_fpr):
    notes.append(
      f"{n} training images: the out-of-fold FPR moves in steps of 1/{n}, so "
      f"--target_fpr={target_fpr} cannot be resolved (the threshold is the highest "
      f"out-of-fold score); need at least {min_images(target_fpr)}"
    )
  for level, x in zip(levels, features):
    if gaussian.has_no_variance(x):
      notes.append(
        f"level {level}: every training feature has zero variance (identical images or only "
        "dead channels); its distances carry no information"
      )
  if not threshold > 0:
    notes.append(
      f"the calibrated threshold is {threshold!r}: every out-of-fold score is 0, so every "
      "image that differs at all from the training images is flagged"
    )
  return notes


def fit_features(
  features: Sequence[np.ndarray],
  *,
  levels: Sequence[int],
  target_fpr=config.Calibration.target_fpr,
  n_folds: int = config.Calibration.calibration_folds,
  reduction=None,
  sigmas=DEFAULT_SIGMAS,
  **identity,
) -> Detector:
  """Fits a detector on pooled training features (one (n, C_l) array per level).

  The Gaussians are fitted on all rows; the calibrated threshold comes from
  out-of-fold scores (module docstring). ``identity`` holds the backbone
  fields (arch, checkpoint_sha256, image_size, mean, std, dtype) and ``info``.
  """
  target_fpr = check_target_fpr(target_fpr)
  if len(features) != len(levels):
    raise ValueError(f"expected one feature array per level ({len(levels)}), got {len(features)}")
  n = len(features[0])
  if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
    raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}")
  if n < max(n_folds, 3):
    raise ValueError(
      f"calibrating with {n_folds} folds needs at least {max(n_folds, 3)} training images, got {n}"
    )
  if reduction is not None:
    reduction = {"mode": str(reduction["mode"]), "threshold": float(reduction["threshold"])}
  states, projections = _fit_levels(features, reduction)
  oof = out_of_fold_scores(features, n_folds, reduction)
  threshold = calibrated_threshold(oof, target_fpr)
  notes = fit_warnings(features, levels, target_fpr, threshold)
  for note in notes:
    warnings.warn(note, FitWarning, stacklevel=2)
  identity["info"] = {**(identity.get("info") or {}), "warnings": notes}
  widths = [int(s.mean.shape[0]) for s in states]
  sigma_thresholds = tuple(
    tuple(float(t) for t in np.atleast_1d(metrics.sigma_threshold(np.asarray(sigmas, float), k)))
    for k in widths
  )
  return Detector(
    states=states,
    projections=projections,
    calibration_scores=oof,
    levels=tuple(int(l) for l in levels),
    reduction=reduction,
    threshold=threshold,
    target_fpr=target_fpr,
    n_folds=n_folds,
    sigmas=tuple(int(s) for s in sigmas),
    sigma_thresholds=sigma_thresholds,
    **identity,
  )


def map_settings(arch: str, maps: config.Maps | None = None):
  """Checked ``jax_gad.maps.pipeline.MapSettings`` of ``fit --maps``, from its config section.

  ``maps``: the levels, channels, combine rule, blur sigma and ridge
  (:class:`jax_gad.config.Maps`; None: its defaults). Empty ``map_levels``:
  the arch's default map levels. ValueError (naming the flag) for a bad value.
  """
  from jax_gad.maps import pipeline as mp  # local: the maps import the data package (TFDS)

  maps = config.Maps() if maps is None else maps
  config.validate(maps)
  return mp.settings_for(
    arch, maps.map_levels, maps.map_channels, maps.map_combine, maps.map_sigma, maps.map_ridge
  )


def fit_maps(
  detector: Detector,
  train,
  settings,
  *,
  batch_size: int = config.Backbone.batch_size,
  num_workers: int | None = config.Backbone.num_workers,
):
  """``detector`` plus per-location Gaussians (``settings``, :func:`map_settings`) on ``train``.

  Uses the detector's backbone. The pixel threshold (at
  ``detector.target_fpr``) and the colour scale come from out-of-fold maps
  over the detector's calibration folds (:func:`jax_gad.maps.deploy.calibrate`).
  """
  from jax_gad.data import pipeline  # local: the data package imports TFDS (kept out of --help)
  from jax_gad.maps import deploy  # local: the maps import the data package (TFDS) too

  if detector.backbone is None:
    raise ValueError("fit_maps needs the detector's backbone attached")
  extractor = features.MapExtractor(
    detector.backbone.module,
    detector.backbone.variables,
    image_size=detector.image_size,
    levels=settings.levels,
    channels=settings.channels,
    batch_size=min(batch_size, len(train)),
  )
  model = deploy.calibrate(
    extractor,
    train,
    protocol.folds(len(train), detector.n_folds),
    preprocess=pipeline.image_preprocessor(detector.image_size, detector.mean, detector.std),
    settings=settings,
    target_fpr=detector.target_fpr,
    num_workers=config.worker_count(num_workers),
  )
  return detector.replace(
    map_states=model.states,
    map_settings=deploy.settings_to_json(settings),
    map_threshold=model.threshold,
    map_scale=model.scale,
  )


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


def _arrays(detector: Detector) -> dict:
  out = {"calibration_scores": np.asarray(detector.calibration_scores, np.float64), "levels": {}}
  for i, (state, projection) in enumerate(zip(detector.states, detector.projections)):
    entry = {f"state_{k}": np.asarray(v) for k, v in state._asdict().items()}
    if projection is not None:
      entry["projection_mean"] = np.asarray(projection.mean)
      entry["projection_components"] = np.asarray(projection.components)
    out["levels"][str(i)] = entry
  if detector.map_states:
    out["maps"] = {
      str(i): {k: np.asarray(v) for k, v in state._asdict().items()}
      for i, state in enumerate(detector.map_states)
    }
  return out


_HEADER_FIELDS = (
  "arch",
  "checkpoint_sha256",
  "image_size",
  "mean",
  "std",
  "dtype",
  "levels",
  "reduction",
  "aggregation",
  "threshold",
  "target_fpr",
  "n_folds",
  "sigmas",
  "sigma_thresholds",
  "info",
)
# Written only by a detector fitted with maps; absent from the others' headers.
_MAP_HEADER_FIELDS = ("map_settings", "map_threshold", "map_scale")


def save_detector(detector: Detector, path) -> None:
  """Writes ``detector`` to ``path`` atomically; the folder is created if missing."""
  payload = flax.serialization.msgpack_serialize(_arrays(detector))
  header = {name: getattr(detector, name) for name in _HEADER_FIELDS}
  if detector.map_states:
    header.update({name: getattr(detector, name) for name in _MAP_HEADER_FIELDS})
  path = os.path.expanduser(os.fspath(path))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_write(path, encode(header, payload))


def _canonical(header: dict) -> bytes:
  return json.dumps(header, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def encode(fields: dict, payload: bytes) -> bytes:
  """The file's bytes for header ``fields`` and ``payload``, with format, length and checksum."""
  header = dict(fields)
  header.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, payload_bytes=len(payload))
  header.pop("content_sha256", None)
  header["content_sha256"] = _sha256(_canonical(header) + b"\n" + payload)
  return _canonical(header) + b"\n" + payload


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _read_header(path: str, blob: bytes) -> tuple[dict, bytes]:
  """(header, payload) of a detector file's bytes, checked: format, version, length, checksum."""
  bad = f"{path}: not a jax_gad detector file"
  newline = blob.find(b"\n", 0, _MAX_HEADER)
  if newline < 0:
    raise ValueError(f"{bad} (no header line)")
  try:
    header = json.loads(blob[:newline].decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    raise ValueError(f"{bad} (header is not JSON)") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
    raise ValueError(
      f"{bad} (format {header.get('format') if isinstance(header, dict) else None!r}"
      f", expected {FORMAT_NAME!r})"
    )
  version = header.get("format_version")
  if version != FORMAT_VERSION:
    why = " (version 1 has no checksum over its header)" if version == 1 else ""
    raise ValueError(
      f"{path}: detector format_version {version!r}{why}; this jax_gad reads version "
      f"{FORMAT_VERSION}: fit the detector again"
    )
  payload = blob[newline + 1 :]
  if len(payload) != header.get("payload_bytes"):
    raise ValueError(
      f"{path}: detector file is truncated or padded ({len(payload)} payload "
      f"bytes, the header says {header.get('payload_bytes')})"
    )
  claimed = header.pop("content_sha256", None)
  try:
    actual = _sha256(_canonical(header) + b"\n" + payload)
  except ValueError:  # NaN or inf in the header: not what save writes
    actual = None
  if actual != claimed:
    raise ValueError(
      f"{path}: detector file is corrupt or was edited (content sha256 of the header and "
      "payload differs from the header's content_sha256)"
    )
  return header, payload


def read_detector(path) -> Detector:
  """Reads a detector file without attaching a backbone; refuses anything not written by save."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    raise ValueError(f"--detector={path} is a folder; give the file written by jax_gad.fit")
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except FileNotFoundError:
    raise ValueError(f"--detector={path} does not exist") from None
  header, payload = _read_header(path, blob)
  try:
    arrays = flax.serialization.msgpack_restore(payload)
    states, projections = [], []
    for i in range(len(arrays["levels"])):
      entry = arrays["levels"][str(i)]
      states.append(
        gaussian.GaussianState(
          **{k: np.asarray(entry[f"state_{k}"]) for k in gaussian.GaussianState._fields}
        )
      )
      projections.append(
        pca.Projection(
          np.asarray(entry["projection_mean"]), np.asarray(entry["projection_components"])
        )
        if "projection_mean" in entry
        else None
      )
    fields = {name: header[name] for name in _HEADER_FIELDS}
    for name in ("mean", "std", "levels", "sigmas"):
      fields[name] = tuple(fields[name])
    fields["sigma_thresholds"] = tuple(tuple(r) for r in fields["sigma_thresholds"])
    fields.update(_read_maps(arrays, header))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(
      f"{path}: not a jax_gad detector file (missing or malformed field: {e})"
    ) from None
  det = Detector(
    states=tuple(states),
    projections=tuple(projections),
    calibration_scores=np.asarray(arrays["calibration_scores"]),
    **fields,
  )
  check_detector(det, where=path)
  return det


def _number(value, integer: bool = False) -> bool:
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def _check_identity(det: Detector, bad) -> None:
  """The backbone fields: arch, image_size, mean / std, dtype."""
  if not isinstance(det.arch, str) or det.arch not in efficientnet.ARCHS:
    bad("arch", f"{det.arch!r} is not one of {', '.join(efficientnet.ARCHS)}")
  if not _number(det.image_size, integer=True) or det.image_size < 16:
    bad("image_size", f"{det.image_size!r} is not an integer >= 16")
  for name in ("mean", "std"):
    values = getattr(det, name)
    if len(values) != 3 or not all(_number(v) for v in values):
      bad(name, f"{list(values)!r} is not 3 finite numbers (one per RGB channel)")
  if not all(v > 0 for v in det.std):
    bad("std", f"{list(det.std)!r} has a value <= 0")
  if det.dtype not in ("float32", "bfloat16"):
    bad("dtype", f"{det.dtype!r} is not float32 or bfloat16")


def _check_levels(det: Detector, bad) -> None:
  """Levels against the arrays: one state per level, widths those of the arch's level maps."""
  levels = det.levels
  if (
    not levels
    or not all(_number(l, integer=True) and 0 <= l < efficientnet.NUM_LEVELS for l in levels)
    or len(set(levels)) != len(levels)
  ):
    bad("levels", f"{list(levels)!r} is not a list of distinct level indices 0..8")
  if len(det.states) != len(levels) or len(det.projections) != len(levels):
    bad("levels", f"{len(levels)} levels but the arrays hold {len(det.states)}")
  widths = efficientnet.level_widths(det.arch)
  if (det.reduction is None) != all(p is None for p in det.projections):
    bad("reduction", f"{det.reduction!r} does not match the arrays' projections")
  for level, state, projection in zip(levels, det.states, det.projections):
    width = np.shape(state.mean)[0] if np.ndim(state.mean) == 1 else None
    expected = widths[level] if projection is None else np.shape(projection.components)[0]
    if projection is not None and np.shape(projection.mean) != (widths[level],):
      bad(
        "levels",
        f"level {level} has {widths[level]} channels in {det.arch}, but its "
        f"projection is for {np.shape(projection.mean)[0]}",
      )
    if width != expected or np.shape(state.factor) != (expected, expected):
      bad(
        "levels",
        f"level {level} has {expected} features in {det.arch}, but its fitted state has {width}",
      )


def _check_calibration(det: Detector, bad) -> None:
  """threshold, target_fpr, n_folds, sigmas and their thresholds, the out-of-fold scores."""
  if det.aggregation != "mean":
    bad("aggregation", f"{det.aggregation!r} is not 'mean'")
  if det.reduction is not None and (
    not isinstance(det.reduction, dict)
    or det.reduction.get("mode") not in ("pca", "npca")
    or not _number(det.reduction.get("threshold"))
    or not 0 < det.reduction["threshold"] < 1
  ):
    bad(
      "reduction", f"{det.reduction!r} is not {{'mode': 'pca' | 'npca', 'threshold': t in (0, 1)}}"
    )
  if not _number(det.target_fpr) or not 0 < det.target_fpr < 1:
    bad("target_fpr", f"{det.target_fpr!r} is not in (0, 1)")
  if not _number(det.threshold):
    bad("threshold", f"{det.threshold!r} is not a finite number")
  if not _number(det.n_folds, integer=True) or det.n_folds < 2:
    bad("n_folds", f"{det.n_folds!r} is not an integer >= 2")
  scores = np.asarray(det.calibration_scores)
  if scores.ndim != 1 or len(scores) < det.n_folds or not np.all(np.isfinite(scores)):
    bad("calibration_scores", f"shape {scores.shape} is not n >= {det.n_folds} finite scores")
  expected = calibrated_threshold(scores, det.target_fpr)
  if det.threshold != expected:
    bad(
      "threshold",
      f"{det.threshold!r} is not the target_fpr={det.target_fpr} quantile "
      f"{expected!r} of the {len(scores)} stored out-of-fold scores",
    )
  n_train = det.info.get("n_train") if isinstance(det.info, dict) else None
  if n_train is not None and n_train != len(scores):
    bad("info", f"n_train {n_train!r} differs from the {len(scores)} out-of-fold scores")
  sigmas, rows = det.sigmas, det.sigma_thresholds
  if not sigmas or not all(_number(v, integer=True) and v > 0 for v in sigmas):
    bad("sigmas", f"{list(sigmas)!r} is not a list of positive integers")
  if len(rows) != len(det.levels) or any(
    len(r) != len(sigmas) or not all(_number(v) for v in r) for r in rows
  ):
    bad("sigma_thresholds", f"expected {len(det.levels)} rows of {len(sigmas)} finite numbers")


def check_detector(det: Detector, where: str = "detector") -> None:
  """Checks the header's fields against each other and against the arrays (module docstring).

  Raises:
    ValueError: one line naming ``where``, the field and the numbers.
  """

  def bad(field, what):
    raise ValueError(f"{where}: header field {field!r}: {what}")

  _check_identity(det, bad)
  _check_levels(det, bad)
  _check_calibration(det, bad)


def check_backbone(det: Detector, meta: dict, path: str, where: str = "detector") -> None:
  """The detector's arch and mean / std against the checkpoint's metadata (before compiling)."""
  if meta.get("arch", det.arch) != det.arch:
    raise ValueError(f"{where} is for {det.arch}, but {path} holds {meta['arch']} weights")
  for name in ("mean", "std"):
    if name in meta and tuple(float(v) for v in meta[name]) != tuple(getattr(det, name)):
      raise ValueError(
        f"{where}: header field {name!r} is {list(getattr(det, name))}, but the checkpoint "
        f"{path} normalises with {name} {[float(v) for v in meta[name]]}"
      )


def _read_maps(arrays: dict, header: dict) -> dict:
  """The map fields of a file's arrays and header ({} for a detector fitted without maps)."""
  if "maps" not in arrays:
    return {}
  from jax_gad.maps import fit as mfit  # local: only files with maps need them

  states = tuple(
    mfit.MapState(**{k: np.asarray(arrays["maps"][str(i)][k]) for k in mfit.MapState._fields})
    for i in range(len(header["map_settings"]["levels"]))
  )
  return {
    "map_states": states,
    "map_settings": header["map_settings"],
    "map_threshold": float(header["map_threshold"]),
    "map_scale": tuple(float(v) for v in header["map_scale"]),
  }


def attach_backbone(
  detector: Detector,
  checkpoint=None,
  checkpoint_dir=config.Backbone.checkpoint_dir,
  depthwise=None,
  where: str = "detector",
) -> Detector:
  """Loads the detector's backbone and checks it is the checkpoint the detector was fitted with."""
  backbone, meta, sha = backbone_lib.load_backbone(
    detector.arch, checkpoint, checkpoint_dir, detector.dtype, depthwise
  )
  if sha != detector.checkpoint_sha256:
    raise ValueError(
      f"{where} was fitted with {detector.arch} checkpoint sha256 "
      f"{detector.checkpoint_sha256[:16]}..., but {backbone.path} has sha256 {sha[:16]}...: "
      "pass the matching --checkpoint or fit the detector again"
    )
  check_backbone(detector, meta, backbone.path, where)
  return detector.replace(backbone=backbone)


def load_detector(
  path, checkpoint=None, checkpoint_dir=config.Backbone.checkpoint_dir, depthwise=None
) -> Detector:
  """Reads a detector file and attaches its backbone (checked by sha256).

  Args:
    path: a file written by ``Detector.save``.
    checkpoint: the converted weights; default ``<checkpoint_dir>/<arch>.msgpack``
      (Lite0-2 converted there on first use).
    checkpoint_dir: see ``checkpoint``.
    depthwise: depthwise-convolution implementation (None: the backend's default).

  Raises:
    ValueError: a one-line message naming the file: missing, truncated,
      corrupt, foreign, another format version, or a checkpoint whose sha256
      differs from the one the detector was fitted with.
  """
  detector = read_detector(path)
  return attach_backbone(
    detector, checkpoint, checkpoint_dir, depthwise, where=f"detector {os.fspath(path)}"
  )
