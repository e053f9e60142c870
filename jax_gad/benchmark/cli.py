"""The benchmark's command line: ``python -m jax_gad.benchmark [--flags] [--json=FILE]``.

The defaults of every flag are those of :class:`jax_gad.benchmark.run.Config`;
the options it shares with jax_gad's commands (``run.SHARED_OPTIONS``: ``--arch``,
``--image_size``, ``--num_workers``, ``--seed``) and the
multi-host flags are the shared flags of :mod:`jax_gad.cli`, whose defaults and
rules are :mod:`jax_gad.config`'s.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
import jax

from jax_gad import cli, config
from jax_gad.benchmark.report import format_report, write_json
from jax_gad.benchmark.run import Config, run_benchmark

_D = Config()
_ON_OFF = ['auto', 'on', 'off']

cli.DEFINE_int_list('batch_sizes', list(_D.batch_sizes), 1, 1 << 16, 'Global batch sizes.')
cli.DEFINE_enum_list('dtypes', list(_D.dtypes), config.DTYPES, 'Backbone dtypes.')
cli.DEFINE_enum_list(
  'depthwise_impls',
  list(_D.depthwise_impls),
  ['default', 'shift', 'xla'],
  "Depthwise implementations to time ('default': the backend's).",
)
flags.DEFINE_integer(
  'num_batches',
  _D.num_batches,
  'Timed batches per configuration (after one warm-up batch).',
  lower_bound=1,
)
flags.DEFINE_enum(
  'torch_reference',
  _D.torch_reference,
  _ON_OFF,
  'Compare with efficientnet_pytorch (auto: when importable).',
)
flags.DEFINE_integer(
  'torch_threads', _D.torch_threads, 'torch.set_num_threads; 0 = os.cpu_count().', lower_bound=0
)
flags.DEFINE_bool('kernel', _D.kernel, 'Benchmark the Gaussian kernels per level width.')
flags.DEFINE_integer('kernel_n_fit', _D.kernel_n_fit, 'Rows per fit.', lower_bound=5)
flags.DEFINE_integer('kernel_n_score', _D.kernel_n_score, 'Rows scored.', lower_bound=1)
cli.DEFINE_int_list(
  'kernel_widths',
  list(_D.kernel_widths),
  1,
  1 << 20,
  'Feature widths of the kernel benchmark; empty = the 9 level widths of --arch.',
  allow_empty=True,
)
flags.DEFINE_integer(
  'repeats', _D.repeats, 'Timed repeats of each kernel measurement.', lower_bound=1
)
flags.DEFINE_float(
  'time_budget_s',
  _D.time_budget_s,
  'Stop repeating a kernel measurement after this many seconds.',
  lower_bound=0,
)
flags.DEFINE_enum(
  'sklearn',
  _D.sklearn,
  _ON_OFF,
  'Compare with scikit-learn LedoitWolf + numpy (auto: when importable).',
)
cli.DEFINE_int_list(
  'sweep_d',
  list(_D.sweep_d),
  1,
  1 << 20,
  'Feature widths D of the fit sweep (empty: none).',
  allow_empty=True,
)
flags.DEFINE_integer('sweep_d_n', _D.sweep_d_n, 'N of the sweep over D.', lower_bound=1)
cli.DEFINE_int_list(
  'sweep_n',
  list(_D.sweep_n),
  1,
  1 << 30,
  'Sample counts N of the fit sweep (empty: none).',
  allow_empty=True,
)
flags.DEFINE_integer('sweep_n_d', _D.sweep_n_d, 'D of the sweep over N.', lower_bound=1)
flags.DEFINE_bool('estimate', _D.estimate, 'Estimate the full MVTec AD protocol time.')
flags.DEFINE_integer(
  'host_image_side',
  _D.host_image_side,
  'Side of the PNG decoded for the host preprocessing cost.',
  lower_bound=1,
)
flags.DEFINE_integer(
  'pipeline_images',
  _D.pipeline_images,
  'Images for the end-to-end decode + extract run (0: skip).',
  lower_bound=0,
)
flags.DEFINE_integer(
  'predict_images',
  _D.predict_images,
  'PNG files (of --host_image_side px) for the predict throughput and single-image latency '
  'run (0: skip).',
  lower_bound=0,
)
flags.DEFINE_integer(
  'predict_calls',
  _D.predict_calls,
  'Time `python -m jax_gad.predict` processes (a real --arch checkpoint in --checkpoint_dir, '
  'synthetic PNGs): 1 image and this many, each with an empty and then a warm compile cache, '
  'best of --repeats (0: skip).',
  lower_bound=0,
)
cli.DEFINE_unique_list(
  'pipeline_archs',
  list(_D.pipeline_archs),
  'More architectures for the end-to-end run, at every batch size and --image_size (default: '
  'each one\'s native size).',
)
flags.DEFINE_integer(
  'versus_rounds',
  _D.versus_rounds,
  'Rounds of jax_gad vs efficientnet_pytorch float32 extraction timed in alternation at every '
  'batch size (0: skip).',
  lower_bound=0,
)
flags.DEFINE_integer(
  'engines_rounds',
  _D.engines_rounds,
  'Rounds of jax_gad vs ONNX Runtime, OpenVINO and PyTorch (float32, same weights, 9 pooled '
  'levels, --torch_threads threads) timed in alternation at every batch size (0: skip).',
  lower_bound=0,
)
cli.DEFINE_unique_list(
  'engines_archs',
  list(_D.engines_archs),
  'Architectures of the --engines_rounds comparison, each at --image_size (default: its '
  'native size).',
)
# --seed (inputs and random weights) is the shared flag of jax_gad.cli.
flags.DEFINE_bool(
  'map_fit',
  _D.map_fit,
  'Add the anomaly-map section: per-location fit memory at --map_counts images (fresh '
  'processes) and fit / score time vs numpy + scikit-learn, Lite0 and B4 map shapes.',
)
cli.DEFINE_int_list(
  'map_counts', list(_D.map_counts), 1, 1 << 20, 'Image counts of the map memory measurement.'
)
flags.DEFINE_bool(
  'density_bench',
  _D.density_bench,
  'Time the density fits (gaussian, gmm, flow; scikit-learn GaussianMixture alongside) per '
  'level width; takes minutes at N=2000.',
)
cli.DEFINE_int_list(
  'density_bench_n', list(_D.density_bench_n), 2, 1 << 24, 'Rows N per density fit.'
)
cli.DEFINE_int_list(
  'density_bench_widths',
  list(_D.density_bench_widths),
  1,
  1 << 16,
  'Widths of the density benchmark; empty = the 9 level widths of --arch.',
  allow_empty=True,
)
flags.DEFINE_integer(
  'density_bench_gmm_k', _D.density_bench_gmm_k, 'GMM components timed.', lower_bound=1
)
flags.DEFINE_integer(
  'density_bench_gmm_iter',
  _D.density_bench_gmm_iter,
  'EM iterations timed (tol=0; ours and scikit-learn from the same initial parameters).',
  lower_bound=1,
)
flags.DEFINE_integer(
  'density_bench_flow_epochs', _D.density_bench_flow_epochs, 'Flow epochs timed.', lower_bound=1
)
flags.DEFINE_bool(
  'density_bench_vmap',
  _D.density_bench_vmap,
  'Also time all levels of the flow in one vmapped program (padded to the widest level).',
)
cli.DEFINE_path('json', None, 'Write the measurements to this JSON file.')

FLAGS = flags.FLAGS


def config(**overrides) -> Config:
  """A benchmark :class:`Config` from the flags, with ``overrides`` on top."""
  return Config(**{**cli.values(Config._fields), **overrides})


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    cli.initialize_multihost()
    result = run_benchmark(config(), log=lambda msg: print(msg, file=sys.stderr, flush=True))
  except (ValueError, OSError) as err:
    sys.exit(f'jax_gad.benchmark: error: {err}')
  if jax.process_index() == 0:
    print(format_report(result))
    if FLAGS.json:
      write_json(FLAGS.json, result)
      print(f'wrote {os.path.abspath(FLAGS.json)}')


def run() -> None:
  """Console-script entry point (``jax-gad-benchmark``)."""
  cli.show_in_help(extra=Config._fields + cli.MULTIHOST_FLAGS + ('json',))
  app.run(main)
