"""What a command's console shows: jax_gad's own lines, not the chatter of the libraries below.

absl's ``app.run`` lowers the logging threshold to INFO once the flags are
parsed, which lets every library's INFO lines through: JAX's probe of a TPU
backend that is not there ("Unable to initialize backend 'tpu'"), TFDS's
build steps ("Generating dataset", "Done writing", "Load dataset info") and
matplotlib's font cache. Each command calls :func:`quiet_third_party_logs`
once, first thing in its ``main``; the libraries' warnings and errors still
show, and so do jax_gad's own INFO lines (compile times, cache misses).
"""

import logging

# Loggers that carry only other libraries' INFO lines. jax_gad logs through the
# standard ``logging`` module, never through absl's logger, which TFDS uses.
THIRD_PARTY_LOGGERS = ("jax", "absl", "matplotlib", "PIL")


def quiet_third_party_logs(level: int = logging.WARNING) -> None:
  """Lets only ``level`` and above through :data:`THIRD_PARTY_LOGGERS`; jax_gad's untouched."""
  for name in THIRD_PARTY_LOGGERS:
    logging.getLogger(name).setLevel(level)
