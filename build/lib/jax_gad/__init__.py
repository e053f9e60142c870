"""jax_gad: Gaussian anomaly detection on pre-trained EfficientNet features, in JAX.

Rippel, Mertens, Merhof, "Modeling the Distribution of Normal Data in
Pre-Trained Deep Features for Anomaly Detection", ICPR 2020.
"""

__version__ = "0.1.0"
