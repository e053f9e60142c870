r"""Where the milliseconds go: jax_gad, ONNX Runtime and OpenVINO profiled per operation.

  python experiments/engine_profile.py --arch=efficientnet-b4 [--batch_size=1] [--steps=5]
  taskset -c 0 python experiments/engine_profile.py ...   # one core: each engine on one thread

The same weights on the three engines, as in the benchmark's engines section
(``jax_gad.benchmark.engines``: a PyTorch model with random weights and
BatchNorm statistics, or Lite's ImageNet weights, exported to ONNX and
converted for jax_gad). The script times ``--steps`` rounds of unprofiled
calls, the engines in alternation (medians), then profiles ``--steps`` calls
of each with the engine's own profiler and sums the time of its operations
into the categories of :data:`CATEGORIES`:

* jax_gad: ``jax.profiler.trace`` with XLA's per-thunk annotations
  (``--xla_cpu_enable_xprof_traceme``); each thunk is matched to its
  instruction in the compiled HLO (a YNNPACK matrix product, a fused loop
  reading a depthwise kernel, ...);
* ONNX Runtime: ``enable_profiling``, per-node kernel times, by node name
  (the ONNX names keep the PyTorch module names: ``_expand_conv``,
  ``_depthwise_conv``, ``_se_reduce``, ...);
* OpenVINO: ``PERF_COUNT``, ``real_time`` of every executed node, by name.

Profilers add time of their own, so each engine's category shares are
scaled to its unprofiled median; the table prints both. With two threads,
XLA traces only the thread that starts an operation, so jax_gad's traced
total is below its CPU time; on one core (``taskset -c 0``) every engine's
traced total is its work, which is the fairer per-operation comparison.
Prints a markdown table and, with ``--json``, writes every figure.
"""

import os
import sys

# XLA reads its flags once, when jax is first imported: the thunk annotations
# must be on before that.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true'
).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jax_gad import convert, files  # noqa: E402
from jax_gad.benchmark import engines  # noqa: E402
from jax_gad.models import efficientnet  # noqa: E402

CATEGORIES = (
  'stem convolution',
  '1x1 convolutions (expand, project, head)',
  'depthwise convolutions',
  'elementwise: BatchNorm, activations, padding, residual adds',
  'squeeze-excite and pooling',
  'layout: concatenations, reorders',
  'other',
)
STEM, POINTWISE, DEPTHWISE, ELEMENTWISE, SQUEEZE, LAYOUT, OTHER = CATEGORIES


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--arch', default='efficientnet-b4', help='An architecture of jax_gad.')
  p.add_argument('--image_size', type=int, default=0, help='Input side; 0: the native size.')
  p.add_argument('--batch_size', type=int, default=1, help='Images per call.')
  p.add_argument('--steps', type=int, default=5, help='Timed calls, then profiled calls.')
  p.add_argument('--json', default='', help='Also write every figure to this file.')
  p.add_argument(
    '--after_idle',
    default='',
    help='Pauses in seconds, e.g. 0.2,1: instead of profiling, time '
    'one call after each pause (and back to back), in random order, --steps times each.',
  )
  args = p.parse_args(argv)
  try:
    args.after_idle = tuple(float(v) for v in args.after_idle.split(',') if v.strip())
  except ValueError:
    p.error(f'--after_idle must be comma-separated seconds, got {args.after_idle!r}')
  if any(not 0 < v <= 60 for v in args.after_idle):
    p.error(f'--after_idle pauses must lie in (0, 60] seconds, got {args.after_idle}')
  if args.arch not in efficientnet.ARCHS:
    p.error(f'--arch must be one of {", ".join(efficientnet.ARCHS)}, got {args.arch!r}')
  for name in ('batch_size', 'steps'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.image_size < 0:
    p.error(f'--image_size must be >= 0 (0: native), got {args.image_size}')
  args.image_size = args.image_size or efficientnet.native_resolution(args.arch)
  return args


# ---------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------


def hlo_instructions(hlo_text: str) -> tuple[dict, dict]:
  """``(instructions, bodies)`` of compiled HLO text.

  ``instructions``: name -> (shape, opcode, operand text, called computation
  or None); ``bodies``: computation name -> its text.
  """
  instructions = {}
  line = re.compile(r'^\s+(?:ROOT )?%([\w.\-]+) = (\S+) ([\w-]+)\((.*?)\)(?:, (.*))?$', re.M)
  for m in line.finditer(hlo_text):
    calls = re.search(r'calls=%([\w.\-]+)', m.group(5) or '')
    instructions.setdefault(
      m.group(1), (m.group(2), m.group(3), m.group(4), calls.group(1) if calls else None)
    )
  body = re.compile(r'^%([\w.\-]+) \(.*?\{\n(.*?)\n\}', re.S | re.M)
  return instructions, {m.group(1): m.group(2) for m in body.finditer(hlo_text)}


def jax_category(name: str, instructions: dict, bodies: dict) -> str:
  """The category of one XLA:CPU thunk, read off its instruction in the compiled HLO.

  Operand names carry the variable paths (``..._depthwise_conv____kernel__``),
  which tells the fused loops apart; a fusion calling ``convolution`` is the
  stem (the only dense convolution); one calling ``dot`` a 1x1 convolution,
  unless its operands are squeeze-excite weights.
  """
  if name not in instructions:
    return OTHER
  _, opcode, operands, calls = instructions[name]
  body = bodies.get(calls, '') if calls else ''
  if opcode in ('concatenate', 'copy', 'transpose'):
    return LAYOUT
  if opcode == 'pad':
    return ELEMENTWISE
  if opcode == 'dot' or 'se_reduce' in operands or 'se_expand' in operands:
    return SQUEEZE
  if opcode != 'fusion':
    return OTHER
  if ' convolution(' in body:
    return STEM
  if ' dot(' in body:
    return POINTWISE
  if 'depthwise_conv' in operands:
    return DEPTHWISE
  if ' reduce(' in body:
    return SQUEEZE
  return ELEMENTWISE


def conv_category(shapes) -> str | None:
  """A convolution node's category from its input shapes ``[x (N,C,H,W), w (O,I/g,kh,kw)]``.

  ONNX Runtime names a convolution fused with its activation after the
  activation (``.../_swish/Clip...``), so its weights say what it is. None
  when the shapes do not describe a convolution.
  """
  if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
    return None
  (_, channels, height, width), (_, per_group, kh, _) = shapes[0], shapes[1]
  if channels == 3:
    return STEM
  if per_group == 1 and kh > 1:
    return DEPTHWISE
  return SQUEEZE if height * width == 1 else POINTWISE


def node_category(name: str, op: str, shapes=()) -> str:
  """The category of one ONNX Runtime or OpenVINO node: its ONNX name, op type, input shapes."""
  if 'reorder' in op.lower() or op in ('Transpose', 'Convert', 'Concat'):
    return LAYOUT
  if 'conv' in op.lower() and conv_category(shapes):
    return conv_category(shapes)
  if '_se_' in name or op in ('GlobalAveragePool', 'ReduceMean'):
    return SQUEEZE
  if '_conv_stem' in name:
    return STEM
  if '_depthwise_conv' in name:
    return DEPTHWISE
  if any(part in name for part in ('_expand_conv', '_project_conv', '_conv_head')):
    return POINTWISE
  if op in ('Mul', 'Multiply') and 'swish' not in name.lower():
    return SQUEEZE  # the squeeze-excite gate: x * sigmoid(...)
  if op in ('Parameter', 'Result', 'Constant', 'Input', 'Output'):
    return OTHER
  return ELEMENTWISE


# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------


_NOT_THUNKS = ('ThunkExecutor', 'end:', 'Threadpool', 'SlinkyThreadPool')


def thunk_totals(planes, instructions: dict, bodies: dict) -> collections.Counter:
  """Nanoseconds per category of every thunk event in a trace's ``planes``.

  XLA's threads run the thunks: its worker pool (``tf_XLAEigen/...``) and,
  for small programs, the client thread that started the call
  (``tf_XLAPjRtCpuClient/...``); the Python thread's events and XLA's own
  wrappers around the thunks (:data:`_NOT_THUNKS`) are not counted.
  """
  totals = collections.Counter()
  for plane in planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue
      for event in line.events:
        if not event.name.startswith(_NOT_THUNKS):
          totals[jax_category(event.name, instructions, bodies)] += event.duration_ns
  return totals


def unprofiled_ms(inp: engines.Inputs, names, rounds: int) -> dict:
  """Median ms per image of each engine, the engines timed in alternation (as in the benchmark).

  The machine's speed can drift between one engine's timing and the next's;
  in alternation the drift falls on every engine alike.
  """
  built = {name: engines.BUILDERS[name](inp) for name in names}
  times, _ = engines.alternate({inp.batch_size: {n: e.step for n, e in built.items()}}, rounds)
  return {n: 1e3 * float(np.median(times[(inp.batch_size, n)])) / inp.batch_size for n in names}


def profile_jax(inp: engines.Inputs, steps: int) -> dict:
  """Traced ms per image per category, for jax_gad."""
  extractor = engines.jax_gad_extractor(inp)
  host = np.ascontiguousarray(inp.x.transpose(0, 2, 3, 1))

  def step():
    jax.device_get(extractor(extractor.device_batch(host)))

  step()
  instructions, bodies = hlo_instructions(extractor.compiled.as_text())
  with tempfile.TemporaryDirectory(prefix='jax_gad_profile_') as folder:
    with jax.profiler.trace(folder):
      for _ in range(steps):
        step()
    (path,) = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  totals = thunk_totals(data.planes, instructions, bodies)
  per_image = 1e-6 / (steps * inp.batch_size)
  return {c: totals[c] * per_image for c in CATEGORIES}


def profile_onnxruntime(inp: engines.Inputs, steps: int, folder: str) -> dict:
  """Profiled ms per image per category, for ONNX Runtime."""
  session = engines.onnxruntime_session(inp, profile_prefix=os.path.join(folder, 'ort'))
  for _ in range(steps):
    session.run(None, {'x': inp.x})
  with open(session.end_profiling()) as f:
    events = json.load(f)
  totals = collections.Counter()
  for event in events:
    if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
      shapes = [list(v.values())[0] for v in event['args'].get('input_type_shape', [])]
      category = node_category(event['name'], event['args']['op_name'], shapes)
      totals[category] += event['dur']
  per_image = 1e-3 / (steps * inp.batch_size)
  return {c: totals[c] * per_image for c in CATEGORIES}


def profile_openvino(inp: engines.Inputs, steps: int) -> dict:
  """Per-node ms per image per category, for OpenVINO."""
  import openvino as ov  # here: a reference engine, not a jax_gad dependency

  request = engines.openvino_compiled(inp, perf_count=True)[0].create_infer_request()
  totals = collections.Counter()
  request.infer({0: inp.x})
  for _ in range(steps):
    request.infer({0: inp.x})
    for info in request.get_profiling_info():
      if info.status == ov.ProfilingInfo.Status.EXECUTED:  # fused nodes are not run
        totals[node_category(info.node_name, info.node_type)] += info.real_time.total_seconds()
  per_image = 1e3 / (steps * inp.batch_size)
  return {c: totals[c] * per_image for c in CATEGORIES}


def after_idle(steps: dict, pauses: tuple, repeats: int, seed: int = 0) -> dict:
  """Median ms of one call right after another (pause 0) and after each pause, per engine.

  Every (engine, pause) gets ``repeats`` trials, all shuffled together; a
  trial runs one call back to back first, so that only the pause differs.
  """
  pauses = (0.0, *pauses)
  trials = [(name, p) for name in steps for p in pauses] * repeats
  np.random.default_rng(seed).shuffle(trials)
  times = collections.defaultdict(list)
  for name, pause in trials:
    steps[name]()
    time.sleep(pause)
    start = time.perf_counter()
    steps[name]()
    times[(name, pause)].append(1e3 * (time.perf_counter() - start))
  return {name: {p: float(np.median(times[(name, p)])) for p in pauses} for name in steps}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def scaled(wall: float, traced: dict) -> dict:
  """Each category's share of the traced total, times the unprofiled ms per image."""
  total = sum(traced.values())
  return {c: wall * v / total if total else 0.0 for c, v in traced.items()}


def table(results: dict) -> str:
  names = list(results)
  head = '| category | ' + ' | '.join(f'{n} ms' for n in names) + ' |'
  rows = [head, '|---|' + '---|' * len(names)]
  for c in CATEGORIES:
    cells = [f'{scaled(*results[n])[c]:.1f}' for n in names]
    if any(cell != '0.0' for cell in cells):
      rows.append(f'| {c} | ' + ' | '.join(cells) + ' |')
  rows.append(
    '| **unprofiled, per image** | ' + ' | '.join(f'**{results[n][0]:.1f}**' for n in names) + ' |'
  )
  rows.append(
    '| traced total, per image | '
    + ' | '.join(f'{sum(results[n][1].values()):.1f}' for n in names)
    + ' |'
  )
  return '\n'.join(rows)


def idle_table(idle: dict) -> str:
  """:func:`after_idle`'s medians as a markdown table, one row per engine."""
  pauses = [p for p in next(iter(idle.values())) if p]
  rows = ['| engine | back to back | ' + ' | '.join(f'after {p:g} s idle' for p in pauses) + ' |']
  rows.append('|---|---|' + '---|' * len(pauses))
  for name, row in idle.items():
    rows.append(f'| {name} | ' + ' | '.join(f'{v:.1f}' for v in row.values()) + ' |')
  return '\n'.join(rows)


def main(argv) -> int:
  args = _args(argv)
  threads = len(os.sched_getaffinity(0))
  model, weights = engines.torch_model(args.arch, args.image_size, 0)
  variables = convert.from_torch({k: v.numpy() for k, v in model.state_dict().items()}, args.arch)
  module = engines.pooled_levels_module(model)
  x = np.random.default_rng(0).normal(size=(args.batch_size, 3, args.image_size, args.image_size))
  results = {}
  with tempfile.TemporaryDirectory(prefix='jax_gad_profile_') as folder:
    path = os.path.join(folder, 'model.onnx')
    engines.export_onnx(module, args.batch_size, args.image_size, path)
    inp = engines.Inputs(
      args.arch,
      args.image_size,
      args.batch_size,
      threads,
      efficientnet.default_depthwise(jax.default_backend()),
      module,
      variables,
      path,
      x.astype(np.float32),
    )
    if args.after_idle:
      built = {n: engines.BUILDERS[n](inp) for n in ('jax_gad', 'onnxruntime', 'openvino')}
      idle = after_idle({n: e.step for n, e in built.items()}, args.after_idle, args.steps)
      print(
        f'{args.arch} at {args.image_size} px, batch {args.batch_size}, {threads} core(s): '
        f'median ms of one call, {args.steps} trials each, in random order\n'
      )
      print(idle_table(idle))
      return 0
    walls = unprofiled_ms(inp, ('jax_gad', 'onnxruntime', 'openvino'), args.steps)
    results['jax_gad'] = walls['jax_gad'], profile_jax(inp, args.steps)
    results['onnxruntime'] = walls['onnxruntime'], profile_onnxruntime(inp, args.steps, folder)
    results['openvino'] = walls['openvino'], profile_openvino(inp, args.steps)
  print(
    f'{args.arch} at {args.image_size} px, batch {args.batch_size}, {threads} core(s), '
    f'weights {weights}; ms per image, each engine\'s category shares scaled to its '
    f'unprofiled median of {args.steps} calls, the engines in alternation:\n'
  )
  print(table(results))
  if args.json:
    record = {
      'arch': args.arch,
      'image_size': args.image_size,
      'batch_size': args.batch_size,
      'threads': threads,
      'weights': weights,
      'steps': args.steps,
      'engines': {
        n: {'unprofiled_ms': w, 'traced_ms': t, 'scaled_ms': scaled(w, t)}
        for n, (w, t) in results.items()
      },
    }
    files.atomic_write(args.json, json.dumps(record, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
