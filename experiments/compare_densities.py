r"""Table-2-style comparison of density models: levels x density, image AUROC (%).

Reads the results.json of runs that differ only in --density and prints one
markdown table (mean ± SEM over categories x folds, from each run's table1):
the Gaussian's Mahalanobis distance, and the negative log-likelihood of the
other densities.

  python experiments/compare_densities.py gaussian=runs/demo gmm=runs/demo_gmm flow=runs/demo_flow
"""

import json
import os
import sys

SCORE = {'gaussian': 'mahalanobis'}


def _cell(row, score):
  mean, sem = row.get(f'{score}_mean'), row.get(f'{score}_sem')
  if mean is None:
    return '-'
  return f'{mean:.1f}' if sem is None else f'{mean:.1f} ± {sem:.1f}'


def main(argv):
  if len(argv) < 2 or any('=' not in a for a in argv[1:]):
    sys.exit(__doc__)
  runs = []
  for arg in argv[1:]:
    name, workdir = arg.split('=', 1)
    with open(os.path.join(workdir, 'results.json')) as f:
      doc = json.load(f)
    density = (doc['config'].get('density') or {}).get('name', 'gaussian')
    runs.append((name, SCORE.get(density, 'nll'), {r['level']: r for r in doc['table1']}))
  levels = list(runs[0][2])
  print('| Level | ' + ' | '.join(f'{n} ({s})' for n, s, _ in runs) + ' |')
  print('|---|' + '---|' * len(runs))
  for level in levels:
    label = 'Sum' if level == 'sum' else str(level)
    print(f'| {label} | ' + ' | '.join(_cell(t.get(level, {}), s) for _, s, t in runs) + ' |')


if __name__ == '__main__':
  main(sys.argv)
