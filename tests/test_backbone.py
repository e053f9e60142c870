"""Tests for jax_gad.backbone: default checkpoint (converted on first use), loading, extractor."""

import hashlib
import os

import msgpack
import numpy as np
import pytest

from jax_gad import backbone as backbone_lib
from jax_gad import checkpoint, convert, features
from jax_gad.models import efficientnet

ARCH = "efficientnet-lite0"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("ckpt")
  backbone_lib.ensure_checkpoint(ARCH, folder)
  return folder


def test_ensure_checkpoint_converts_once_and_reuses(checkpoint_dir, tmp_path):
  path = backbone_lib.ensure_checkpoint(ARCH, checkpoint_dir)
  assert path == os.path.join(checkpoint_dir, f"{ARCH}.msgpack")
  _, meta = checkpoint.load_checkpoint(path, ARCH)
  packaged = convert.packaged_weights_path(ARCH)
  assert meta["source_sha256"] == hashlib.sha256(open(packaged, "rb").read()).hexdigest()
  assert meta["num_classes"] == 1000
  mtime = os.path.getmtime(path)
  assert backbone_lib.ensure_checkpoint(ARCH, checkpoint_dir) == path
  assert os.path.getmtime(path) == mtime  # reused, not rewritten
  with pytest.raises(
    FileNotFoundError,
    match=r"efficientnet-b4-6ed6700e\.pth.*"
    r"python -m jax_gad\.convert --arch=efficientnet-b4",
  ):
    backbone_lib.ensure_checkpoint("efficientnet-b4", tmp_path)
  with pytest.raises(FileNotFoundError, match="no published weights are known for"):
    backbone_lib.ensure_checkpoint("efficientnet-lite3", tmp_path)


def test_ensure_checkpoint_reconverts_an_older_format(checkpoint_dir, tmp_path):
  path = tmp_path / f"{ARCH}.msgpack"
  with open(os.path.join(checkpoint_dir, f"{ARCH}.msgpack"), "rb") as f:
    state = msgpack.unpackb(f.read(), strict_map_key=False)
  state["metadata"]["format_version"] = checkpoint.FORMAT_VERSION - 1
  path.write_bytes(msgpack.packb(state))
  assert backbone_lib.ensure_checkpoint(ARCH, tmp_path) == str(path)
  _, meta = checkpoint.load_checkpoint(path, ARCH)
  assert meta["format_version"] == checkpoint.FORMAT_VERSION
  # A B-family file is never reconverted (there is nothing packaged to convert from).
  other = tmp_path / "efficientnet-b0.msgpack"
  other.write_bytes(msgpack.packb(state))
  assert backbone_lib.ensure_checkpoint("efficientnet-b0", tmp_path) == str(other)
  assert other.read_bytes() == msgpack.packb(state)


def test_load_backbone_default_and_explicit_file(checkpoint_dir):
  path = os.path.join(checkpoint_dir, f"{ARCH}.msgpack")
  by_dir, meta, sha = backbone_lib.load_backbone(ARCH, checkpoint_dir=checkpoint_dir)
  by_file, meta2, sha2 = backbone_lib.load_backbone(ARCH, path, dtype="bfloat16", depthwise="xla")
  assert by_dir.path == by_file.path == os.path.abspath(path)
  assert sha == sha2 == hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert meta == meta2 and meta["arch"] == ARCH
  assert str(by_file.module.dtype) == "bfloat16" and by_file.module.depthwise == "xla"
  assert str(by_dir.module.dtype) == "float32"
  extractor = by_dir.extractor(image_size=32, levels=(1, 8), batch_size=2)
  assert isinstance(extractor, features.LevelExtractor)
  pooled = extractor(np.zeros((2, 32, 32, 3), np.float32))
  widths = efficientnet.level_widths(ARCH)
  assert [p.shape for p in pooled] == [(2, widths[1]), (2, widths[8])]


def test_load_backbone_refusals(checkpoint_dir, tmp_path):
  with pytest.raises(ValueError, match=r"--dtype must be one of \['bfloat16', 'float32'\]"):
    backbone_lib.load_backbone(ARCH, checkpoint_dir=checkpoint_dir, dtype="float16")
  with pytest.raises(ValueError, match=f"--checkpoint={tmp_path} is a folder"):
    backbone_lib.load_backbone(ARCH, tmp_path)
  missing = tmp_path / "none.msgpack"
  with pytest.raises(ValueError, match=f"--checkpoint={missing} does not exist"):
    backbone_lib.load_backbone(ARCH, missing)
  path = os.path.join(checkpoint_dir, f"{ARCH}.msgpack")
  with pytest.raises(ValueError, match="holds efficientnet-lite0 weights, but efficientnet-lite1"):
    backbone_lib.load_backbone("efficientnet-lite1", path)
