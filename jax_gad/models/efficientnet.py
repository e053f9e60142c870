"""EfficientNet B0-B7 and Lite0-Lite4 as Flax Linen modules, inference only.

The networks follow the layouts of the ``efficientnet-pytorch`` (B-family) and
``efficientnet-lite-pytorch`` (Lite-family) packages, so that their state dicts
convert one to one (see :mod:`jax_gad.convert`):

* TensorFlow "SAME" padding, computed from the actual input size at trace time
  (asymmetric, one more pixel after than before, where the total is odd), so
  any input size works, not only the native resolution;
* BatchNorm with epsilon 1e-3, always applied with its running statistics;
* B-family: swish activations and squeeze-excite with
  ``max(1, int(block_input_filters * 0.25))`` channels;
* Lite-family: ReLU6, no squeeze-excite, stem (32) and head (1280) widths not
  scaled, first and last stage repeats not scaled.

The module returns 9 "level" maps (NHWC, not pooled): level 0 is the stem
output after BN and activation, levels 1..7 are the outputs of the last block
of each of the 7 stages, level 8 is the head 1x1 convolution after BN and
activation. Dropout and drop-connect are training-time only and absent here.

Two numerically equal implementations of the depthwise convolution exist:
``'xla'`` (``lax.conv_general_dilated`` with ``feature_group_count=C``) and
``'shift'`` (K*K slices of the padded input, multiplied by one kernel tap each
and summed; at stride 1 contiguous slices of the row-flattened map, over
pieces of the channels that fit in L1). All 1x1 convolutions are matrix
products on the ``(N*H*W, C)`` view; where the activation is larger than the
projection kernel, the squeeze-excite gate scales the kernel instead of the
activation.
:func:`default_depthwise` picks an implementation per backend from
measurements on CPU (docs/performance.md). ``split_bytes`` (default per backend,
:func:`default_split_bytes`) keeps the working set in cache on CPU: leading
blocks of a large batch run one image at a time, and a huge expanded map is
computed in bands of rows (docs/performance.md).
"""

from __future__ import annotations

import itertools
import math
import types
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "ARCHS",
  "check_arch",
  "ArchSpec",
  "BlockSpec",
  "DEPTHWISE_IMPLS",
  "NUM_LEVELS",
  "EfficientNet",
  "block_specs",
  "classify",
  "create",
  "default_depthwise",
  "default_split_bytes",
  "init",
  "level_widths",
  "native_resolution",
  "stage_ends",
]

BN_EPSILON = 1e-3
NUM_LEVELS = 9
DEPTHWISE_IMPLS = ("shift", "xla")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Lite weights expect (255 x - 127) / 128 for x in [0, 1]; written in the
# same (x - mean) / std form as the B-family constants.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


class ArchSpec(NamedTuple):
  """Scaling coefficients and input conventions of one architecture.

  Attributes:
    family: ``'b'`` (efficientnet-pytorch layout) or ``'lite'``
      (efficientnet-lite-pytorch layout).
    width: channel multiplier.
    depth: repeat multiplier.
    resolution: native square input size in pixels.
    dropout: dropout rate before the classifier (training only; kept for
      reference).
    mean: per-channel mean for inputs scaled to [0, 1].
    std: per-channel std for inputs scaled to [0, 1].
  """

  family: str
  width: float
  depth: float
  resolution: int
  dropout: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def _b(width, depth, resolution, dropout):
  return ArchSpec("b", width, depth, resolution, dropout, _IMAGENET_MEAN, _IMAGENET_STD)


def _lite(width, depth, resolution, dropout):
  return ArchSpec("lite", width, depth, resolution, dropout, _LITE_MEAN, _LITE_STD)


ARCHS: Mapping[str, ArchSpec] = types.MappingProxyType(
  {
    "efficientnet-b0": _b(1.0, 1.0, 224, 0.2),
    "efficientnet-b1": _b(1.0, 1.1, 240, 0.2),
    "efficientnet-b2": _b(1.1, 1.2, 260, 0.3),
    "efficientnet-b3": _b(1.2, 1.4, 300, 0.3),
    "efficientnet-b4": _b(1.4, 1.8, 380, 0.4),
    "efficientnet-b5": _b(1.6, 2.2, 456, 0.4),
    "efficientnet-b6": _b(1.8, 2.6, 528, 0.5),
    "efficientnet-b7": _b(2.0, 3.1, 600, 0.5),
    "efficientnet-lite0": _lite(1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": _lite(1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": _lite(1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": _lite(1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": _lite(1.4, 1.8, 300, 0.3),
  }
)

# The seven stages of EfficientNet-B0:
# (repeats, kernel size, stride, expand ratio, input filters, output filters).
_BASE_STAGES = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
_SE_RATIO = 0.25
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_DEPTH_DIVISOR = 8


class BlockSpec(NamedTuple):
  """Static description of one MBConv block.

  Attributes:
    stage: stage index, 0..6.
    in_filters: input channels.
    out_filters: output channels.
    expand_ratio: expansion factor (1 means no expansion convolution).
    kernel_size: depthwise kernel size.
    stride: depthwise stride (1 or 2).
    se_filters: squeeze-excite bottleneck width, 0 when the block has none.
    residual: whether the block adds its input to its output.
  """

  stage: int
  in_filters: int
  out_filters: int
  expand_ratio: int
  kernel_size: int
  stride: int
  se_filters: int
  residual: bool

  @property
  def mid_filters(self) -> int:
    return self.in_filters * self.expand_ratio


def check_arch(arch: str) -> ArchSpec:
  """The :class:`ArchSpec` of ``arch``; ValueError naming the valid architectures otherwise."""
  if not isinstance(arch, str) or arch not in ARCHS:
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
  return ARCHS[arch]


def _round_filters(filters: int, width: float) -> int:
  """Channel count scaled by ``width``, rounded to a multiple of 8 (TF rule)."""
  scaled = filters * width
  rounded = max(_DEPTH_DIVISOR, int(scaled + _DEPTH_DIVISOR / 2) // _DEPTH_DIVISOR * _DEPTH_DIVISOR)
  if rounded < 0.9 * scaled:  # never round down by more than 10 %
    rounded += _DEPTH_DIVISOR
  return int(rounded)


def _round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def _stem_head_filters(spec: ArchSpec) -> tuple[int, int]:
  if spec.family == "lite":
    return _STEM_FILTERS, _HEAD_FILTERS
  return (_round_filters(_STEM_FILTERS, spec.width), _round_filters(_HEAD_FILTERS, spec.width))


def block_specs(arch: str) -> tuple[BlockSpec, ...]:
  """All MBConv blocks of ``arch`` in execution order.

  Args:
    arch: architecture name, a key of :data:`ARCHS`.

  Returns:
    Tuple of :class:`BlockSpec`; index i corresponds to ``_blocks.{i}`` in
    the PyTorch state dicts and to ``params['blocks_{i}']`` here.
  """
  spec = check_arch(arch)
  stem, _ = _stem_head_filters(spec)
  blocks = []
  last_stage = len(_BASE_STAGES) - 1
  for stage, (repeats, k, s, e, fin, fout) in enumerate(_BASE_STAGES):
    in_filters = _round_filters(fin, spec.width)
    out_filters = _round_filters(fout, spec.width)
    if spec.family == "lite" and stage in (0, last_stage):
      n = repeats  # Lite keeps the first and last stage depth fixed
    else:
      n = _round_repeats(repeats, spec.depth)
    if stage == 0:
      in_filters = stem
    for r in range(n):
      block_in = in_filters if r == 0 else out_filters
      stride = s if r == 0 else 1
      se = max(1, int(block_in * _SE_RATIO)) if spec.family == "b" else 0
      blocks.append(
        BlockSpec(
          stage=stage,
          in_filters=block_in,
          out_filters=out_filters,
          expand_ratio=e,
          kernel_size=k,
          stride=stride,
          se_filters=se,
          residual=(stride == 1 and block_in == out_filters),
        )
      )
  return tuple(blocks)


def stage_ends(arch: str) -> tuple[int, ...]:
  """Index of the last block of each of the 7 stages (levels 1..7)."""
  blocks = block_specs(arch)
  return tuple(
    max(i for i, b in enumerate(blocks) if b.stage == s) for s in range(len(_BASE_STAGES))
  )


def level_widths(arch: str) -> tuple[int, ...]:
  """Channel counts of the 9 level maps, e.g. B4: (48, 24, 32, ..., 1792)."""
  spec = check_arch(arch)
  stem, head = _stem_head_filters(spec)
  blocks = block_specs(arch)
  return (stem, *(blocks[i].out_filters for i in stage_ends(arch)), head)


def native_resolution(arch: str) -> int:
  """Square input size (pixels) the published weights were trained at."""
  return check_arch(arch).resolution


def default_depthwise(backend: str) -> str:
  """Depthwise implementation to use on a JAX backend.

  ``'shift'`` on CPU, where it was measured several times faster than XLA's
  grouped convolution (docs/architecture.md, "Depthwise convolution"); ``'xla'``
  everywhere else, where the grouped convolution is the native op.

  Args:
    backend: a JAX backend name such as ``jax.default_backend()``
      (``'cpu'``, ``'gpu'``, ``'cuda'``, ``'rocm'``, ``'tpu'``, ...).

  Returns:
    ``'shift'`` or ``'xla'``.
  """
  if not isinstance(backend, str) or not backend:
    raise ValueError(f"backend must be a non-empty string; got {backend!r}")
  return "shift" if backend.lower() == "cpu" else "xla"


# ----------------------------------------------------------------------------
# Layers
#
# The Flax modules below only declare the variables (names and shapes as in the
# converted state dicts) and return them; the arithmetic is in plain functions
# of those arrays, so that parts of the network can run inside ``lax.map`` (see
# ``split_bytes``) without Flax's lifted transforms.


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF "SAME" padding (before, after) of one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _activation(family: str) -> Callable[[jax.Array], jax.Array]:
  if family == "lite":
    return lambda x: jnp.clip(x, 0, 6)
  return nn.swish


class _BatchNorm(nn.Module):
  """Inference BatchNorm over the last axis, epsilon 1e-3.

  Parameters ``scale``/``bias`` and statistics ``mean``/``var`` (collection
  ``batch_stats``) use the names of ``flax.linen.BatchNorm``. Returns the affine
  map ``(mul, add)`` formed in float32; :func:`_affine` applies it.
  """

  features: int

  @nn.compact
  def __call__(self):
    c = self.features
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    mul = scale * lax.rsqrt(var.value + BN_EPSILON)
    return mul, bias - mean.value * mul


def _affine(x, mul_add):
  mul, add = mul_add
  return x * mul.astype(x.dtype) + add.astype(x.dtype)


_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")


class _Kernel(nn.Module):
  """A convolution kernel (HWIO ``shape``) and, if ``use_bias``, a bias."""

  shape: tuple[int, ...]
  use_bias: bool = False

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", _conv_init, self.shape, jnp.float32)
    if not self.use_bias:
      return kernel, None
    return kernel, self.param("bias", nn.initializers.zeros, (self.shape[-1],), jnp.float32)


def _conv1x1(x, kernel_bias):
  """1x1 convolution as a matrix product on the ``(N*H*W, C)`` view."""
  kernel, bias = kernel_bias
  cin, cout = kernel.shape[-2:]
  y = jnp.dot(x.reshape(-1, cin), kernel.reshape(cin, cout).astype(x.dtype))
  y = y.reshape(*x.shape[:-1], cout)
  return y if bias is None else y + bias.astype(x.dtype)


def _taps(xp, k, stride, oh, ow):
  """The K*K strided views ``xp[:, i::stride, j::stride]`` of a padded input."""
  n, _, _, c = xp.shape
  for i in range(k):
    for j in range(k):
      yield (
        i,
        j,
        lax.slice(
          xp,
          (0, i, j, 0),
          (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
          (1, stride, stride, 1),
        ),
      )


def _stem_conv(x, kernel, stride):
  """Dense KxK stem convolution with TF "SAME" padding; kernel HWIO."""
  k = kernel.shape[0]
  pads = [_same_padding(x.shape[1], k, stride), _same_padding(x.shape[2], k, stride)]
  return lax.conv_general_dilated(
    x, kernel.astype(x.dtype), (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _no_epilogue(y, lo, hi):
  del lo, hi
  return y


def _depthwise(x, kernel, stride, pads, impl, epilogue=None):
  """Depthwise KxK convolution of ``x`` zero-padded by ``pads``; kernel ``(K, K, 1, C)``.

  ``'shift'``: K*K slices of the padded input, each multiplied by one kernel
  tap, summed; ``'xla'``: grouped ``lax.conv_general_dilated``. ``epilogue(y,
  lo, hi)``, if given, maps the result for channels ``lo:hi`` (BatchNorm and
  activation); the stride-1 ``'shift'`` form applies it to each channel piece
  it computes, everything else to the whole result.
  """
  kernel = kernel.astype(x.dtype)
  epilogue = epilogue or _no_epilogue
  c = x.shape[-1]
  if impl != "shift":
    y = lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
    )
    return epilogue(y, 0, c)
  k = kernel.shape[0]
  if stride == 1:
    return _depthwise_rows(x, kernel, pads, epilogue)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (xp.shape[1] - k) // stride + 1
  ow = (xp.shape[2] - k) // stride + 1
  out = None
  for i, j, tap in _taps(xp, k, stride, oh, ow):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return epilogue(out, 0, c)


# Channels per piece of the stride-1 ``'shift'`` depthwise: the K*K taps of one
# output pixel over a piece of the channels (K*K*piece floats) fit in 16 KiB, a
# third of a 48 KiB L1 data cache (docs/performance.md).
_TAP_BYTES = 16 << 10


def _depthwise_rows(x, kernel, pads, epilogue):
  """Stride-1 ``'shift'`` depthwise on the ``(N, H*W, C)`` view of the padded map.

  With the padded rows laid end to end, tap ``(i, j)`` of every output pixel
  is one contiguous slice starting ``i * Wp + j`` pixels in; the last
  ``Wp - ow`` columns of each output row straddle two input rows and are cut
  off. One extra zero row at the bottom keeps the last tap's slice in bounds.
  The channels are done in pieces whose taps fit in L1 (``_TAP_BYTES``), each
  piece summed, cropped and passed through ``epilogue``, and the pieces are
  concatenated. The same products are summed in the same order as in the
  strided-slice form, so the numbers are the same; XLA:CPU runs this form
  about 1.1-1.2x faster within B4 (docs/performance.md).
  """
  n, h, w, c = x.shape
  k = kernel.shape[0]
  (top, bottom), (left, right) = pads
  oh, ow = h + top + bottom - k + 1, w + left + right - k + 1
  xp = jnp.pad(x, ((0, 0), (top, bottom + 1), (left, right), (0, 0)))
  wp = xp.shape[2]
  flat = xp.reshape(n, -1, c)
  piece = max(16, _TAP_BYTES // (k * k * x.dtype.itemsize) // 16 * 16)
  parts = []
  for lo in range(0, c, piece):
    hi = min(lo + piece, c)
    out = None
    for i in range(k):
      for j in range(k):
        start = i * wp + j
        tap = lax.slice(flat, (0, start, lo), (n, start + oh * wp, hi))
        term = tap * kernel[i, j, 0, lo:hi]
        out = term if out is None else out + term
    parts.append(epilogue(out.reshape(n, oh, wp, hi - lo)[:, :, :ow], lo, hi))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _band_rows(out_rows: int, bands: int) -> list[tuple[int, int]]:
  """``bands`` contiguous ranges of output rows covering ``range(out_rows)``."""
  edges = [round(b * out_rows / bands) for b in range(bands + 1)]
  return [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]


def _expanded_bytes(spec: BlockSpec, n: int, h: int, w: int, itemsize: int) -> int:
  """Size of a block's expanded activation (before the depthwise convolution)."""
  return n * h * w * spec.mid_filters * itemsize if spec.expand_ratio != 1 else 0


class _MBConv(nn.Module):
  """Variables of one mobile inverted bottleneck block (expand, depthwise, SE, project)."""

  spec: BlockSpec

  @nn.compact
  def __call__(self):
    b = self.spec
    w = {}
    if b.expand_ratio != 1:
      w["expand_conv"] = _Kernel((1, 1, b.in_filters, b.mid_filters), name="expand_conv")()
      w["expand_bn"] = _BatchNorm(b.mid_filters, name="expand_bn")()
    w["depthwise_conv"] = _Kernel(
      (b.kernel_size, b.kernel_size, 1, b.mid_filters), name="depthwise_conv"
    )()[0]
    w["depthwise_bn"] = _BatchNorm(b.mid_filters, name="depthwise_bn")()
    if b.se_filters:
      w["se_reduce"] = _Kernel((1, 1, b.mid_filters, b.se_filters), True, name="se_reduce")()
      w["se_expand"] = _Kernel((1, 1, b.se_filters, b.mid_filters), True, name="se_expand")()
    w["project_conv"] = _Kernel((1, 1, b.mid_filters, b.out_filters), name="project_conv")()
    w["project_bn"] = _BatchNorm(b.out_filters, name="project_bn")()
    return w


def _mbconv(w, inputs, b: BlockSpec, act, impl: str, split_bytes: int):
  """One MBConv block on ``inputs`` with the variables ``w`` from :class:`_MBConv`.

  When the expanded activation is larger than ``split_bytes`` (> 0), expand +
  depthwise run on bands of output rows, each band expanding only the input
  rows (with their halo) it needs: the same arithmetic per element, on pieces
  that stay in cache.
  """
  n, h, wd, _ = inputs.shape
  k, s = b.kernel_size, b.stride
  pads_h, pads_w = _same_padding(h, k, s), _same_padding(wd, k, s)
  oh = -(-h // s)
  bands = 1
  if split_bytes > 0:
    size = _expanded_bytes(b, n, h, wd, inputs.dtype.itemsize)
    bands = min(max(1, -(-size // split_bytes)), oh)

  mul, add = w["depthwise_bn"]

  def bn_act(y, lo, hi):
    return act(_affine(y, (mul[lo:hi], add[lo:hi])))

  # At stride 1, BatchNorm + activation go to the depthwise, which applies them
  # to each channel piece; at stride 2 they follow the (banded) whole, which
  # measured 3x faster for B4's banded block 2 than per band.
  inner = bn_act if s == 1 else None

  def front(x, pads):
    if b.expand_ratio != 1:
      x = act(_affine(_conv1x1(x, w["expand_conv"]), w["expand_bn"]))
    return _depthwise(x, w["depthwise_conv"], s, pads, impl, inner)

  if bands == 1:
    x = front(inputs, (pads_h, pads_w))
  else:
    parts = []
    for lo, hi in _band_rows(oh, bands):
      first = lo * s - pads_h[0]  # input rows [first, last) feed output rows [lo, hi)
      last = (hi - 1) * s - pads_h[0] + k
      rows = inputs[:, max(first, 0) : min(last, h)]
      parts.append(front(rows, ((max(-first, 0), max(last - h, 0)), pads_w)))
    x = jnp.concatenate(parts, axis=1)
  if inner is None:
    x = bn_act(x, 0, b.mid_filters)
  project = w["project_conv"][0].reshape(b.mid_filters, b.out_filters).astype(x.dtype)
  if b.se_filters:
    sq = jnp.mean(x, axis=(1, 2), keepdims=True)
    sq = act(_conv1x1(sq, w["se_reduce"]))
    gate = nn.sigmoid(_conv1x1(sq, w["se_expand"]))  # (N, 1, 1, mid)
    if x.shape[1] * x.shape[2] > b.out_filters:
      # Scale the projection's rows instead of the (larger) activation.
      project = gate.reshape(x.shape[0], b.mid_filters, 1) * project
      x = jnp.einsum("nhwc,nco->nhwo", x, project)
    else:
      x = _conv1x1(x * gate, (project, None))
  else:
    x = _conv1x1(x, (project, None))
  x = _affine(x, w["project_bn"])
  if b.residual:
    x = x + inputs
  return x


class EfficientNet(nn.Module):
  """EfficientNet feature extractor returning the 9 level maps.

  Attributes:
    arch: architecture name, a key of :data:`ARCHS`.
    depthwise: ``'shift'`` or ``'xla'`` (see module docstring).
    dtype: computation dtype; parameters stay float32.
    split_bytes: working-set target in bytes; 0 computes every layer on the
      whole batch at once. When positive, a batch whose per-block activations
      exceed it runs the leading blocks one image at a time (``lax.map``), and
      a block whose expanded activation still exceeds it runs expand +
      depthwise on bands of rows. Results are the same up to float rounding;
      it only changes memory traffic (see :func:`default_split_bytes`).

  Call with ``x`` of shape ``(N, H, W, 3)``, already normalised with the
  checkpoint's mean/std; any ``H, W >= 1``. Returns a tuple of 9 arrays
  ``(N, h_l, w_l, level_widths(arch)[l])`` in ``dtype``; with ``pool=True``,
  each level global-average-pooled in float32, ``(N, level_widths(arch)[l])``,
  pooled where it is produced, so that a batch run one image at a time never
  holds whole-batch level maps (this is what the feature extractor uses).
  """

  arch: str
  depthwise: str = "xla"
  dtype: Any = jnp.float32
  split_bytes: int = 0

  @nn.compact
  def __call__(self, x, pool: bool = False):
    spec = check_arch(self.arch)
    if self.depthwise not in DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise must be one of {DEPTHWISE_IMPLS}; got {self.depthwise!r}")
    _check_split_bytes(self.split_bytes)
    if getattr(x, "ndim", None) != 4 or x.shape[-1] != 3:
      raise ValueError(
        "x must be an NHWC batch of shape (N, H, W, 3); got shape "
        f"{getattr(x, 'shape', type(x).__name__)}"
      )
    if any(d < 1 for d in x.shape[:3]):  # each on its own: a symbolic batch (jax.export)
      raise ValueError(f"x must have non-empty N, H and W; got shape {x.shape}")
    act, dt, impl = _activation(spec.family), jnp.dtype(self.dtype), self.depthwise
    stem, head = _stem_head_filters(spec)
    blocks = block_specs(self.arch)
    ends = set(stage_ends(self.arch))

    stem_w = _Kernel((3, 3, 3, stem), name="stem_conv")()[0]
    stem_bn = _BatchNorm(stem, name="stem_bn")()
    block_w = [_MBConv(b, name=f"blocks_{i}")() for i, b in enumerate(blocks)]
    head_w = _Kernel((1, 1, blocks[-1].out_filters, head), name="head_conv")()
    head_bn = _BatchNorm(head, name="head_bn")()

    def level(x):
      return jnp.mean(x.astype(jnp.float32), axis=(1, 2)) if pool else x

    def run(x, first, stop):
      """Blocks ``first..stop-1`` (the stem when ``first == 0``); returns levels, x."""
      levels = []
      if first == 0:
        x = act(_affine(_stem_conv(x, stem_w, 2), stem_bn))
        levels.append(level(x))
      for i in range(first, stop):
        x = _mbconv(block_w[i], x, blocks[i], act, impl, self.split_bytes)
        if i in ends:
          levels.append(level(x))
      return levels, x

    x = jnp.asarray(x).astype(dt)
    split = _per_image_blocks(blocks, x.shape, dt.itemsize, self.split_bytes)
    if split:
      # One image at a time through the blocks whose whole-batch activations
      # would not stay in cache; the rest on the whole batch.
      levels, x = lax.map(lambda xi: run(xi[None], 0, split), x)
      levels = [lv[:, 0] for lv in levels]
      x = x[:, 0]
      more, x = run(x, split, len(blocks))
      levels += more
    else:
      levels, x = run(x, 0, len(blocks))
    x = act(_affine(_conv1x1(x, head_w), head_bn))
    levels.append(level(x))
    return tuple(levels)


def _check_split_bytes(split_bytes) -> None:
  if isinstance(split_bytes, bool) or not isinstance(split_bytes, int) or split_bytes < 0:
    raise ValueError(f"split_bytes must be an int >= 0; got {split_bytes!r}")


def _per_image_blocks(blocks, shape, itemsize: int, split_bytes: int) -> int:
  """How many leading blocks run one image at a time (0: none).

  The longest run of leading blocks whose widest activation (input or
  expanded) for the whole batch exceeds ``split_bytes``; none for a single
  image or ``split_bytes == 0``.
  """
  n, h, w = shape[:3]
  if n == 1 or split_bytes <= 0:
    return 0
  h, w = -(-h // 2), -(-w // 2)  # after the stride-2 stem
  for i, b in enumerate(blocks):
    if n * h * w * max(b.in_filters, b.mid_filters) * itemsize <= split_bytes:
      return i
    h, w = -(-h // b.stride), -(-w // b.stride)
  return len(blocks)


def default_split_bytes(backend: str) -> int:
  """``EfficientNet.split_bytes`` to use on a JAX backend.

  8 MiB on CPU, where splitting batches and large activations into pieces of
  about that size was measured faster than whole-batch layers (docs/performance.md,
  "What makes it fast"); 0 (no splitting) everywhere else.

  Args:
    backend: a JAX backend name such as ``jax.default_backend()``.

  Returns:
    A byte count, or 0.
  """
  if not isinstance(backend, str) or not backend:
    raise ValueError(f"backend must be a non-empty string; got {backend!r}")
  return 8 << 20 if backend.lower() == "cpu" else 0


def create(
  arch: str,
  *,
  depthwise: str | None = None,
  dtype: Any = jnp.float32,
  split_bytes: int | None = None,
) -> EfficientNet:
  """Builds the feature extractor for ``arch``.

  Args:
    arch: one of :data:`ARCHS` (``efficientnet-b0`` ... ``b7``,
      ``efficientnet-lite0`` ... ``lite4``).
    depthwise: ``'shift'``, ``'xla'`` or None for
      ``default_depthwise(jax.default_backend())``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay
      float32 and outputs come out in this dtype.
    split_bytes: working-set target (see :class:`EfficientNet`); None for
      ``default_split_bytes(jax.default_backend())``, 0 for none.

  Returns:
    An :class:`EfficientNet`; ``module.apply(variables, x)`` maps a float
    NHWC batch to the tuple of 9 level maps.
  """
  check_arch(arch)
  if depthwise is None:
    depthwise = default_depthwise(jax.default_backend())
  if depthwise not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise must be one of {DEPTHWISE_IMPLS} or None; got {depthwise!r}")
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype must be a floating dtype; got {dtype!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype; got {dtype}")
  if split_bytes is None:
    split_bytes = default_split_bytes(jax.default_backend())
  _check_split_bytes(split_bytes)
  return EfficientNet(arch=arch, depthwise=depthwise, dtype=dtype, split_bytes=split_bytes)


def init(arch: str, rng: jax.Array, image_size: int = 32) -> dict:
  """Random variables (``params`` and ``batch_stats``) for ``arch``.

  Convolution kernels are He-normal (variance 2 / fan_in; a depthwise
  kernel's fan-in is its K x K taps), BatchNorm scales and running variances
  uniform in [0.5, 1.5], biases and running means normal with std 0.1, so
  every part of the network, BatchNorm included, is exercised. Good for
  timing and for equality tests; values come from numpy, seeded by ``rng``.
  Variable shapes do not depend on ``image_size``; it only sets the size of
  the dummy input that traces the network. The result has no classifier head.

  Args:
    arch: architecture name.
    rng: a ``jax.random`` key.
    image_size: side of the square dummy input.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays.
  """
  check_arch(arch)
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int; got {image_size!r}")
  module = create(arch, depthwise="xla", split_bytes=0)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  # Tracing gives the variable shapes; filling them on the host avoids
  # compiling ~300 separate initializers (tens of seconds on CPU).
  shapes = jax.eval_shape(module.init, rng, x)
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      fan_in = math.prod(shape[:2]) if shape[-2] == 1 else math.prod(shape[:-1])
      value = gen.normal(size=shape) * math.sqrt(2.0 / fan_in)
    elif name in ("scale", "var"):
      value = gen.uniform(0.5, 1.5, size=shape)
    else:  # bias, mean
      value = gen.normal(size=shape) * 0.1
    return np.asarray(value, np.float32)

  return jax.tree_util.tree_map_with_path(
    fill, {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
  )


def classify(variables: Mapping[str, Any], arch: str, pooled_last_level: jax.Array) -> jax.Array:
  """ImageNet logits from the global-average-pooled level 8.

  Applies the converted PyTorch ``_fc`` layer stored by
  :func:`jax_gad.convert.from_torch` under ``variables['params']['classifier']``
  (``kernel`` ``(head_width, num_classes)``, ``bias`` ``(num_classes,)``).

  Args:
    variables: converted variables holding a classifier.
    arch: architecture name (checks the head width).
    pooled_last_level: ``(N, level_widths(arch)[8])``, e.g.
      ``levels[8].mean(axis=(1, 2))``.

  Returns:
    float32 logits ``(N, num_classes)``.
  """
  width = level_widths(arch)[-1]
  params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
  if "classifier" not in params:
    raise ValueError(
      "variables['params'] has no 'classifier': the converted state dict "
      "had no _fc.weight/_fc.bias, so these weights cannot classify"
    )
  head = params["classifier"]
  x = jnp.asarray(pooled_last_level, jnp.float32)
  if x.ndim != 2 or x.shape[1] != width:
    raise ValueError(f"pooled_last_level must have shape (N, {width}) for {arch}; got {x.shape}")
  if head["kernel"].shape[0] != width:
    raise ValueError(
      f"classifier kernel has shape {head['kernel'].shape}, expected "
      f"({width}, num_classes) for {arch}"
    )
  return x @ jnp.asarray(head["kernel"], jnp.float32) + jnp.asarray(head["bias"], jnp.float32)
