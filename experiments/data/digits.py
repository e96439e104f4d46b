"""scikit-learn's 8x8 digits in three forms: ``digits`` (binarized at pixel >= 8),
``digits17`` (the 17 grey levels 0..16, categorical) and ``digits-dequantized``
(``(level + u) / 17`` in ``[0, 1]``, fixed noise; see :mod:`experiments.data.mnist` for
what dequantized data bounds).

Digits are split once by a fixed permutation (:data:`DIGITS_SPLIT_SEED`), independent of
``seed``, so every run is evaluated on the same 360 test images.
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.data.dataset import DATASETS, Dataset, _dequantize, _Request
from experiments.reporting import LevelsBitsPerDim
from models.base import DataSpec

DIGITS_SPLIT_SEED = 0
DIGITS_SIZES = {"train": 1_257, "val": 180, "test": 360}
"""Digits are split once by a fixed permutation, independent of ``seed``, so every run is
evaluated on the same 360 test images."""


def _load_digits(req: _Request) -> Dataset:
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = torch.from_numpy(digits.data.astype(np.float32))  # [1797, 64], values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(levels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    cuts = dict(zip(DIGITS_SIZES, order.split(list(DIGITS_SIZES.values()))))
    x = {part: levels[i] for part, i in cuts.items()}
    info = {}
    if req.name == "digits":
        x = {part: (v >= 8).float() for part, v in x.items()}
        spec = DataSpec((64,), "binary", image_shape=(8, 8))
        binarization = "threshold (pixel >= 8 -> 1)"
    elif req.name == "digits-dequantized":
        x = {part: _dequantize(v, req.generator(part), 17) for part, v in x.items()}
        spec = DataSpec((64,), "real", image_shape=(8, 8))
        binarization = "none (dequantized: x = (level + u) / 17, u ~ U(0, 1) fixed, seed + offset)"
        info["levels"] = 17
    else:
        spec = DataSpec((64,), "categorical", num_levels=17, image_shape=(8, 8))
        binarization = "none (17 levels 0..16)"
    info = {
        "source": f"sklearn.datasets.load_digits (scikit-learn {sklearn_version})",
        "binarization": binarization,
        "split": f"fixed permutation, torch seed {DIGITS_SPLIT_SEED}: "
        + " / ".join(f"{n} {part}" for part, n in DIGITS_SIZES.items()),
        **info,
    }
    return Dataset(
        req.name,
        spec,
        **x,
        **{f"{part}_labels": labels[i] for part, i in cuts.items()},
        info=info,
        measures=(LevelsBitsPerDim(17),) if req.name == "digits-dequantized" else (),
    )


DATASETS.add("digits", _load_digits, "scikit-learn 8x8 digits, binarized at pixel >= 8 (1,257/180/360)")
DATASETS.add(
    "digits-dequantized",
    _load_digits,
    "scikit-learn digits dequantized to [0, 1]: (level + u) / 17, fixed noise; real-valued",
)
DATASETS.add("digits17", _load_digits, "scikit-learn 8x8 digits with their 17 grey levels 0..16 (categorical)")
