"""Likelihood-based anomaly scoring (the idea behind PixelDefend, Song et al. 2018).

A density model trained on MNIST should give its own test images a higher ``log p(x)``
than images from elsewhere. :func:`ood_set` makes out-of-distribution sets from what is on
this machine, each the size of the reference set and binarized the same way:

* ``noise``: independent Bernoulli pixels with the reference set's mean ink density;
* ``inverted``: ``1 - x`` of the reference images;
* ``rotated``: the reference images rotated by 90 degrees;
* ``digits-upsampled``: scikit-learn's 8x8 digits, upsampled to 28x28 (bilinear) and
  binarized at half intensity (a different pen, scanner and resolution).

:func:`roc_auc` is the probability that a random in-distribution image outscores a random
OOD one (ties count half): 1 is perfect separation, 0.5 chance, below 0.5 means the
model prefers the OOD set (as Nalisnick et al. 2019 found for some flows and sets).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from models.base import DataError

OOD_SETS = ("noise", "inverted", "rotated", "digits-upsampled")
OOD_SEED = 12345


def _images(x: Tensor) -> Tensor:
    if x.dim() != 2 or x.shape[1] != 784:
        raise DataError(f"OOD sets are made from MNIST-shaped data [N, 784], got {list(x.shape)}")
    return x.reshape(-1, 28, 28)


def _digits_upsampled(n: int, g: torch.Generator) -> Tensor:
    from sklearn.datasets import load_digits

    grey = torch.from_numpy(load_digits().data.astype(np.float32)).reshape(-1, 1, 8, 8) / 16.0
    big = F.interpolate(grey, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    pick = torch.randint(len(big), (n,), generator=g) if n > len(big) else torch.randperm(len(big), generator=g)[:n]
    return (big[pick] >= 0.5).float()


def ood_set(name: str, reference: Tensor, seed: int = OOD_SEED) -> Tensor:
    """An OOD set ``[N, 784]`` (binary, float32) matched to the binarized MNIST ``reference``."""
    g = torch.Generator().manual_seed(seed)
    img = _images(reference)
    n = img.shape[0]
    if name == "noise":
        out = torch.bernoulli(torch.full((n, 28, 28), float(reference.float().mean())), generator=g)
    elif name == "inverted":
        out = 1.0 - img
    elif name == "rotated":
        out = torch.rot90(img, 1, dims=(1, 2))
    elif name == "digits-upsampled":
        out = _digits_upsampled(n, g)
    else:
        raise DataError(f"unknown OOD set {name!r}; choose from {', '.join(OOD_SETS)}")
    return out.reshape(n, 784).float().contiguous()


def roc_auc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve for telling ``in_scores`` (positives, higher = more normal)
    from ``out_scores``: the Mann-Whitney U statistic over ``len(in) * len(out)``, ties half."""
    a = torch.as_tensor(in_scores, dtype=torch.float64).flatten()
    b = torch.as_tensor(out_scores, dtype=torch.float64).flatten()
    if not len(a) or not len(b):
        raise DataError("ROC AUC needs at least one score on each side")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise DataError("ROC AUC needs finite scores")
    both = torch.cat([a, b])
    ranks = _average_ranks(both)
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def _average_ranks(v: Tensor) -> Tensor:
    """1-based ranks of ``v`` with ties given their average rank."""
    values, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    return avg[inverse]
