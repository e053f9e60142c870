r"""How well the calibrated threshold keeps its false-positive rate, on the synthetic set.

  python experiments/calibration_study.py --arch=efficientnet-lite0 --tfds_dir=/tmp/tfds

For each synthetic category: a detector fitted on the 60 training images
(:func:`jax_gad.detector.fit_features`, every level) at each target FPR; its
FPR on the out-of-fold scores, on the test split's good images and on a
held-out good split (``--heldout_images`` more training-distribution images,
drawn with seed 1, never fitted on), and its TPR on the test defects; the
same for the 3-sigma chi-squared threshold. Prints a markdown table (the one
in docs/own-images.md, "Thresholds from normal data only"); ``--json`` also
writes the rows.
"""

import argparse
import json
import os
import sys

import numpy as np

from jax_gad import data, features, files
from jax_gad import detector as detector_lib
from jax_gad.data import pipeline, synthetic_ad
from jax_gad.models import efficientnet

TARGETS = (0.01, 0.05, 0.1)
LEVELS = tuple(range(efficientnet.NUM_LEVELS))


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--arch', default='efficientnet-lite0', choices=sorted(efficientnet.ARCHS))
  p.add_argument('--checkpoint', default=None, help='Converted weights (default: checkpoint_dir).')
  p.add_argument('--checkpoint_dir', default='checkpoints')
  p.add_argument('--tfds_dir', default=None, help='Where the synthetic splits are prepared.')
  p.add_argument('--image_size', type=int, default=None, help="Default: the checkpoint's.")
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--target_fprs', default=','.join(str(t) for t in TARGETS))
  p.add_argument('--heldout_images', type=int, default=100, help='Held-out good images.')
  p.add_argument('--categories', default='texture,object')
  p.add_argument('--n_train', type=int, default=None, help="Default: the synthetic set's.")
  p.add_argument('--n_test', type=int, default=None, help="Default: the synthetic set's.")
  p.add_argument('--size', type=int, default=None, help="Image side; default: the set's.")
  p.add_argument('--json', default=None, help='Also write the rows here.')
  args = p.parse_args(argv)
  args.target_fprs = tuple(float(t) for t in args.target_fprs.split(','))
  if not all(0 < t < 1 for t in args.target_fprs):
    p.error(f'--target_fprs must lie in (0, 1), got {args.target_fprs}')
  if args.heldout_images < 1:
    p.error(f'--heldout_images must be >= 1, got {args.heldout_images}')
  return args


def _split(args, name, category, seed, n_train, n_test, which):
  """One split of a synthetic variant, prepared on first use."""
  given = (('n_train', n_train), ('n_test', n_test), ('size', args.size))
  kw = {k: v for k, v in given if v is not None}
  cfg = synthetic_ad.SyntheticAdConfig(name=name, category=category, seed=seed, **kw)
  builder = synthetic_ad.SyntheticAd(config=cfg, data_dir=args.tfds_dir, file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare()
  return data.Split.from_builder(builder, which)


def _row(det, category, target, scores, good, counts) -> dict:
  """FPRs and TPRs of ``det``'s threshold and of the 3-sigma threshold."""
  s_te, s_ho = scores
  sig = det.threshold_for(3)
  return {
    'category': category,
    'target_fpr': target,
    'threshold': det.threshold,
    'oof_fpr': float(np.mean(det.calibration_scores > det.threshold)),
    'test_good_fpr': float(np.mean(s_te[good] > det.threshold)),
    'heldout_fpr': float(np.mean(s_ho > det.threshold)),
    'tpr': float(np.mean(s_te[~good] > det.threshold)),
    'sigma3_heldout_fpr': float(np.mean(s_ho > sig)),
    'sigma3_tpr': float(np.mean(s_te[~good] > sig)),
    **counts,
  }


def measure(args) -> list[dict]:
  """One row per (category, target FPR); see the module docstring."""
  backbone, meta, sha = detector_lib.load_backbone(args.arch, args.checkpoint, args.checkpoint_dir)
  side = int(args.image_size or meta['resolution'])
  extractor = features.LevelExtractor(
    backbone.module, backbone.variables, image_size=side, levels=LEVELS, batch_size=args.batch_size
  )

  def pooled(split):
    return pipeline.pooled_features(
      extractor, split, image_size=side, mean=meta['mean'], std=meta['std'], progress=False
    )

  rows = []
  for category in args.categories.split(','):
    sizes = (args.n_train, args.n_test, args.size)
    name = f'cal_{category}_' + ('_'.join(map(str, sizes)) if any(sizes) else 'default')
    train = _split(args, name, category, 0, args.n_train, args.n_test, 'train')
    test = _split(args, name, category, 0, args.n_train, args.n_test, 'test')
    held_name = f'heldout_{category}_{args.heldout_images}_{args.size}'
    held = _split(args, held_name, category, 1, args.heldout_images, 0, 'train')
    ftr, fte, fho = pooled(train), pooled(test), pooled(held)
    good = np.asarray(test.labels) == 0
    counts = {
      'n_train': len(train),
      'n_test_good': int(good.sum()),
      'n_defect': int((~good).sum()),
      'n_heldout': len(held),
    }
    for target in args.target_fprs:
      det = detector_lib.fit_features(
        ftr,
        levels=LEVELS,
        target_fpr=target,
        arch=args.arch,
        checkpoint_sha256=sha,
        image_size=side,
      )
      scores = (det.score_features(fte).total, det.score_features(fho).total)
      rows.append(_row(det, category, target, scores, good, counts))
  return rows


def table(rows: list[dict]) -> str:
  """The markdown table of docs/own-images.md."""
  lines = [
    '| category | target FPR | OOF FPR | FPR test good | FPR held-out good | TPR | '
    '3-sigma FPR held-out | 3-sigma TPR |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r["category"]} | {r["target_fpr"]:.2f} | {r["oof_fpr"]:.2f} | '
      f'{r["test_good_fpr"]:.2f} ({r["n_test_good"]}) | {r["heldout_fpr"]:.2f} '
      f'({r["n_heldout"]}) | {r["tpr"]:.2f} ({r["n_defect"]}) | '
      f'{r["sigma3_heldout_fpr"]:.2f} | {r["sigma3_tpr"]:.2f} |'
    )
  return '\n'.join(lines)


def main(argv) -> int:
  args = parse(argv)
  try:
    rows = measure(args)
  except (ValueError, OSError) as e:
    print(f'calibration_study: error: {e}', file=sys.stderr)
    return 1
  print(table(rows))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    files.atomic_write(args.json, json.dumps(rows, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
