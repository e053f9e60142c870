r"""Runs the Gaussian AD protocol and writes the paper's tables.

  python -m jax_gad.main --flagfile=experiments/demo.cfg
  python -m jax_gad.main --flagfile=experiments/mvtec.cfg --data_dir=/data/mvtec_anomaly_detection

Flags -> :class:`jax_gad.config.Experiment` -> :func:`jax_gad.experiment.run`
(checks, features, a density per fold and level, the reports in ``--workdir``)
-> the tables printed.
"""

from __future__ import annotations

import os
import sys

from absl import app

from jax_gad import cli, compile_cache, config, console

# This command's own sections (the shared ones are jax_gad.cli's).
cli.define(config.Maps)
cli.define(config.Protocol)
cli.define(config.Plots)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  from jax_gad import experiment  # imports TFDS: kept out of --help

  try:
    cli.initialize_multihost()
    cfg = cli.build(config.Experiment)
    compiled = compile_cache.enable(cfg.backbone.compile_cache)
    doc = experiment.run(cfg)
  except (ValueError, OSError, ImportError, MemoryError) as e:  # bad input: say what, no traceback
    sys.exit(f"jax_gad.main: error: {e}")
  except KeyboardInterrupt:
    print("jax_gad.main: interrupted; the workdir was left as it was.", file=sys.stderr)
    sys.exit(130)
  print(experiment.summary(cfg, doc))
  print(f"Wrote results.json, tables and plots to {os.path.abspath(cfg.protocol.workdir)}")
  print(compiled.summary())


def run_cli():
  """Console-script entry point (``jax-gad``)."""
  cli.show_in_help(config.Experiment, cli.MULTIHOST_FLAGS)
  app.run(main)


if __name__ == "__main__":
  run_cli()
