"""Formats benchmark results as markdown tables and writes them as JSON."""

from __future__ import annotations

import json
import os
from typing import Sequence

from jax_gad import files
from jax_gad.benchmark import densities as density_section
from jax_gad.benchmark import maps as maps_section
from jax_gad.benchmark import predict_calls


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


def format_machine(result: dict) -> str:
  """The machine line: CPU, cores, JAX backend and devices, load average."""
  m = result['machine']
  return (
    f'Machine: {m.get("cpu_model") or m["processor"]}, {m["cpu_count"]} CPU cores, JAX {m["jax"]} '
    f'{m["backend"]} ({m["device_count"]} x {m["device_kind"]}), '
    f'{m["process_count"]} process(es); load average {m["load_average_start"]} at '
    f'start, {m.get("load_average_end")} at end'
  )


def _extraction_rows(result: dict) -> list[list]:
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
  return rows


def format_extraction(result: dict) -> str | None:
  """Extraction rows (jax_gad and the torch reference) as one table."""
  if not result['extraction']:
    return None
  r0 = result['extraction'][0]
  header = [
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
  ]
  out = [
    f'Feature extraction, {r0["arch"]} at {r0["image_size"]}x{r0["image_size"]} '
    '(all 9 levels pooled on device; step = one global batch incl. transfers):',
    _table(header, _extraction_rows(result)),
  ]
  if result['torch_skipped']:
    out.append(f'(torch reference skipped: {result["torch_skipped"]})')
  return '\n'.join(out)


def format_versus(result: dict) -> str | None:
  """The alternating jax_gad vs efficientnet-pytorch table."""
  v = result.get('versus')
  if v is None:
    return None
  title = (
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
  header = [
    'batch',
    'jax_gad img/s',
    'efficientnet-pytorch img/s',
    'ratio',
    'jax_gad first call',
    'torch first call',
  ]
  return title + '\n' + _table(header, rows)


_ENGINE_LABELS = {
  'jax_gad': 'jax_gad (Flax)',
  'onnxruntime': 'ONNX Runtime',
  'openvino': 'OpenVINO',
  'pytorch': 'PyTorch eager',
}


def _versions(s: dict) -> str:
  return ', '.join(f'{name} {version or "?"}' for name, version in s['version'].items())


def engine_settings_text(name: str, s: dict) -> str:
  """One engine's settings in a few words (the JSON keeps them all)."""
  if name == 'jax_gad':
    extra = (
      f'{s["devices"]} device, XLA CPU threads, depthwise {s["depthwise"]}, '
      f'split_bytes {s["split_bytes"]}'
    )
  elif name == 'onnxruntime':
    extra = (
      f'{s["provider"]}, {s["threads"]} intra-op + {s["inter_op_threads"]} inter-op threads, '
      f'{s["graph_optimization_level"]}, {s["execution_mode"]}, opset {s["opset"]}'
    )
  elif name == 'openvino':
    extra = (
      f'{s["device"]}, {s["INFERENCE_NUM_THREADS"]} threads, {s["PERFORMANCE_HINT"]} hint, '
      f'{s["shape"]} shape'
    )
  else:
    extra = f'{s["threads"]} threads, {s["mode"]}'
  return f'{_versions(s)}; {extra}; {s["precision"]} {s["layout"]}'


def _engines_table(e: dict) -> str:
  rows_by_batch = e['rows']
  header = ['engine', 'settings']
  header += [f'batch {r["batch_size"]} img/s' for r in rows_by_batch]
  header += [f'jax_gad / engine, batch {r["batch_size"]}' for r in rows_by_batch]
  header += [f'batch {r["batch_size"]} first call img/s' for r in rows_by_batch]
  rows = []
  for name, settings in e['settings'].items():
    row = [_ENGINE_LABELS.get(name, name), engine_settings_text(name, settings)]
    row += [_f(r['images_per_s'][name]) for r in rows_by_batch]
    row += [_f(r['jax_gad_ratio'].get(name), '{:.2f}x', '1') for r in rows_by_batch]
    row += [_f(r['first_call_images_per_s'][name]) for r in rows_by_batch]
    rows.append(row)
  return _table(header, rows)


def format_engines(result: dict) -> str | None:
  """jax_gad against ONNX Runtime, OpenVINO and PyTorch, one table per architecture."""
  if result.get('engines_skipped'):
    return f'(engines comparison skipped: {result["engines_skipped"]})'
  out = []
  for e in result.get('engines') or []:
    errors = ', '.join(f'{_ENGINE_LABELS[n]} {v:.1e}' for n, v in e['max_rel_error'].items())
    out.append(
      f'Engines, {e["arch"]} at {e["image_size"]}x{e["image_size"]}, weights {e["weights"]} '
      '(the same on every engine), 9 levels pooled, float32, timed in alternation over '
      f'{e["rounds"]} rounds with the engine order changing every round, each turn one untimed '
      f'call then one timed (medians; jax_gad / engine: median of per-round ratios; other CPU '
      f'{_pct(e["other_cpu"])}). Max |a - b| / max |b| against PyTorch: {errors}:\n'
      + _engines_table(e)
    )
  return '\n\n'.join(out) if out else None


def _kernel_row(first, width, r) -> list:
  return [
    first,
    width,
    _ms(r['jax_fit_s']),
    _ms(r['sklearn_fit_s']),
    _x(r['fit_speedup']),
    _ms(r['jax_score_total_s']),
    _ms(r['numpy_score_total_s']),
    _x(r['score_speedup']),
  ]


def format_kernel(result: dict) -> str | None:
  """Gaussian fit and scoring per level width, against scikit-learn + numpy."""
  k = result['kernel']
  if k is None:
    return None
  title = (
    f'Gaussian kernels per level: fit on N={k["n_fit"]} rows (mean, '
    f'Ledoit-Wolf, precision, std), score {k["n_score"]} rows with '
    'L2+SED+Mahalanobis; scikit-learn LedoitWolf + numpy as reference '
    f'(times in ms, compile excluded; other CPU {_pct(k["total"]["other_cpu"])}):'
  )
  rows = [_kernel_row(r['level'], r['width'], r) for r in k['levels']]
  rows.append(_kernel_row('all', sum(r['width'] for r in k['levels']), k['total']))
  header = [
    'level',
    'D',
    'jax fit',
    'sklearn fit',
    'fit speedup',
    'jax score',
    'numpy score',
    'score speedup',
  ]
  return title + '\n' + _table(header, rows)


def format_sweeps(result: dict) -> str | None:
  """The fit sweeps over D and over N, one table each."""
  out = []
  for key, label, fixed in (('sweep_d', 'D', 'N'), ('sweep_n', 'N', 'D')):
    if not result[key]:
      continue
    value = result[key][0][fixed.lower()]
    out.append(
      f'Fit sweep over {label} ({fixed}={value}; ms, compile excluded; '
      f'other CPU during the sweeps {_pct(result["sweeps_other_cpu"])}):'
    )
    rows = [
      [
        r[label.lower()],
        _ms(r['jax_fit_s']),
        _ms(r['sklearn_fit_s']),
        _x(r['fit_speedup']),
        _ms(r['jax_compile_s']),
      ]
      for r in result[key]
    ]
    out.append(_table([label, 'jax fit', 'sklearn fit', 'speedup', 'jax compile'], rows))
    out.append('')
  return '\n'.join(out[:-1]) if out else None


def format_pipeline(result: dict) -> str | None:
  """The end-to-end decode + extract run against the device-only rate."""
  p = result.get('pipeline')
  if p is None:
    return None
  return (
    f'End-to-end extraction of {p["n_images"]} {p["side"]}px PNGs (decoded and '
    f'resized by {p["num_workers"]} threads while the device computes, batch '
    f'{p["batch_size"]} {p["dtype"]} {p["depthwise"]}): {p["images_per_s"]:.2f} '
    f'img/s vs {p["device_only_images_per_s"]:.2f} img/s device-only '
    f'(other CPU {_pct(p["other_cpu"])}).'
  )


def format_predict(result: dict) -> str | None:
  """Predict throughput on files and single-image latency."""
  q = result.get('predict')
  if q is None:
    return None
  return (
    f'Predict ({q["arch"]} {q["image_size"]}px, `jax_gad.predict` on {q["n_images"]} '
    f'{q["side"]}px PNG files: read, decode, resize, extract, score, write CSV; '
    f'{q["num_workers"]} decode threads): {q["images_per_s"]:.2f} img/s at batch '
    f'{q["batch_size"]}; one image {_ms(q["latency_s"])} ms (batch 1).'
  )


def format_predict_maps(result: dict) -> str | None:
  """Predict throughput with ``--maps_dir`` beside the plain rate."""
  m = result.get('predict_maps')
  if m is None:
    return None
  return (
    f'Predict with `--maps_dir` ({m["arch"]} {m["image_size"]}px, map levels '
    f'{",".join(map(str, m["map_levels"]))}, {m["n_images"]} {m["side"]}px PNG files; '
    f'a .npy map and a .png overlay per image): {m["maps_images_per_s"]:.2f} img/s, '
    f'against {m["images_per_s"]:.2f} img/s without maps (batch {m["batch_size"]}).'
  )


def format_pipelines(result: dict) -> str | None:
  """The end-to-end run per architecture and batch size."""
  if not result.get('pipelines'):
    return None
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
  return (
    'End-to-end decode + extract per architecture (in-memory PNGs decoded and resized by '
    'worker threads while the device computes; float32):\n'
    + _table(['arch', 'input', 'batch', 'depthwise', 'PNGs', 'img/s', 'other CPU'], rows)
  )


def format_estimate(result: dict) -> str | None:
  """The full-protocol time estimate, part by part."""
  e = result['estimate']
  if e is None:
    return None
  row = e['extraction_row']
  images = f'{e["images"]} images'
  rate = ' (end-to-end pipeline rate)' if e['pipeline_images_per_s'] else ' (device only)'
  rows = [
    ['backbone compile', 1, _f(e['compile_s'], '{:.1f}')],
    ['feature extraction' + rate, images, _f(e['extraction_s'], '{:.1f}')],
    ['PNG decode + resize (host)', images, _f(e['host_preprocess_s'], '{:.1f}')],
    ['Gaussian fits', e['fits'], _f(e['fit_s'], '{:.1f}')],
    ['scoring', e['scorings'], _f(e['score_s'], '{:.1f}')],
    ['total', '', f'{e["total_s"]:.0f} s = {e["total_min"]:.1f} min'],
  ]
  return (
    f'Full MVTec AD protocol estimate ({e["categories"]} categories x '
    f'{e["folds"]} folds, {e["levels"]} levels, {e["distances"]} distances; '
    f'{row["arch"]} {row["image_size"]}px batch {row["batch_size"]} '
    f'{row["dtype"]} on {row["device_count"]} device(s)):\n'
    + _table(['part', 'count', 'seconds'], rows)
  )


def format_maps(result: dict) -> str | None:
  """The anomaly-map section (:mod:`jax_gad.benchmark.maps`)."""
  if not result.get('maps'):
    return None
  return maps_section.format_report(result['maps']).rstrip('\n')


def format_memory(result: dict) -> str:
  """Peak host and device memory, and the wall time."""
  mem = result.get('peak_host_memory_mb')
  dev = [r['device_peak_bytes'] for r in result['extraction'] if r['device_peak_bytes'] is not None]
  return (
    f'Peak host memory (ru_maxrss): {_f(mem, "{:.0f}")} MiB; device peak: '
    + (f'{max(dev) / 2**20:.0f} MiB' if dev else 'not reported by this backend')
    + f'; wall time {_f(result.get("wall_s"), "{:.0f}")} s'
  )


def format_densities(result: dict) -> str | None:
  """Density fit times per level width (:mod:`jax_gad.benchmark.densities`)."""
  d = result.get('densities')
  if not d:
    return None
  st = d['settings']
  return (
    f'Density fits per level width (GMM: k={st["gmm_k"]}, {st["gmm_iter"]} EM iterations '
    f'from the same initial parameters as scikit-learn; flow: {st["flow_epochs"]} epochs); '
    f'other CPU load {_pct(d.get("other_cpu"))}:\n\n' + density_section.format_rows(d)
  )


SECTIONS = (
  format_extraction,
  format_versus,
  format_engines,
  format_kernel,
  format_sweeps,
  format_pipeline,
  format_predict,
  format_predict_maps,
  predict_calls.format_predict_calls,
  format_pipelines,
  format_estimate,
  format_maps,
)


def format_report(result: dict) -> str:
  """Markdown tables of a :func:`jax_gad.benchmark.run.run_benchmark` result, section by section."""
  out = [format_machine(result), '']
  for section in SECTIONS:
    text = section(result)
    if text is not None:
      out += [text, '']
  out.append(format_memory(result))
  densities = format_densities(result)
  if densities is not None:
    out.append('\n' + densities)
  return '\n'.join(out)


def write_json(path: str, result: dict) -> None:
  """Writes ``result`` as JSON atomically (temporary file + ``os.replace``)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  files.remove_stale_temporaries(directory)  # of earlier runs killed while writing here
  data = json.dumps(result, indent=1, sort_keys=True, allow_nan=False).encode('utf-8')
  files.atomic_write(path, data)
