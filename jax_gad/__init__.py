"""jax_gad: Gaussian anomaly detection on pre-trained EfficientNet features, in JAX.

Rippel, Mertens, Merhof, "Modeling the Distribution of Normal Data in
Pre-Trained Deep Features for Anomaly Detection", ICPR 2020.

Lazily exported (``import jax_gad`` stays light): ``jax_gad.fit_detector(cfg)
-> Detector`` (:func:`jax_gad.fitting.fit`, ``cfg`` a :class:`jax_gad.config.Fit`),
``jax_gad.load_detector(path)``, ``jax_gad.Detector``.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["Detector", "fit_detector", "load_detector", "versions"]

# Lazy exports: name -> (module, attribute).
_EXPORTS = {
  "Detector": ("jax_gad.detector", "Detector"),
  "load_detector": ("jax_gad.detector", "load_detector"),
  "fit_detector": ("jax_gad.fitting", "fit"),
}


def versions() -> dict:
  """The jax_gad, jax and flax versions, as recorded with results and detectors."""
  import flax  # here, not at the top: `import jax_gad` stays light
  import jax  # likewise

  return {"jax_gad": __version__, "jax": jax.__version__, "flax": flax.__version__}


def __getattr__(name):
  if name in _EXPORTS:
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f"module 'jax_gad' has no attribute {name!r}")
