"""Datasets: MNIST (canonical idx files, with checksums), the embedded MNIST subset,
scikit-learn digits, 2-D toy densities, a known PPCA model, MNIST in logit space, first
names and synthesized speech.

``load(name, ...)`` returns a :class:`Dataset`: train / val / test tensors ``[N, *event]``
in float32, their labels where the data has them, the :class:`~models.base.DataSpec` a
model checks them against, and ``info`` recording where every number came from. The names
``load`` accepts, with a one-line description each, are the entries of the registry
:data:`DATASETS` (``DATASETS.describe()``); every loader registers itself in the module
that defines it:

* :mod:`experiments.data.dataset`: :class:`Dataset`, the registry, the fixed seeds
  (:data:`SEED_OFFSETS`: every fixed random draw uses ``seed + SEED_OFFSETS[part]``, so test
  numbers are comparable across binarization schemes) and dequantization;
* :mod:`experiments.data.files`: idx files, checksums, mirrors and downloads of the MNIST
  files (where they come from: see :func:`mnist_files`);
* :mod:`experiments.data.mnist`: ``mnist`` (binarization ``dynamic`` / ``static`` /
  ``none``, splits ``59600/400`` / ``50000/10000``), ``mnist-embedded``, ``mnist-logit``
  (the logit map and :func:`logit_log_jacobian` live in :mod:`models.flows.logit`) and
  ``mnist-dequantized``;
* :mod:`experiments.data.digits`: ``digits``, ``digits17``, ``digits-dequantized``;
* :mod:`experiments.data.synthetic`: the 2-D toys and ``ppca``;
* :mod:`experiments.data.sequences`: ``names`` and ``speech``;
* :mod:`experiments.data.user`: a user's own ``.npy`` / ``.npz`` / ``.csv`` file
  (``load("path/to/file.npz", spec="categorical:17")``; formats, splits and the inferred
  support are described there).

Every loaded :class:`Dataset` carries its ``source``: the arguments that load it again (for a
data file its absolute path and SHA-256), which a run directory records.

The embedded subset's file stays in ``experiments/assets`` (package data of ``experiments``).
"""

from __future__ import annotations

from typing import Optional

# isort: off
# Importing the package registers every dataset, in this order (what `dgm list` shows).
from experiments.data import mnist, digits, sequences, synthetic  # noqa: F401
# isort: on
from experiments.data.dataset import DATASETS, SEED_OFFSETS, Dataset, PathLike, _Request
from experiments.data.digits import DIGITS_SIZES, DIGITS_SPLIT_SEED
from experiments.data.files import MNIST_MIRRORS, MNIST_SHA256, mnist_cache_dir, mnist_files, read_idx
from experiments.data.mnist import (
    BINARIZATIONS,
    EMBEDDED_ASSET,
    EMBEDDED_SEED,
    EMBEDDED_SHA256,
    EMBEDDED_TEST,
    EMBEDDED_TRAIN,
    EMBEDDED_VAL,
    MNIST_SPLITS,
)
from experiments.data.synthetic import (
    PPCA_DIM,
    PPCA_LATENT,
    PPCA_MODEL_SEED,
    PPCA_SIGMA,
    PPCA_SIZES,
    TOY_SIZES,
    ppca_parameters,
)
from experiments.data.user import is_data_file, load_file
from models.base import DataError
from models.flows.logit import LOGIT_LAMBDA, logit_log_jacobian
from models.registry import UnknownPartError

__all__ = [
    "load",
    "load_file",
    "is_data_file",
    "Dataset",
    "DATASETS",
    "SEED_OFFSETS",
    "PathLike",
    "read_idx",
    "mnist_files",
    "mnist_cache_dir",
    "MNIST_SHA256",
    "MNIST_MIRRORS",
    "MNIST_SPLITS",
    "BINARIZATIONS",
    "LOGIT_LAMBDA",
    "logit_log_jacobian",
    "EMBEDDED_ASSET",
    "EMBEDDED_SHA256",
    "EMBEDDED_TRAIN",
    "EMBEDDED_TEST",
    "EMBEDDED_VAL",
    "EMBEDDED_SEED",
    "DIGITS_SPLIT_SEED",
    "DIGITS_SIZES",
    "TOY_SIZES",
    "PPCA_DIM",
    "PPCA_LATENT",
    "PPCA_SIGMA",
    "PPCA_MODEL_SEED",
    "PPCA_SIZES",
    "ppca_parameters",
]


def load(
    name: str,
    *,
    root: Optional[PathLike] = None,
    binarization: str = "dynamic",
    split: str = "59600/400",
    seed: int = 0,
    download: bool = True,
    spec: Optional[str] = None,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`, or a ``.npy`` / ``.npz`` / ``.csv``
    file: :mod:`experiments.data.user`, whose support ``spec`` may give as ``binary``,
    ``categorical:K`` or ``real``).

    ``root``, ``download``, ``binarization`` and ``split`` concern the datasets read from the
    MNIST files (see :mod:`experiments.data.mnist` and :func:`mnist_files`); ``seed`` sets
    every fixed random draw (binarization, dequantization, toy and PPCA samples) as
    ``seed + SEED_OFFSETS[part]``. A Python run that writes a run directory
    (``Runner(..., run_dir=...)``) must load its data with its own ``TrainConfig.seed``.
    """
    if binarization not in BINARIZATIONS:
        raise DataError(f"unknown binarization {binarization!r}; choose one of: {', '.join(BINARIZATIONS)}")
    if split not in MNIST_SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(MNIST_SPLITS)}")
    source = {"name": name, "binarization": binarization, "split": split, "spec": spec, "seed": int(seed)}
    if name not in DATASETS and is_data_file(name):
        dataset = load_file(name, spec)
        source.update(name=dataset.info["source"], sha256=dataset.info["sha256"])
    else:
        if spec is not None:
            raise DataError(f"--data-spec is for data files (--data path.npz); {name} declares its own support")
        try:
            loader = DATASETS.get(name).factory
        except UnknownPartError as e:
            raise DataError(f"{e}; or give a .npy, .npz or .csv file") from None
        dataset = loader(_Request(name, root, binarization, split, int(seed), download))
    dataset.source = source
    return dataset
