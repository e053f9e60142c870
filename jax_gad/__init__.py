"""jax_gad: Gaussian anomaly detection on pre-trained EfficientNet features, in JAX.

Rippel, Mertens, Merhof, "Modeling the Distribution of Normal Data in
Pre-Trained Deep Features for Anomaly Detection", ICPR 2020.

Lazily exported (``import jax_gad`` stays light): ``jax_gad.fit(category, ...)
-> Detector``, ``jax_gad.load_detector(path)``, ``jax_gad.Detector``.
"""

__version__ = "0.1.0"

__all__ = ["Detector", "fit", "load_detector", "versions"]


def versions() -> dict:
  """The jax_gad, jax and flax versions, as recorded with results and detectors."""
  import flax
  import jax

  return {"jax_gad": __version__, "jax": jax.__version__, "flax": flax.__version__}


def __getattr__(name):
  if name == "fit":
    import importlib

    return importlib.import_module("jax_gad.fit")  # a callable module: jax_gad.fit(...) fits
  if name in ("Detector", "load_detector"):
    from jax_gad import detector

    return getattr(detector, name)
  raise AttributeError(f"module 'jax_gad' has no attribute {name!r}")
