"""Independent reference implementations (numpy + scikit-learn) shared by the tests.

Nothing here imports jax_gad: these are the yardsticks jax_gad is measured against.
"""

import numpy as np
from sklearn import metrics
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA


def independent_aurocs(train, test, labels, idx, reduction=None):
  """The protocol of docs/method.md for one fold: {(level index | "sum", distance): AUROC}.

  reduction: None or an object with .mode ("pca" | "npca") and .threshold.
  """
  out, per_level = {}, {"l2": [], "sed": [], "mahalanobis": []}
  for level, (xtr_all, xte) in enumerate(zip(train, test)):
    xtr = xtr_all[idx].astype(np.float64)
    xte = xte.astype(np.float64)
    if reduction is not None:
      pca = PCA().fit(xtr)
      c = np.cumsum(pca.explained_variance_ratio_)
      last = int(np.argmax(c > reduction.threshold))
      keep = slice(0, last + 1) if reduction.mode == "pca" else slice(max(last - 1, 0), None)
      comps = pca.components_[keep]
      mu = xtr.mean(0)
      xtr, xte = (xtr - mu) @ comps.T, (xte - mu) @ comps.T
    lw = LedoitWolf().fit(xtr)
    mu, sd = xtr.mean(0), xtr.std(0, ddof=1)
    d = {
      "mahalanobis": np.sqrt(lw.mahalanobis(xte)),
      "l2": np.sqrt(np.mean((xte - mu) ** 2, axis=1)),
      # SED leaves out zero-variance dimensions (jax_gad.gaussian.sed's documented rule).
      "sed": np.sqrt(np.mean(((xte - mu)[:, sd > 0] / sd[sd > 0]) ** 2, axis=1)),
    }
    for name, s in d.items():
      out[(level, name)] = metrics.roc_auc_score(labels, s)
      per_level[name].append(s)
  for name, ss in per_level.items():
    out[("sum", name)] = metrics.roc_auc_score(labels, np.mean(ss, axis=0))
  return out
