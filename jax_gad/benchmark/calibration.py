r"""How well the calibrated threshold keeps its false-positive rate, on the synthetic set.

  python -m jax_gad.benchmark.calibration --arch=efficientnet-lite0 --tfds_dir=/tmp/tfds

For each synthetic category: a detector fitted on the 60 training images
(:func:`jax_gad.detector.fit_features`, every level) at each target FPR; its
FPR on the out-of-fold scores, on the test split's good images and on a
held-out good split (``--heldout_images`` more training-distribution images,
drawn with seed 1, never fitted on), and its TPR on the test defects; the
same for the 3-sigma chi-squared threshold. Prints a markdown table (the one
in docs/own-images.md, "Thresholds from normal data only").
"""

from __future__ import annotations

import os
import sys

import numpy as np

TARGETS = (0.01, 0.05, 0.1)


def measure(
  arch: str,
  *,
  checkpoint=None,
  checkpoint_dir="checkpoints",
  tfds_dir=None,
  image_size=None,
  batch_size=16,
  targets=TARGETS,
  heldout_images=100,
  categories=("texture", "object"),
  n_train=None,
  n_test=None,
  size=None,
  progress=False,
) -> list[dict]:
  """One row per (category, target FPR); see the module docstring."""
  from jax_gad import backbone as backbone_lib
  from jax_gad import data
  from jax_gad import detector as detector_lib
  from jax_gad.data import pipeline, synthetic_ad
  from jax_gad.models import efficientnet

  backbone, meta, sha = backbone_lib.load_backbone(arch, checkpoint, checkpoint_dir)
  side = int(image_size or meta["resolution"])
  levels = tuple(range(efficientnet.NUM_LEVELS))
  extractor = backbone.extractor(image_size=side, levels=levels, batch_size=batch_size)

  def pooled(split):
    return pipeline.pooled_features(
      extractor, split, image_size=side, mean=meta["mean"], std=meta["std"], progress=progress
    )

  def split_of(name, category, seed, n_tr, n_te, which):
    kw = {k: v for k, v in (("n_train", n_tr), ("n_test", n_te), ("size", size)) if v is not None}
    cfg = synthetic_ad.SyntheticAdConfig(name=name, category=category, seed=seed, **kw)
    builder = synthetic_ad.SyntheticAd(config=cfg, data_dir=tfds_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()
    return data.Split.from_builder(builder, which)

  rows = []
  for category in categories:
    tag = f"{n_train}_{n_test}_{size}" if (n_train or n_test or size) else "default"
    train = split_of(f"cal_{category}_{tag}", category, 0, n_train, n_test, "train")
    test = split_of(f"cal_{category}_{tag}", category, 0, n_train, n_test, "test")
    held = split_of(
      f"heldout_{category}_{heldout_images}_{size}", category, 1, heldout_images, 0, "train"
    )
    ftr, fte, fho = pooled(train), pooled(test), pooled(held)
    good = np.asarray(test.labels) == 0
    for target in targets:
      det = detector_lib.fit_features(
        ftr, levels=levels, target_fpr=target, arch=arch, checkpoint_sha256=sha, image_size=side
      )
      s_te = det.score_features(fte).total
      s_ho = det.score_features(fho).total
      sig = det.threshold_for(3)
      rows.append(
        {
          "category": category,
          "target_fpr": target,
          "threshold": det.threshold,
          "oof_fpr": float(np.mean(det.calibration_scores > det.threshold)),
          "test_good_fpr": float(np.mean(s_te[good] > det.threshold)),
          "heldout_fpr": float(np.mean(s_ho > det.threshold)),
          "tpr": float(np.mean(s_te[~good] > det.threshold)),
          "sigma3_heldout_fpr": float(np.mean(s_ho > sig)),
          "sigma3_tpr": float(np.mean(s_te[~good] > sig)),
          "n_train": len(train),
          "n_test_good": int(good.sum()),
          "n_defect": int((~good).sum()),
          "n_heldout": len(held),
        }
      )
  return rows


def table(rows: list[dict]) -> str:
  head = (
    "| category | target FPR | OOF FPR | FPR test good | FPR held-out good | TPR | "
    "3-sigma FPR held-out | 3-sigma TPR |\n|---|---|---|---|---|---|---|---|"
  )
  lines = [head]
  for r in rows:
    lines.append(
      f"| {r['category']} | {r['target_fpr']:.2f} | {r['oof_fpr']:.2f} | "
      f"{r['test_good_fpr']:.2f} ({r['n_test_good']}) | {r['heldout_fpr']:.2f} "
      f"({r['n_heldout']}) | {r['tpr']:.2f} ({r['n_defect']}) | "
      f"{r['sigma3_heldout_fpr']:.2f} | {r['sigma3_tpr']:.2f} |"
    )
  return "\n".join(lines)


def main(argv) -> int:
  from absl import app, flags

  from jax_gad import cli

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  v = cli.values(("arch", "checkpoint", "checkpoint_dir", "tfds_dir", "image_size", "batch_size"))
  try:
    rows = measure(
      v["arch"],
      checkpoint=v["checkpoint"],
      checkpoint_dir=v["checkpoint_dir"],
      tfds_dir=v["tfds_dir"],
      image_size=v["image_size"],
      batch_size=v["batch_size"],
      heldout_images=fv.heldout_images,
      targets=tuple(float(t) for t in fv.target_fprs),
      progress=True,
    )
  except (ValueError, OSError) as e:
    print(f"jax_gad.benchmark.calibration: error: {e}", file=sys.stderr)
    return 1
  print(table(rows))
  return 0


def run() -> None:
  from absl import app, flags

  from jax_gad import cli

  flags.DEFINE_integer("heldout_images", 100, "Held-out good images per category.", lower_bound=1)
  flags.DEFINE_list("target_fprs", [str(t) for t in TARGETS], "Target FPRs in (0, 1).")
  cli.show_in_help(
    (
      "arch",
      "checkpoint",
      "checkpoint_dir",
      "tfds_dir",
      "image_size",
      "batch_size",
      "heldout_images",
      "target_fprs",
    )
  )
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  run()
