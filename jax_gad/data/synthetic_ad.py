"""A small synthetic anomaly-detection dataset, generated from a seed (nothing downloaded).

Two categories in the MVTec AD mould:

* ``texture``: a plain-weave fabric (threads over/under, per-thread tone,
  low-frequency dye drift, fine noise) with a slightly jittered orientation,
  thread pitch and phase. Defects: ``cut`` (a thin light fibre line),
  ``hole`` (a small dark hole), ``stain`` (a faint colour blob) and ``thread``
  (one thread missing over a stretch, so the crossing threads show through).
* ``object``: a hexagonal steel nut on a dark background, lit from the top
  left, with small jitter of position, rotation, size and lighting. Defects:
  ``color`` (a faint tinted patch), ``contamination`` (a small foreign blob),
  ``crack`` (a thin dark line on the face), ``deformed`` (the nut squashed
  along one axis) and ``missing`` (a bite out of the rim). ``background='flat'``
  (in :func:`generate` and :func:`draw_example`, not in the TFDS dataset)
  draws the same nuts smaller on one constant colour, without noise.

Every image is drawn with numpy from its own random generator, seeded by
(seed, category, split, defect type, index), so the dataset is reproducible
bit for bit and any single image can be regenerated alone. Masks mark the
defect pixels with 255 (0 elsewhere); good images have all-zero masks.

The TFDS builder ``synthetic_ad`` (one config per category) stores the images
as PNG and reads them back without TensorFlow; see ``jax_gad.data.load``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from jax_gad.data import common

# Category -> sorted defect types. Stable codes for seeding come from the order
# of SYNTHETIC_CATEGORIES and the sorted defect names, never from hash().
SYNTHETIC_DEFECTS: dict[str, tuple[str, ...]] = {
  "texture": ("cut", "hole", "stain", "thread"),
  "object": ("color", "contamination", "crack", "deformed", "missing"),
}
SYNTHETIC_CATEGORIES: tuple[str, ...] = ("texture", "object")

# Default size of every category: train (all good) / test (half good) and side.
DEFAULT_N_TRAIN = 60
DEFAULT_N_TEST = 50
DEFAULT_SIZE = 192
DEFAULT_SEED = 0

_SPLIT_CODES = {"train": 0, "test": 1}

# Background variants per category ('default': the images of the TFDS dataset). 'flat' puts a
# smaller nut on one constant colour with no noise: features there have near-zero variance
# across images, the case a per-location covariance needs a ridge for (docs/maps.md).
BACKGROUNDS: dict[str, tuple[str, ...]] = {"texture": ("default",), "object": ("default", "flat")}
FLAT_BACKGROUND = 0.94


# ----------------------------------------------------------------------------
# Drawing helpers (all float64 in [0, 1] until the final quantisation).


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (y, x), each (size, size)."""
  c = np.arange(size, dtype=np.float64) + 0.5
  return np.meshgrid(c, c, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  """Gaussian-filtered white noise with unit standard deviation, (size, size)."""
  n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
  return n / max(float(n.std()), 1e-12)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
  t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _blob(yy, xx, cy, cx, ry, rx, angle) -> np.ndarray:
  """Elliptic radius: 1 on the ellipse boundary, 0 at the centre."""
  c, s = np.cos(angle), np.sin(angle)
  dy, dx = yy - cy, xx - cx
  u = (dx * c + dy * s) / rx
  v = (-dx * s + dy * c) / ry
  return np.sqrt(u * u + v * v)


def _curve_distance(rng, yy, xx, start, length) -> np.ndarray:
  """Distance from every pixel to a random gently bent quadratic Bezier curve."""
  angle = rng.uniform(0, np.pi)
  d = np.array([np.sin(angle), np.cos(angle)])
  p0 = np.asarray(start, dtype=np.float64)
  p2 = p0 + length * d
  normal = np.array([-d[1], d[0]])
  p1 = 0.5 * (p0 + p2) + normal * rng.uniform(-0.25, 0.25) * length
  t = np.linspace(0.0, 1.0, max(int(length * 3), 8))[:, None]
  pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (n, 2) as (y, x)
  # Only pixels near the curve matter: a bounding box keeps this cheap.
  lo = np.floor(pts.min(0) - 4).astype(int).clip(0, yy.shape[0])
  hi = np.ceil(pts.max(0) + 4).astype(int).clip(0, yy.shape[0])
  dist = np.full(yy.shape, np.inf)
  by, bx = yy[lo[0] : hi[0], lo[1] : hi[1]], xx[lo[0] : hi[0], lo[1] : hi[1]]
  if by.size:
    dy = by[..., None] - pts[:, 0]
    dx = bx[..., None] - pts[:, 1]
    dist[lo[0] : hi[0], lo[1] : hi[1]] = np.sqrt((dy * dy + dx * dx).min(-1))
  return dist


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# texture: plain-weave fabric.


def _fabric(rng: np.random.Generator, drng: np.random.Generator, size: int, defect: str):
  yy, xx = _grid(size)
  period = 9.0 * (1.0 + rng.normal(0.0, 0.015))
  theta = np.deg2rad(rng.normal(0.0, 1.0))
  c, s = np.cos(theta), np.sin(theta)
  u = (xx - size / 2) * c + (yy - size / 2) * s + rng.uniform(0, 2 * period)
  v = -(xx - size / 2) * s + (yy - size / 2) * c + rng.uniform(0, 2 * period)
  mask = np.zeros((size, size), bool)

  iu, iv = np.floor(u / period), np.floor(v / period)
  fu, fv = u / period - iu, v / period - iv
  # Per-thread tone (threads indexed by their integer coordinate).
  tone = rng.normal(0.0, 0.035, 512)
  tu = tone[(iu.astype(int) % 256)]
  tv = tone[(iv.astype(int) % 256) + 256]
  warp_on_top = ((iu + iv) % 2) == 0
  warp = 0.5 + 0.45 * np.sin(np.pi * fu) ** 0.7 * (0.82 + 0.18 * np.sin(np.pi * fv)) + tu
  weft = 0.5 + 0.45 * np.sin(np.pi * fv) ** 0.7 * (0.82 + 0.18 * np.sin(np.pi * fu)) + tv
  inten = np.where(warp_on_top, warp, weft)
  if defect == "thread":
    # One warp (or weft) thread is missing over a stretch: the crossing threads
    # show through all along it, with dark gaps between them.
    py, px = drng.integers(int(0.2 * size), int(0.8 * size), 2)
    half = 0.5 * drng.uniform(20.0, 45.0)
    if drng.uniform() < 0.5:
      band = (iu == iu[py, px]) & (np.abs(v - v[py, px]) < half)
      repl = weft * (0.65 + 0.35 * np.sin(np.pi * fv) ** 0.7)
    else:
      band = (iv == iv[py, px]) & (np.abs(u - u[py, px]) < half)
      repl = warp * (0.65 + 0.35 * np.sin(np.pi * fu) ** 0.7)
    inten = np.where(band, repl, inten)
    mask = ndimage.binary_dilation(band, iterations=1)
  inten = inten * (1.0 + 0.03 * _smooth_noise(rng, size, 20.0))
  inten = inten + 0.025 * rng.standard_normal((size, size))

  base = np.array([0.74, 0.64, 0.50]) * (1.0 + rng.normal(0.0, 0.01, 3))
  rgb = inten[..., None] * base

  if defect == "hole":
    cy, cx = drng.uniform(0.15 * size, 0.85 * size, 2)
    r = drng.uniform(2.0, 4.0)
    e = _blob(yy, xx, cy, cx, r, r * drng.uniform(1.0, 1.6), drng.uniform(0, np.pi))
    m = 1.0 - _smoothstep(0.7, 1.2, e)
    rgb = rgb * (1.0 - drng.uniform(0.45, 0.75) * m[..., None])
    mask = e < 1.0
  elif defect == "stain":
    cy, cx = drng.uniform(0.15 * size, 0.85 * size, 2)
    r = drng.uniform(8.0, 15.0)
    e = _blob(yy, xx, cy, cx, r, r * drng.uniform(1.0, 1.8), drng.uniform(0, np.pi))
    irregular = np.clip(1.0 + 0.25 * _smooth_noise(drng, size, 3.0), 0.7, 1.3)
    w = np.exp(-0.5 * (e * 1.6 * irregular) ** 2)
    tint = drng.choice([[-0.6, -0.2, 0.5], [-0.4, 0.3, -0.3], [0.2, -0.3, -0.6]])
    rgb = rgb + drng.uniform(0.08, 0.15) * w[..., None] * np.asarray(tint)
    mask = w > 0.3
  elif defect == "cut":
    start = drng.uniform(0.15 * size, 0.85 * size, 2)
    dist = _curve_distance(drng, yy, xx, start, drng.uniform(25.0, 55.0))
    width = drng.uniform(0.6, 1.1)
    line = np.exp(-0.5 * (dist / width) ** 2)
    rgb = rgb + drng.uniform(0.2, 0.35) * line[..., None]
    mask = dist < width + 1.0
  return rgb, mask


# ----------------------------------------------------------------------------
# object: hexagonal nut.


def _hexagon_radius(yy, xx, cy, cx, angle, squash=1.0, squash_angle=0.0) -> np.ndarray:
  """Hexagon 'radius' (1 on the boundary of a unit-apothem hexagon)."""
  dy, dx = yy - cy, xx - cx
  if squash != 1.0:
    cs, sn = np.cos(squash_angle), np.sin(squash_angle)
    a = dx * cs + dy * sn
    b = -dx * sn + dy * cs
    a = a / squash
    dx, dy = a * cs - b * sn, a * sn + b * cs
  r = np.zeros_like(dx)
  for k in range(6):
    phi = angle + k * np.pi / 3
    r = np.maximum(r, dx * np.cos(phi) + dy * np.sin(phi))
  return r


def _nut(
  rng: np.random.Generator,
  drng: np.random.Generator,
  size: int,
  defect: str,
  background: str = "dark",
):
  yy, xx = _grid(size)
  flat = background == "flat"
  cy = size / 2 + rng.normal(0.0, 1.5)
  cx = size / 2 + rng.normal(0.0, 1.5)
  # The flat variant's nut is smaller, so that a wide band of constant background surrounds it.
  apothem = (0.24 if flat else 0.34) * size * (1.0 + rng.normal(0.0, 0.01))
  angle = np.deg2rad(rng.normal(0.0, 4.0))
  light = np.deg2rad(225.0 + rng.normal(0.0, 5.0))
  mask = np.zeros((size, size), bool)

  squash, squash_angle = 1.0, 0.0
  if defect == "deformed":
    squash = 1.0 - drng.uniform(0.05, 0.09)
    squash_angle = drng.uniform(0, np.pi)
  hexr = _hexagon_radius(yy, xx, cy, cx, angle, squash, squash_angle) / apothem
  dy, dx = yy - cy, xx - cx
  rad = np.sqrt(dy * dy + dx * dx) / apothem
  theta = np.arctan2(dy, dx)

  # Background: dark, with a faint vignette and sensor noise.
  bg = 0.13 + 0.03 * (1.0 - ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (0.5 * size**2))
  bg = bg[..., None] * np.array([0.95, 1.0, 1.08])
  if flat:
    bg = np.full_like(bg, FLAT_BACKGROUND)

  # Face: brushed steel, chamfered rim lit from `light`, threaded bore.
  brushed = ndimage.gaussian_filter(rng.standard_normal((size, size)), (0.6, 4.0))
  brushed = brushed / max(float(brushed.std()), 1e-12)
  face = 0.58 + 0.03 * brushed + 0.04 * _smooth_noise(rng, size, 12.0)
  chamfer = _smoothstep(0.80, 0.98, hexr)
  face = face + 0.22 * chamfer * np.cos(theta - light)
  bore = 0.42
  ring = 1.0 - _smoothstep(bore, bore + 0.12, rad)
  face = face * (1.0 - 0.25 * ring) + 0.06 * ring * np.sin(2 * np.pi * rad * apothem / 3.0)
  face_rgb = face[..., None] * (np.array([1.0, 0.98, 0.94]) * (1.0 + rng.normal(0.0, 0.01, 3)))

  inside = 1.0 - _smoothstep(0.985, 1.015, hexr)
  hole = _smoothstep(bore - 0.12, bore - 0.1, rad)  # 0 inside the bore
  alpha = inside * hole
  if defect == "deformed":
    nominal = _hexagon_radius(yy, xx, cy, cx, angle) / apothem
    mask = (nominal < 1.0) != (hexr < 1.0)

  def on_face():
    r = drng.uniform(0.55, 0.8) * apothem
    t = drng.uniform(0, 2 * np.pi)
    return cy + r * np.sin(t), cx + r * np.cos(t)

  if defect == "missing":
    # A bite centred just outside a random point of the rim, reaching between
    # half and all of its radius into the nut.
    offset = drng.uniform(-0.35, 0.35)  # angle from the normal of an edge
    t = angle + drng.integers(6) * np.pi / 3 + offset
    br = drng.uniform(0.08, 0.14) * apothem
    r = apothem / np.cos(offset) + br * drng.uniform(0.0, 0.5)
    by, bx = cy + r * np.sin(t), cx + r * np.cos(t)
    e = _blob(yy, xx, by, bx, br, br * drng.uniform(1.0, 1.5), drng.uniform(0, np.pi))
    keep = _smoothstep(0.9, 1.1, e)
    mask = (e < 1.0) & (inside > 0.5)
    alpha = alpha * keep
  elif defect == "crack":
    dist = _curve_distance(drng, yy, xx, on_face(), drng.uniform(0.2, 0.4) * apothem)
    width = drng.uniform(0.6, 1.0)
    line = np.exp(-0.5 * (dist / width) ** 2) * alpha
    face_rgb = face_rgb * (1.0 - drng.uniform(0.3, 0.55) * line[..., None])
    mask = (dist < width + 1.0) & (alpha > 0.5)
  elif defect == "contamination":
    py, px = on_face()
    r = drng.uniform(2.5, 5.0)
    e = _blob(yy, xx, py, px, r, r * drng.uniform(1.0, 1.7), drng.uniform(0, np.pi))
    e = e * np.clip(1.0 + 0.3 * _smooth_noise(drng, size, 1.5), 0.6, 1.4)
    w = 1.0 - _smoothstep(0.8, 1.1, e)
    colour = drng.choice([[0.35, 0.25, 0.15], [0.30, 0.38, 0.22], [0.20, 0.20, 0.22]])
    colour = np.asarray(colour) * (1.0 + 0.2 * drng.standard_normal(3).clip(-1, 1))
    mix = drng.uniform(0.6, 0.9) * w[..., None]
    face_rgb = face_rgb * (1.0 - mix) + mix * colour
    mask = (w > 0.5) & (alpha > 0.5)
  elif defect == "color":
    py, px = on_face()
    r = drng.uniform(0.12, 0.22) * apothem
    e = _blob(yy, xx, py, px, r, r * drng.uniform(1.0, 1.6), drng.uniform(0, np.pi))
    w = np.exp(-0.5 * (1.5 * e) ** 2) * alpha
    tint = drng.choice([[0.5, 0.1, -0.5], [-0.3, -0.1, 0.5], [0.4, -0.2, 0.3]])
    face_rgb = face_rgb + drng.uniform(0.1, 0.18) * w[..., None] * np.asarray(tint)
    mask = w > 0.3

  rgb = alpha[..., None] * face_rgb + (1.0 - alpha[..., None]) * bg
  noise = 0.01 * rng.standard_normal(rgb.shape)
  # Flat: the sensor noise only on the nut, so the background is one constant colour.
  rgb = rgb + (alpha[..., None] * noise if flat else noise)
  return rgb, mask


_DRAW = {"texture": _fabric, "object": _nut}


def _check_background(category: str, background: str) -> None:
  if background not in BACKGROUNDS.get(category, ("default",)):
    raise ValueError(
      f"background={background!r} is not available for synthetic_ad category {category!r}; "
      f"valid: {', '.join(BACKGROUNDS.get(category, ('default',)))}"
    )


def draw_example(
  category: str,
  defect: str,
  seed: int,
  split: str,
  index: int,
  size: int,
  with_defect: bool = True,
  background: str = "default",
):
  """Draws one example: (image uint8 (size, size, 3), mask uint8 (size, size) 0/255).

  The normal appearance (pose, lighting, texture, noise) and the defect are
  drawn from two independent random streams, both seeded by (seed, category,
  split, defect type, index). ``with_defect=False`` therefore renders the very
  same image without its defect (and an all-zero mask): the defect-free twin.
  ``background='flat'`` (``object`` only, see :data:`BACKGROUNDS`) draws the
  same nuts, smaller, on one constant colour.
  """
  _check_background(category, background)
  defect_code = 0 if defect == "good" else 1 + SYNTHETIC_DEFECTS[category].index(defect)
  entropy = [seed, SYNTHETIC_CATEGORIES.index(category), _SPLIT_CODES[split], defect_code, index]
  base_seq, defect_seq = np.random.SeedSequence(entropy).spawn(2)
  drawn = defect if with_defect else "good"
  extra = {} if background == "default" else {"background": background}
  rgb, mask = _DRAW[category](
    np.random.default_rng(base_seq), np.random.default_rng(defect_seq), size, drawn, **extra
  )
  if drawn == "good":
    mask = np.zeros((size, size), bool)
  elif not mask.any():
    raise AssertionError(f"empty mask for {category}/{defect}/{index}")
  return _to_uint8(rgb), mask.astype(np.uint8) * 255


def split_layout(category: str, split: str, n_train: int, n_test: int) -> list[tuple[str, int]]:
  """(defect type, index within its folder) of every image of a split, in order.

  The train split holds ``n_train`` good images. Half the test images (rounded
  up) are good, the rest are spread as evenly as possible over the category's
  defect types (earlier types get the extra ones). Folders are sorted by name
  and files by index, as in MVTec AD.
  """
  if split == "train":
    return [("good", i) for i in range(n_train)]
  defects = SYNTHETIC_DEFECTS[category]
  n_good = (n_test + 1) // 2
  n_bad = n_test - n_good
  counts = {d: n_bad // len(defects) + (i < n_bad % len(defects)) for i, d in enumerate(defects)}
  counts["good"] = n_good
  return [(d, i) for d in sorted(counts) for i in range(counts[d])]


def _check_args(category, seed, n_train, n_test, size):
  if category not in SYNTHETIC_DEFECTS:
    raise ValueError(
      f"unknown synthetic_ad category {category!r}; valid categories: "
      f"{', '.join(SYNTHETIC_CATEGORIES)}"
    )
  for name, value, low in (
    ("seed", seed, 0),
    ("n_train", n_train, 1),
    ("n_test", n_test, 0),
    ("size", size, 64),
  ):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def generate(
  category: str,
  seed: int = DEFAULT_SEED,
  n_train: int = DEFAULT_N_TRAIN,
  n_test: int = DEFAULT_N_TEST,
  size: int = DEFAULT_SIZE,
  background: str = "default",
) -> dict[str, list[dict]]:
  """Generates one category in memory.

  Args:
    category: one of ``SYNTHETIC_CATEGORIES``.
    seed: non-negative int; the same arguments always give the same arrays.
    n_train: number of (good) training images.
    n_test: number of test images; half (rounded up) are good.
    size: image side in pixels (>= 64; defects have absolute pixel sizes).
    background: 'default', or 'flat' for ``object`` (:data:`BACKGROUNDS`).

  Returns:
    ``{'train': [...], 'test': [...]}``; each example is a dict with 'image'
    uint8 (size, size, 3), 'mask' uint8 (size, size) with values 0/255,
    'label' int (0 good, 1 defect), 'defect_type' str and 'file_name' str
    (e.g. 'test/crack/003.png'), in dataset order.
  """
  _check_background(category, background)
  return {
    s: list(_iter_split(category, s, seed, n_train, n_test, size, background))
    for s in ("train", "test")
  }


def _iter_split(
  category, split, seed, n_train, n_test, size, background="default"
) -> Iterator[dict]:
  _check_args(category, seed, n_train, n_test, size)
  for defect, index in split_layout(category, split, n_train, n_test):
    image, mask = draw_example(category, defect, seed, split, index, size, background=background)
    yield {
      "image": image,
      "mask": mask,
      "label": int(defect != "good"),
      "defect_type": defect,
      "file_name": f"{split}/{defect}/{index:03d}.png",
    }


# ----------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass
class SyntheticAdConfig(tfds.core.BuilderConfig):
  """One synthetic category and its size; the name identifies the prepared data.

  The default configs are named after their category. A custom config (e.g. a
  tiny one for tests) needs its own name so it is prepared in its own folder.
  """

  category: str = "texture"
  seed: int = DEFAULT_SEED
  n_train: int = DEFAULT_N_TRAIN
  n_test: int = DEFAULT_N_TEST
  size: int = DEFAULT_SIZE


class SyntheticAd(common.IntegrityMixin, tfds.core.GeneratorBasedBuilder):
  """Synthetic anomaly-detection images (texture and object), generated from a seed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "First release: 'texture' (woven fabric, 4 defect types) and "
    "'object' (hexagonal nut, 5 defect types), 60 train / 50 test "
    "images of 192x192 each.",
  }
  BUILDER_CONFIGS = [
    SyntheticAdConfig(
      name=c,
      category=c,
      description=f"Synthetic '{c}' category, defects: {', '.join(SYNTHETIC_DEFECTS[c])}.",
    )
    for c in SYNTHETIC_CATEGORIES
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Synthetic anomaly detection data in the MVTec AD layout: defect-free "
        "training images, test images that are defect-free or show one of "
        "several small defects, with pixel masks. Drawn with numpy from a seed."
      ),
      features=common.features(),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    _check_args(cfg.category, cfg.seed, cfg.n_train, cfg.n_test, cfg.size)
    # A split without examples (n_test=0) is left out: TFDS cannot write an empty one.
    return {
      split: self._generate_examples(split)
      for split in common.SPLITS
      if split == "train" or cfg.n_test > 0
    }

  def _generate_examples(self, split):
    cfg = self.builder_config
    recorder = common.SplitRecorder()
    for ex in _iter_split(cfg.category, split, cfg.seed, cfg.n_train, cfg.n_test, cfg.size):
      content = common.sha256(
        repr((ex["image"].shape, ex["mask"].shape)).encode()
        + ex["image"].tobytes()
        + ex["mask"].tobytes()
      )
      image_png, mask_png = common.encode_png(ex["image"]), common.encode_png(ex["mask"])
      key = recorder.add(
        ex["file_name"], ex["label"], ex["defect_type"], content, stored=(image_png, mask_png)
      )
      yield (
        key,
        {
          "image": image_png,
          "mask": mask_png,
          "label": ex["label"],
          "defect_type": ex["defect_type"],
          "file_name": ex["file_name"],
        },
      )
    common.store_split_metadata(self.info, split, recorder)
