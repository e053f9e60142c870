"""Formats benchmark results as markdown tables and writes them as JSON."""

from __future__ import annotations

import json
import os
from typing import Sequence

from jax_gad import files


def _f(value, fmt='{:.2f}', none='-'):
  return none if value is None else fmt.format(value)


def _ms(value):
  return _f(None if value is None else 1e3 * value, '{:.2f}')


def _pct(value):
  return _f(None if value is None else 100.0 * value, '{:.0f} %')


def _x(value):
  return _f(value, '{:.1f}x')


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def format_report(result: dict) -> str:
  """Markdown tables of a :func:`run_benchmark` result."""
  m = result['machine']
  out = [
    f'Machine: {m.get("cpu_model") or m["processor"]}, {m["cpu_count"]} CPU cores, JAX {m["jax"]} '
    f'{m["backend"]} ({m["device_count"]} x {m["device_kind"]}), '
    f'{m["process_count"]} process(es); load average {m["load_average_start"]} at '
    f'start, {m.get("load_average_end")} at end',
    '',
  ]
  if result['extraction']:
    r0 = result['extraction'][0]
    out.append(
      f'Feature extraction, {r0["arch"]} at {r0["image_size"]}x{r0["image_size"]} '
      '(all 9 levels pooled on device; step = one global batch incl. transfers):'
    )
    rows = []
    for r in result['extraction']:
      rows.append(
        [
          'jax_gad (Flax)',
          r['batch_size'],
          r['dtype'],
          r['depthwise'],
          r['device_count'],
          _f(r['compile_s'], '{:.1f}'),
          _f(r['step_s'], '{:.3f}'),
          _f(r['images_per_s']),
          _x(r['speedup_vs_torch']),
          _pct(r['other_cpu']),
        ]
      )
    for t in result['torch']:
      rows.append(
        [
          f'efficientnet-pytorch ({t["threads"]} threads)',
          t['batch_size'],
          'float32',
          '-',
          '-',
          '-',
          _f(t['step_s'], '{:.3f}'),
          _f(t['images_per_s']),
          '1.0x',
          _pct(t['other_cpu']),
        ]
      )
    out.append(
      _table(
        [
          'implementation',
          'batch',
          'dtype',
          'depthwise',
          'devices',
          'compile s',
          'step s',
          'img/s',
          'vs torch',
          'other CPU',
        ],
        rows,
      )
    )
    if result['torch_skipped']:
      out.append(f'(torch reference skipped: {result["torch_skipped"]})')
    out.append('')
  v = result.get('versus')
  if v is not None:
    out.append(
      f'jax_gad ({v["depthwise"]}) vs efficientnet-pytorch extract_features ({v["threads"]} '
      f'threads), {v["arch"]} at {v["image_size"]}x{v["image_size"]}, float32, timed in '
      f'alternation over {v["rounds"]} rounds, each turn one untimed batch then one timed '
      f'(medians; other CPU {_pct(v["other_cpu"])}); the last two columns are the untimed '
      'first batch of each turn, right after the other framework:'
    )
    rows = [
      [
        r['batch_size'],
        _f(r['images_per_s']),
        _f(r['torch_images_per_s']),
        _f(r['speedup_vs_torch'], '{:.2f}x'),
        _f(r.get('first_call_images_per_s')),
        _f(r.get('torch_first_call_images_per_s')),
      ]
      for r in v['rows']
    ]
    out.append(
      _table(
        [
          'batch',
          'jax_gad img/s',
          'efficientnet-pytorch img/s',
          'ratio',
          'jax_gad first call',
          'torch first call',
        ],
        rows,
      )
    )
    out.append('')
  k = result['kernel']
  if k is not None:
    out.append(
      f'Gaussian kernels per level: fit on N={k["n_fit"]} rows (mean, '
      f'Ledoit-Wolf, precision, std), score {k["n_score"]} rows with '
      'L2+SED+Mahalanobis; scikit-learn LedoitWolf + numpy as reference '
      f'(times in ms, compile excluded; other CPU {_pct(k["total"]["other_cpu"])}):'
    )
    rows = [
      [
        r['level'],
        r['width'],
        _ms(r['jax_fit_s']),
        _ms(r['sklearn_fit_s']),
        _x(r['fit_speedup']),
        _ms(r['jax_score_total_s']),
        _ms(r['numpy_score_total_s']),
        _x(r['score_speedup']),
      ]
      for r in k['levels']
    ]
    t = k['total']
    rows.append(
      [
        'all',
        sum(r['width'] for r in k['levels']),
        _ms(t['jax_fit_s']),
        _ms(t['sklearn_fit_s']),
        _x(t['fit_speedup']),
        _ms(t['jax_score_total_s']),
        _ms(t['numpy_score_total_s']),
        _x(t['score_speedup']),
      ]
    )
    out.append(
      _table(
        [
          'level',
          'D',
          'jax fit',
          'sklearn fit',
          'fit speedup',
          'jax score',
          'numpy score',
          'score speedup',
        ],
        rows,
      )
    )
    out.append('')
  for key, label in (('sweep_d', 'D'), ('sweep_n', 'N')):
    if result[key]:
      fixed = 'N' if key == 'sweep_d' else 'D'
      value = result[key][0]['n' if key == 'sweep_d' else 'd']
      out.append(
        f'Fit sweep over {label} ({fixed}={value}; ms, compile excluded; '
        f'other CPU during the sweeps {_pct(result["sweeps_other_cpu"])}):'
      )
      out.append(
        _table(
          [label, 'jax fit', 'sklearn fit', 'speedup', 'jax compile'],
          [
            [
              r['d' if key == 'sweep_d' else 'n'],
              _ms(r['jax_fit_s']),
              _ms(r['sklearn_fit_s']),
              _x(r['fit_speedup']),
              _ms(r['jax_compile_s']),
            ]
            for r in result[key]
          ],
        )
      )
      out.append('')
  p = result.get('pipeline')
  if p is not None:
    out.append(
      f'End-to-end extraction of {p["n_images"]} {p["side"]}px PNGs (decoded and '
      f'resized by {p["num_workers"]} threads while the device computes, batch '
      f'{p["batch_size"]} {p["dtype"]} {p["depthwise"]}): {p["images_per_s"]:.2f} '
      f'img/s vs {p["device_only_images_per_s"]:.2f} img/s device-only '
      f'(other CPU {_pct(p["other_cpu"])}).'
    )
    out.append('')
  q = result.get('predict')
  if q is not None:
    out.append(
      f'Predict ({q["arch"]} {q["image_size"]}px, `jax_gad.predict` on {q["n_images"]} '
      f'{q["side"]}px PNG files: read, decode, resize, extract, score, write CSV; '
      f'{q["num_workers"]} decode threads): {q["images_per_s"]:.2f} img/s at batch '
      f'{q["batch_size"]}; one image {_ms(q["latency_s"])} ms (batch 1).'
    )
    out.append('')
  m = result.get('predict_maps')
  if m is not None:
    out.append(
      f'Predict with `--maps_dir` ({m["arch"]} {m["image_size"]}px, map levels '
      f'{",".join(map(str, m["map_levels"]))}, {m["n_images"]} {m["side"]}px PNG files; '
      f'a .npy map and a .png overlay per image): {m["maps_images_per_s"]:.2f} img/s, '
      f'against {m["images_per_s"]:.2f} img/s without maps (batch {m["batch_size"]}).'
    )
    out.append('')
  if result.get('pipelines'):
    out.append(
      'End-to-end decode + extract per architecture (in-memory PNGs decoded and resized by '
      'worker threads while the device computes; float32):'
    )
    rows = [
      [
        p['arch'],
        p['image_size'],
        p['batch_size'],
        p['depthwise'],
        f'{p["n_images"]} x {p["side"]}px',
        _f(p['images_per_s']),
        _pct(p['other_cpu']),
      ]
      for p in result['pipelines']
    ]
    out.append(_table(['arch', 'input', 'batch', 'depthwise', 'PNGs', 'img/s', 'other CPU'], rows))
    out.append('')
  e = result['estimate']
  if e is not None:
    row = e['extraction_row']
    out.append(
      f'Full MVTec AD protocol estimate ({e["categories"]} categories x '
      f'{e["folds"]} folds, {e["levels"]} levels, {e["distances"]} distances; '
      f'{row["arch"]} {row["image_size"]}px batch {row["batch_size"]} '
      f'{row["dtype"]} on {row["device_count"]} device(s)):'
    )
    out.append(
      _table(
        ['part', 'count', 'seconds'],
        [
          ['backbone compile', 1, _f(e['compile_s'], '{:.1f}')],
          [
            'feature extraction'
            + (' (end-to-end pipeline rate)' if e['pipeline_images_per_s'] else ' (device only)'),
            f'{e["images"]} images',
            _f(e['extraction_s'], '{:.1f}'),
          ],
          [
            'PNG decode + resize (host)',
            f'{e["images"]} images',
            _f(e['host_preprocess_s'], '{:.1f}'),
          ],
          ['Gaussian fits', e['fits'], _f(e['fit_s'], '{:.1f}')],
          ['scoring', e['scorings'], _f(e['score_s'], '{:.1f}')],
          ['total', '', f'{e["total_s"]:.0f} s = {e["total_min"]:.1f} min'],
        ],
      )
    )
    out.append('')
  fd = result['feature_diff']
  if fd is not None:
    out.append(
      f'bfloat16 vs float32, {fd["arch"]} ({fd["checkpoint"]}) on synthetic_ad '
      f'({fd["n_train"]} train / {fd["n_test"]} test per category):'
    )
    cats = list(fd['categories'])
    rows = [
      [lvl] + [_f(fd['categories'][c]['levels'][lvl]['rel_diff'], '{:.2e}') for c in cats]
      for lvl in range(len(fd['categories'][cats[0]]['levels']))
    ]
    out.append(_table(['level'] + [f'{c} rel. diff' for c in cats], rows))
    rows = []
    for c in cats:
      for d, a in fd['categories'][c]['auroc'].items():
        rows.append([c, d, _f(a['float32']), _f(a['bfloat16']), _f(a['difference'], '{:+.2f}')])
    out.append(_table(['category', 'distance', 'AUROC f32', 'AUROC bf16', 'diff'], rows))
    out.append('')
  if result.get('maps'):
    from jax_gad.benchmark.maps import format_report as format_maps

    out.append(format_maps(result['maps']))
  mem = result.get('peak_host_memory_mb')
  dev = [r['device_peak_bytes'] for r in result['extraction'] if r['device_peak_bytes'] is not None]
  out.append(
    f'Peak host memory (ru_maxrss): {_f(mem, "{:.0f}")} MiB; device peak: '
    + (f'{max(dev) / 2**20:.0f} MiB' if dev else 'not reported by this backend')
    + f'; wall time {_f(result.get("wall_s"), "{:.0f}")} s'
  )
  if result.get('densities'):
    from jax_gad.benchmark.densities import format_rows

    d = result['densities']
    st = d['settings']
    out.append(
      f'\nDensity fits per level width (GMM: k={st["gmm_k"]}, {st["gmm_iter"]} EM iterations '
      f'from the same initial parameters as scikit-learn; flow: {st["flow_epochs"]} epochs); '
      f'other CPU load {_pct(d.get("other_cpu"))}:\n'
    )
    out.append(format_rows(d))
  return '\n'.join(out)


def write_json(path: str, result: dict) -> None:
  """Writes ``result`` as JSON atomically (temporary file + ``os.replace``)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  data = json.dumps(result, indent=1, sort_keys=True, allow_nan=False).encode('utf-8')
  files.atomic_write(path, data)
