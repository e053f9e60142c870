"""``python -m jax_gad.benchmark``: see :mod:`jax_gad.benchmark.cli`."""

from jax_gad.benchmark.cli import run

if __name__ == "__main__":
  run()
