"""Anomaly maps (localisation): per-location Gaussians on unpooled level maps.

Modules:
  fit          per-location streaming statistics (vmapped mergeable moments), MapState, score
  postprocess  resize, level combination, Gaussian blur, original size, image score (max)
  metrics      pixel AUROC and AUPRO (MVTec AD's per-region overlap up to 30 % FPR)
  overlay      PNG overlays (image, heat map on a colour scale of normal images, contours)
  pipeline     main --maps: streamed per-fold fits, test maps, metrics, outputs
  deploy       maps of a saved detector: out-of-fold pixel threshold and scale, predict --maps_dir
"""

from jax_gad.maps import fit, metrics, overlay, postprocess

__all__ = ["fit", "metrics", "overlay", "postprocess"]
