"""jax_gad: Gaussian anomaly detection on pre-trained EfficientNet features, in JAX.

Rippel, Mertens, Merhof, "Modeling the Distribution of Normal Data in
Pre-Trained Deep Features for Anomaly Detection", ICPR 2020.

Lazily exported (``import jax_gad`` stays light): ``jax_gad.load_detector(path)``,
``jax_gad.Detector``. Fitting one: ``jax_gad.fit`` (``import jax_gad.fit``).
"""

__version__ = "0.1.0"

__all__ = ["Detector", "load_detector", "versions"]


def versions() -> dict:
  """The jax_gad, jax and flax versions, as recorded with results and detectors."""
  import flax  # local (both): `import jax_gad` stays light
  import jax

  return {"jax_gad": __version__, "jax": jax.__version__, "flax": flax.__version__}


def __getattr__(name):
  if name in ("Detector", "load_detector"):
    from jax_gad import detector  # local: `import jax_gad` must not load JAX and the network

    return getattr(detector, name)
  raise AttributeError(f"module 'jax_gad' has no attribute {name!r}")
