"""PNG overlays of anomaly maps: image, heat map, ground-truth contour.

Which images (:func:`select`): for every defect type of the test split
(``good`` included), the first ``per_type`` images in the split's order. The
choice does not look at the scores, so the pictures show typical maps, not the
best ones.

Each PNG (:func:`write_overlay`) has two panels: the image with the mask
contour (where the mask has defect pixels), and the image with the heat map
blended over it and the same contour. The colour scale is shared by all
overlays of a category and fold (``vmin``/``vmax``: the 1st and 99.9th
percentiles of all its test-map pixels), so colours compare across images.
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


def color_range(maps: Sequence[np.ndarray]) -> tuple[float, float]:
  """(vmin, vmax) shared by a set of maps: their 1st and 99.9th pixel percentiles."""
  values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
  lo, hi = np.percentile(values, [1.0, 99.9])
  return float(lo), float(max(hi, lo + 1e-12))


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
) -> bytes:
  """PNG bytes of the two-panel overlay of one image.

  Args:
    image: uint8 (H, W, 3) original image.
    amap: (H, W) anomaly map at the image's size.
    mask: (H, W) ground truth (nonzero = defect) or None.
    vmin, vmax: colour scale of the heat map.
    title: figure title.
  """
  import matplotlib  # here: keeps matplotlib (heavy) out of --help; loaded to draw

  matplotlib.use('Agg', force=False)
  from matplotlib import pyplot as plt  # here: after choosing the Agg backend

  image = np.asarray(image)
  amap = np.asarray(amap, np.float32)
  if image.ndim != 3 or image.shape[:2] != amap.shape:
    raise ValueError(
      f'image (H, W, 3) and map (H, W) must agree, got {image.shape} and {amap.shape}.'
    )
  fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=80)
  try:
    axes[0].imshow(image)
    axes[1].imshow(image)
    heat = axes[1].imshow(amap, cmap='jet', alpha=0.5, vmin=vmin, vmax=vmax)
    if mask is not None and np.any(mask):
      for ax in axes:
        ax.contour(np.asarray(mask) > 0, levels=[0.5], colors='white', linewidths=1.0)
    for ax in axes:
      ax.set_axis_off()
    axes[0].set_title('image + mask', fontsize=9)
    axes[1].set_title('anomaly map', fontsize=9)
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
    if title:
      fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', bbox_inches='tight')
    return buf.getvalue()
  finally:
    plt.close(fig)


def write_overlay(
  path: str, image, amap, mask, *, vmin: float, vmax: float, title: str = ''
) -> None:
  """Writes :func:`render`'s PNG to ``path`` atomically."""
  files.atomic_write(path, render(image, amap, mask, vmin=vmin, vmax=vmax, title=title))
