"""Reporting of anomaly maps: the ``maps`` entry of results.json, the maps table, the files.

A run's maps outputs, beside the pooled reports of :mod:`jax_gad.report`:
``maps.md`` and ``maps.csv`` (per category and overall, mean ± SEM over folds
of image AUROC from the map maximum, pixel AUROC and AUPRO), overlay PNGs of
a documented subset of test images (first evaluated fold), and with
``--save_maps`` every fold's maps as ``maps_<category>.npz``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jax_gad import files, metrics, report
from jax_gad.maps import metrics as mmetrics
from jax_gad.maps import overlay as moverlay
from jax_gad.maps import postprocess


def summarize(runs: Sequence) -> list[dict]:
  """Per category and overall: mean ± SEM (x100) over folds of the three map metrics.

  Args:
    runs: :class:`jax_gad.maps.pipeline.FoldMaps` of every (category, fold).
  """
  rows = []
  categories = sorted({r.category for r in runs})
  for name, sel in [(c, [r for r in runs if r.category == c]) for c in categories] + [
    ('mean', list(runs))
  ]:
    row = {'category': name}
    for field in ('image_auroc', 'pixel_auroc', 'aupro'):
      values = [100 * getattr(r, field) for r in sel if getattr(r, field) is not None]
      if values:
        row[f'{field}_mean'], row[f'{field}_sem'] = metrics.mean_sem(values)
      else:
        row[f'{field}_mean'] = row[f'{field}_sem'] = None
    rows.append(row)
  return rows


def overlay_paths(category: str, source, per_type: int = 2) -> list[str]:
  """Workdir-relative paths of the overlays :func:`write_overlays` writes for ``source``."""
  chosen = moverlay.select(list(source.defect_types), per_type)
  return [
    os.path.join('overlays', category, moverlay.file_name(i, source.file_names[i])) for i in chosen
  ]


def document(settings, k_channels: int | None, outputs: dict) -> dict:
  """The ``maps`` entry of results.json.

  Args:
    settings: the run's :class:`jax_gad.maps.pipeline.MapSettings`.
    k_channels: ``--map_channels`` (None: every channel).
    outputs: per category, its :class:`jax_gad.maps.pipeline.CategoryMaps`.
  """
  runs = [r for out in outputs.values() for r in out.runs]
  return {
    'levels': list(settings.levels),
    'channels': k_channels,
    'combine': settings.rule,
    'sigma': settings.sigma,
    'ridge': settings.ridge,
    'fpr_limit': mmetrics.DEFAULT_FPR_LIMIT,
    'runs': [r._asdict() for r in runs],
    'per_category': summarize(runs),
    'no_masks': sorted(c for c, out in outputs.items() if not out.has_masks),
    'overlays': {c: overlay_paths(c, out.test) for c, out in outputs.items()},
  }


def _cell(mean, sem) -> str:
  return 'no masks' if mean is None else report.fmt_cell(mean, sem)


def table_markdown(rows: Sequence[dict], pooled: dict | None = None) -> str:
  """Markdown: per category, image AUROC (pooled Sum, map max), pixel AUROC, AUPRO."""
  lines = [
    '| Category | Image AUROC (pooled) | Image AUROC (map max) | Pixel AUROC | AUPRO |',
    '|---|---|---|---|---|',
  ]
  for row in rows:
    pooled_cell = (pooled or {}).get(row['category'], '-')
    lines.append(
      f"| {row['category']} | {pooled_cell} | "
      f"{_cell(row['image_auroc_mean'], row['image_auroc_sem'])} | "
      f"{_cell(row['pixel_auroc_mean'], row['pixel_auroc_sem'])} | "
      f"{_cell(row['aupro_mean'], row['aupro_sem'])} |"
    )
  return '\n'.join(lines) + '\n'


def _pooled_cells(doc) -> dict:
  """Sum-row Mahalanobis cells of the pooled tables, per category and overall."""
  cells = {}
  for row in doc['per_category']:
    if row['level'] == report.SUM and 'mahalanobis_mean' in row:
      cells[row['category']] = report.fmt_cell(row['mahalanobis_mean'], row['mahalanobis_sem'])
  for row in doc['table1']:
    if row['level'] == report.SUM and 'mahalanobis_mean' in row:
      cells['mean'] = report.fmt_cell(row['mahalanobis_mean'], row['mahalanobis_sem'])
  return cells


def table(doc) -> str:
  """The per-category maps table (markdown) of a results document with ``maps``."""
  text = table_markdown(doc['maps']['per_category'], _pooled_cells(doc))
  if doc['maps']['no_masks']:
    text += '\nNo defect masks (image metrics only): ' + ', '.join(doc['maps']['no_masks']) + '\n'
  return text


def write_overlays(folder: str, category: str, out, fold: int, per_type: int = 2) -> None:
  """Overlay PNGs of the documented subset (:func:`jax_gad.maps.overlay.select`), one fold.

  Args:
    folder: the run's output folder; the PNGs go to ``overlays/<category>/``.
    category: name.
    out: the category's :class:`jax_gad.maps.pipeline.CategoryMaps`; its first maps are drawn.
    fold: the fold number of those maps (in the titles).
    per_type: images per defect type.
  """
  source = out.test
  chosen = moverlay.select(list(source.defect_types), per_type)
  if not chosen:
    return
  full = postprocess.to_original(out.maps[0][chosen], [out.sizes[i] for i in chosen])
  vmin, vmax = out.scale  # from normal images (jax_gad.maps.pipeline.normal_scale)
  sub = os.path.join(folder, 'overlays', category)
  os.makedirs(sub, exist_ok=True)
  for j, i in enumerate(chosen):
    name = moverlay.file_name(i, source.file_names[i])
    title = f'{category} / {source.defect_types[i]} (fold {fold}), max {float(full[j].max()):.2f}'
    moverlay.write_overlay(
      os.path.join(sub, name),
      source[i]['image'],
      full[j],
      out.masks[i],
      vmin=vmin,
      vmax=vmax,
      title=title,
    )


def save_maps(folder: str, category: str, maps: np.ndarray, folds: Sequence[int], source) -> str:
  """Writes ``maps_<category>.npz``: one (n_test, S, S) float32 array per fold + names, labels."""
  path = os.path.join(folder, f'maps_{category}.npz')
  arrays = {f'fold_{f}': maps[k] for k, f in enumerate(folds)}
  arrays['file_names'] = np.asarray(source.file_names)
  arrays['labels'] = np.asarray(source.labels)
  files.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
  return path


def write_outputs(
  folder: str, doc: dict, outputs: dict, folds: Sequence[int], save_raw: bool
) -> None:
  """Overlays (first evaluated fold), raw maps if asked, and the maps table."""
  for c, out in outputs.items():
    write_overlays(folder, c, out, folds[0])
    if save_raw:
      save_maps(folder, c, out.maps, folds, out.test)
  files.atomic_write(os.path.join(folder, 'maps.md'), table(doc))
  files.atomic_write(os.path.join(folder, 'maps.csv'), report.csv_text(doc['maps']['per_category']))
