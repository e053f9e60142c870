"""PNG overlays of anomaly maps: image, heat map, ground-truth contour.

Which images (:func:`select`): for every defect type of the test split
(``good`` included), the first ``per_type`` images in the split's order. The
choice does not look at the scores, so the pictures show typical maps, not the
best ones.

Each PNG (:func:`write_overlay`) has two panels: the image with the mask
contour (where the mask has defect pixels), and the image with the heat map
blended over it and the same contour. The colour scale is shared by all
overlays of a category and fold, so colours compare across images, and comes
from maps of normal images, never from the image being drawn (``main --maps``:
the fold's held-out training images; ``predict --maps_dir``: the detector's
out-of-fold training maps): a defect is the top of the scale, and a region
above the scale saturates (:func:`scaled` is what the heat panel draws).
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import os
import re

import numpy as np

from jax_gad import files


def select(defect_types: Sequence[str], per_type: int = 2) -> list[int]:
  """Indices of the first ``per_type`` images of each defect type, in split order."""
  if isinstance(per_type, bool) or not isinstance(per_type, int) or per_type < 0:
    raise ValueError(f'per_type must be an int >= 0, got {per_type!r}.')
  taken: dict[str, int] = {}
  out = []
  for i, kind in enumerate(defect_types):
    if taken.get(kind, 0) < per_type:
      taken[kind] = taken.get(kind, 0) + 1
      out.append(i)
  return out


SCALE_PERCENTILES = (1.0, 99.9)


def color_scale(maps: Sequence[np.ndarray]) -> tuple[float, float]:
  """(vmin, vmax) from maps of normal images: their :data:`SCALE_PERCENTILES` of the pixels."""
  values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
  lo, hi = np.percentile(values, SCALE_PERCENTILES)
  return float(lo), float(max(hi, lo + 1e-12))


def scaled(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """The map on the colour scale: ``(amap - vmin) / (vmax - vmin)`` clipped to [0, 1]."""
  if not vmax > vmin:
    raise ValueError(f"the colour scale needs vmax > vmin, got vmin={vmin!r}, vmax={vmax!r}.")
  return np.clip((np.asarray(amap, np.float32) - vmin) / (vmax - vmin), 0.0, 1.0)


def file_name(index: int, file_name_in_split: str) -> str:
  """A safe PNG name for one test image, e.g. ``007_test_crack_000.png``."""
  stem = re.sub(r'[^A-Za-z0-9]+', '_', os.path.splitext(file_name_in_split)[0]).strip('_')
  return f'{index:03d}_{stem}.png'


def render(
  image: np.ndarray,
  amap: np.ndarray,
  mask: np.ndarray | None,
  *,
  vmin: float,
  vmax: float,
  title: str = '',
  predicted: np.ndarray | None = None,
) -> bytes:
  """PNG bytes of the two-panel overlay of one image.

  Args:
    image: uint8 (H, W, 3) original image.
    amap: (H, W) anomaly map at the image's size.
    mask: (H, W) ground truth (nonzero = defect, white contour) or None.
    vmin, vmax: colour scale of the heat map (:func:`scaled`).
    title: figure title.
    predicted: (H, W) bool predicted mask (magenta contour) or None.
  """
  import matplotlib  # here: keeps matplotlib (heavy) out of --help; loaded to draw

  matplotlib.use('Agg', force=False)
  from matplotlib import cm, colors  # here: after choosing the Agg backend
  from matplotlib import pyplot as plt  # here: after choosing the Agg backend

  image = np.asarray(image)
  amap = np.asarray(amap, np.float32)
  if image.ndim != 3 or image.shape[:2] != amap.shape:
    raise ValueError(
      f'image (H, W, 3) and map (H, W) must agree, got {image.shape} and {amap.shape}.'
    )
  heat = scaled(amap, vmin, vmax)
  fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=80)
  try:
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(heat, cmap='jet', alpha=0.5, vmin=0.0, vmax=1.0)
    for outline, colour in ((mask, 'white'), (predicted, 'magenta')):
      if outline is not None and np.any(outline):
        for ax in axes:
          ax.contour(np.asarray(outline) > 0, levels=[0.5], colors=colour, linewidths=1.0)
    for ax in axes:
      ax.set_axis_off()
    axes[0].set_title('image + mask' if predicted is None else 'image + predicted mask', fontsize=9)
    axes[1].set_title('anomaly map', fontsize=9)
    bar = cm.ScalarMappable(colors.Normalize(vmin, vmax), cmap='jet')
    fig.colorbar(bar, ax=axes[1], fraction=0.046, pad=0.02)
    if title:
      fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', bbox_inches='tight')
    return buf.getvalue()
  finally:
    plt.close(fig)


def write_overlay(
  path: str, image, amap, mask, *, vmin: float, vmax: float, title: str = '', predicted=None
) -> None:
  """Writes :func:`render`'s PNG to ``path`` atomically."""
  png = render(image, amap, mask, vmin=vmin, vmax=vmax, title=title, predicted=predicted)
  files.atomic_write(path, png)
