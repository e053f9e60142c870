"""jax_gad.models.efficientnet against the PyTorch reference packages.

The references are ``efficientnet-pytorch`` (B-family) and
``efficientnet-lite-pytorch`` (Lite-family) models; their weights reach the
Flax model only through ``torch.save`` -> ``read_torch_checkpoint`` ->
``from_torch``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from efficientnet_lite_pytorch import EfficientNet as LiteNet  # noqa: E402
from efficientnet_pytorch import EfficientNet as BNet  # noqa: E402

from jax_gad import checkpoint, convert  # noqa: E402
from jax_gad.models import efficientnet as effnet  # noqa: E402

torch.set_num_threads(2)

ALL_ARCHS = [f"efficientnet-b{i}" for i in range(8)] + [f"efficientnet-lite{i}" for i in range(5)]


def _torch_class(arch):
  return LiteNet if "lite" in arch else BNet


def _torch_levels(model, x):
  """The 9 levels of a torch EfficientNet as NHWC numpy arrays.

  Stage boundaries come from the torch model itself: the first block of each
  stage carries the stage's ``num_repeat``.
  """
  with torch.no_grad():
    y = model._swish(model._bn0(model._conv_stem(x)))
    out = [y]
    blocks = list(model._blocks)
    i = 0
    while i < len(blocks):
      n = blocks[i]._block_args.num_repeat
      for block in blocks[i : i + n]:
        y = block(y)
      out.append(y)
      i += n
    out.append(model._swish(model._bn1(model._conv_head(y))))
  return [o.permute(0, 2, 3, 1).numpy() for o in out]


def _randomise_batchnorm(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _assert_levels_close(ours, ref, rtol):
  assert len(ours) == len(ref) == 9
  for level, (a, b) in enumerate(zip(ours, ref)):
    a = np.asarray(a, np.float32)
    assert a.shape == b.shape, (level, a.shape, b.shape)
    scale = np.abs(b).max()
    assert scale > 0, level
    err = np.abs(a - b).max()
    assert err <= rtol * scale, f"level {level}: max abs err {err:.3g} > {rtol} x {scale:.3g}"


@pytest.fixture(scope="module")
def random_net(tmp_path_factory):
  """Returns arch -> (torch model, converted variables), built once per arch.

  The torch B-model gets random weights and random BatchNorm affine
  parameters and running statistics; its state dict goes through torch.save
  in both formats, read_torch_checkpoint and from_torch.
  """
  cache = {}

  def build(arch):
    if arch in cache:
      return cache[arch]
    torch.manual_seed(0)
    model = BNet.from_name(arch, image_size=None).eval()  # dynamic SAME padding
    _randomise_batchnorm(model, seed=1)
    d = tmp_path_factory.mktemp(arch)
    torch.save(model.state_dict(), d / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(model.state_dict(), d / "zip.pth")
    legacy = convert.read_torch_checkpoint(d / "legacy.pth")
    zipped = convert.read_torch_checkpoint(d / "zip.pth")
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    for state in (legacy, zipped):
      assert list(state) == list(reference)
      for k in reference:
        assert state[k].dtype == reference[k].dtype, k
        assert np.array_equal(state[k], reference[k]), k
    variables = convert.from_torch(legacy, arch)
    jax.tree_util.tree_map(
      np.testing.assert_array_equal, variables, convert.from_torch(zipped, arch)
    )
    cache[arch] = model, variables
    return cache[arch]

  return build


@pytest.mark.parametrize("arch", ["efficientnet-b0", "efficientnet-b4"])
@pytest.mark.parametrize("size", [(64, 64), (67, 61)], ids=["64x64", "67x61"])
def test_random_weights_match_pytorch(random_net, arch, size):
  model, variables = random_net(arch)
  g = torch.Generator().manual_seed(2)
  x = torch.randn(2, 3, *size, generator=g)
  ref = _torch_levels(model, x)
  module = effnet.create(arch, depthwise="xla")
  ours = jax.jit(module.apply)(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  _assert_levels_close(ours, ref, 1e-4)


def test_b4_native_resolution_and_depthwise_impls_agree(random_net):
  arch = "efficientnet-b4"
  model, variables = random_net(arch)
  size = effnet.native_resolution(arch)
  x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
  ref = _torch_levels(model, x)
  xj = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  shift = jax.jit(effnet.create(arch, depthwise="shift").apply)(variables, xj)
  _assert_levels_close(shift, ref, 1e-4)
  xla = jax.jit(effnet.create(arch, depthwise="xla").apply)(variables, xj)
  _assert_levels_close(xla, [np.asarray(s) for s in shift], 1e-5)


@pytest.mark.parametrize(
  "shape, k, stride, pads",
  [
    ((2, 7, 5, 16), 3, 1, ((1, 1), (1, 1))),
    ((1, 6, 9, 8), 5, 1, ((2, 2), (2, 2))),
    ((1, 4, 4, 8), 5, 1, ((0, 2), (2, 2))),  # a row band: no halo above
    ((1, 5, 3, 8), 3, 1, ((1, 0), (1, 1))),  # a row band: no halo below
    ((1, 1, 1, 8), 5, 1, ((2, 2), (2, 2))),
    ((1, 6, 5, 200), 5, 1, ((2, 2), (2, 2))),  # channels in two pieces (160 + 40)
    ((1, 4, 6, 500), 3, 1, ((1, 1), (1, 1))),  # 448 + 52
    ((2, 9, 8, 16), 3, 2, ((0, 1), (0, 1))),
    ((1, 11, 10, 8), 5, 2, ((1, 2), (1, 2))),
  ],
)
def test_shift_depthwise_equals_grouped_convolution(shape, k, stride, pads):
  """Both depthwise forms, on odd sizes, the one-sided pads of row bands and channel pieces."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, shape[-1])), jnp.float32)
  shift = effnet._depthwise(x, kernel, stride, pads, "shift")
  xla = effnet._depthwise(x, kernel, stride, pads, "xla")
  assert shift.shape == xla.shape
  np.testing.assert_allclose(np.asarray(shift), np.asarray(xla), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lite0():
  path = checkpoint.packaged_weights_path("efficientnet-lite0")
  model = LiteNet.from_name("efficientnet-lite0")
  model.load_state_dict(torch.load(path, map_location="cpu"))
  model.eval()
  variables = convert.from_torch(convert.read_torch_checkpoint(path), "efficientnet-lite0")
  return model, variables


def _chelsea_224():
  from PIL import Image
  from skimage import data

  img = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
  x = np.asarray(img, np.float32)[None]
  return (x - 127.0) / 128.0  # the Lite normalisation, (255 x - 127) / 128


def test_lite0_real_weights_match_pytorch_and_see_a_cat(lite0):
  model, variables = lite0
  x = _chelsea_224()
  ref = _torch_levels(model, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  levels = jax.jit(effnet.create("efficientnet-lite0").apply)(variables, jnp.asarray(x))
  _assert_levels_close(levels, ref, 1e-4)

  logits = np.asarray(effnet.classify(variables, "efficientnet-lite0", levels[8].mean(axis=(1, 2))))
  with torch.no_grad():
    torch_logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  np.testing.assert_allclose(logits, torch_logits, atol=1e-3 * np.abs(torch_logits).max())
  top5 = np.argsort(-logits[0])[:5]
  assert set(top5.tolist()) & set(range(281, 286)), top5  # tabby/tiger/Persian/Siamese/Egyptian cat


def test_mean_std_follow_documented_rules():
  lite = effnet.ARCHS["efficientnet-lite0"]
  x = np.linspace(0, 1, 7)
  np.testing.assert_allclose((x - lite.mean[0]) / lite.std[0], (255 * x - 127) / 128, atol=1e-12)
  assert effnet.ARCHS["efficientnet-b4"].mean == (0.485, 0.456, 0.406)
  assert effnet.ARCHS["efficientnet-b4"].std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_architecture_tables_match_pytorch(arch):
  with torch.device("meta"):
    model = _torch_class(arch).from_name(arch)
  widths = [model._bn0.num_features]
  blocks = list(model._blocks)
  i = 0
  while i < len(blocks):
    i += blocks[i]._block_args.num_repeat
    widths.append(blocks[i - 1]._bn2.num_features)
  widths.append(model._bn1.num_features)
  assert effnet.level_widths(arch) == tuple(widths)
  assert len(effnet.block_specs(arch)) == len(blocks)
  assert effnet.native_resolution(arch) == model._global_params.image_size
  # every state-dict key and shape is accounted for by from_torch
  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
  variables = convert.from_torch(state, arch)
  assert variables["params"]["classifier"]["kernel"].shape == (widths[-1], 1000)


@pytest.mark.parametrize("arch", ["efficientnet-b0", "efficientnet-lite0"])
def test_init_and_from_torch_agree_on_variable_layout(arch):
  variables = effnet.init(arch, jax.random.key(0), 32)
  shapes = jax.eval_shape(
    effnet.create(arch).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
  flat = {
    tuple(k.key for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
  }
  assert flat == convert.expected_shapes(arch)
  again = effnet.init(arch, jax.random.key(0), 32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, again)


def test_bfloat16_compute_stays_close_to_float32():
  arch = "efficientnet-b0"
  variables = effnet.init(arch, jax.random.key(0), 32)
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  f32 = jax.jit(effnet.create(arch, depthwise="xla").apply)(variables, x)
  bf16 = jax.jit(effnet.create(arch, depthwise="xla", dtype=jnp.bfloat16).apply)(variables, x)
  for a, b in zip(f32, bf16):
    assert b.dtype == jnp.bfloat16 and a.dtype == jnp.float32
    assert np.abs(np.asarray(b, np.float32) - np.asarray(a)).max() <= 0.1 * np.abs(a).max()


def test_default_depthwise_per_backend():
  assert effnet.default_depthwise("cpu") == "shift"
  assert effnet.default_depthwise("gpu") == "xla"
  assert effnet.default_depthwise("tpu") == "xla"
  assert effnet.create("efficientnet-b0").depthwise == effnet.default_depthwise(
    jax.default_backend()
  )
  with pytest.raises(ValueError, match="backend"):
    effnet.default_depthwise("")


def test_invalid_arguments_are_named():
  with pytest.raises(ValueError, match="efficientnet-b0.*efficientnet-lite4"):
    effnet.create("efficientnet-b9")
  with pytest.raises(ValueError, match="depthwise"):
    effnet.create("efficientnet-b0", depthwise="fft")
  with pytest.raises(ValueError, match="dtype"):
    effnet.create("efficientnet-b0", dtype=jnp.int32)
  with pytest.raises(ValueError, match="arch"):
    effnet.level_widths("resnet50")
  variables = effnet.init("efficientnet-b0", jax.random.key(0), 32)
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    effnet.create("efficientnet-b0").apply(variables, jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="classifier"):
    effnet.classify(variables, "efficientnet-b0", jnp.zeros((1, 1280)))


def test_init_gives_finite_varied_levels():
  arch = "efficientnet-lite0"
  variables = effnet.init(arch, jax.random.key(1))
  leaves = jax.tree_util.tree_leaves(variables)
  assert all(l.dtype == np.float32 and np.all(np.isfinite(l)) for l in leaves)
  assert float(np.std(variables["batch_stats"]["stem_bn"]["var"])) > 0  # BatchNorm exercised
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  maps = jax.jit(effnet.create(arch).apply)(variables, x)
  assert [m.shape[-1] for m in maps] == list(effnet.level_widths(arch))
  for m in maps:
    assert np.all(np.isfinite(m)) and float(jnp.std(m)) > 0


@pytest.mark.parametrize("depthwise", ["shift", "xla"])
def test_split_bytes_keeps_results(random_net, depthwise):
  """Per-image lax.map and row bands (tiny split_bytes) give the torch levels."""
  arch = "efficientnet-b0"
  model, variables = random_net(arch)
  x = torch.randn(3, 3, 67, 61, generator=torch.Generator().manual_seed(4))
  ref = _torch_levels(model, x)
  xj = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  whole = jax.jit(effnet.create(arch, depthwise=depthwise, split_bytes=0).apply)(variables, xj)
  _assert_levels_close(whole, ref, 1e-4)
  # 3 images x 34 x 31 x 96 float32 expanded maps are ~1.2 MB: 256 KiB splits the
  # batch into images for the first blocks and their largest maps into bands.
  module = effnet.create(arch, depthwise=depthwise, split_bytes=1 << 18)
  assert 0 < effnet._per_image_blocks(effnet.block_specs(arch), xj.shape, 4, 1 << 18) < 16
  split = jax.jit(module.apply)(variables, xj)
  _assert_levels_close(split, ref, 1e-4)
  _assert_levels_close(split, [np.asarray(w) for w in whole], 1e-5)


@pytest.mark.parametrize("split_bytes", [0, 1 << 18], ids=["whole", "split"])
def test_pool_equals_mean_of_level_maps(random_net, split_bytes):
  """pool=True (what the extractor uses) pools each level where it is produced."""
  arch = "efficientnet-b0"
  _, variables = random_net(arch)
  xj = jnp.asarray(np.random.default_rng(6).normal(size=(3, 67, 61, 3)), jnp.float32)
  module = effnet.create(arch, split_bytes=split_bytes)
  maps = jax.jit(module.apply)(variables, xj)
  pooled = jax.jit(functools.partial(module.apply, pool=True))(variables, xj)
  assert len(pooled) == len(maps) == effnet.NUM_LEVELS
  for p, m in zip(pooled, maps):
    assert p.dtype == jnp.float32 and p.shape == (3, m.shape[-1])
    np.testing.assert_allclose(p, np.mean(np.asarray(m, np.float64), axis=(1, 2)), atol=1e-5)


def test_split_bytes_default_and_checks():
  assert effnet.default_split_bytes("cpu") > 0
  assert effnet.default_split_bytes("gpu") == 0
  assert effnet.create("efficientnet-b0", split_bytes=0).split_bytes == 0
  assert effnet.create("efficientnet-b0").split_bytes == effnet.default_split_bytes(
    jax.default_backend()
  )
  for bad in (-1, 1.5, True, "8M"):
    with pytest.raises(ValueError, match="split_bytes"):
      effnet.create("efficientnet-b0", split_bytes=bad)
  with pytest.raises(ValueError, match="backend"):
    effnet.default_split_bytes("")


@pytest.mark.parametrize("shape", [(0, 32, 32, 3), (1, 0, 32, 3), (1, 32, 0, 3)])
def test_empty_batch_or_image_refused(shape):
  variables = effnet.init("efficientnet-lite0", jax.random.key(0))
  with pytest.raises(ValueError, match="non-empty N, H and W"):
    effnet.create("efficientnet-lite0").apply(variables, jnp.zeros(shape))


def test_symbolic_batch_traces_for_jax_export():
  """jax_gad.export lowers the network for a symbolic batch size (each dim checked alone)."""
  from jax import export

  variables = effnet.init("efficientnet-lite0", jax.random.key(0))
  module = effnet.create("efficientnet-lite0", split_bytes=0)
  (n,) = export.symbolic_shape("n")
  spec = jax.ShapeDtypeStruct((n, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(lambda x: module.apply(variables, x, pool=True), spec)
  assert [o.shape for o in out] == [(n, w) for w in effnet.level_widths("efficientnet-lite0")]
