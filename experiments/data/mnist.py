"""MNIST datasets: ``mnist`` (binarized or grey levels), ``mnist-embedded`` (the subset
shipped in the package), ``mnist-logit`` and ``mnist-dequantized``.

Binarization of MNIST (``binarization=``):

* ``"dynamic"`` (default; the IWAE paper's protocol): ``train`` keeps grey levels
  ``x / 255`` and :meth:`Dataset.train_epoch` draws a fresh ``Bernoulli(x / 255)`` sample
  every epoch; val and test are binarized once with their fixed seeds.
* ``"static"``: train, val and test are each binarized once with their fixed seeds.
* ``"none"``: grey levels in ``[0, 1]``, support ``"real"`` (Gaussian decoders, flows).

Splits of the 60,000 training images (``split=``): ``"59600/400"`` (IWAE: the last 400
images are validation) or ``"50000/10000"`` (the last 10,000). Test is always the 10,000
``t10k`` images. ``binarization`` and ``split`` apply to the datasets read from the MNIST
files (``mnist``, ``mnist-logit``); every other dataset has one fixed form and ignores them
(its ``info`` and :meth:`Dataset.describe` say which).

``mnist-logit`` (MAF paper): ``x = (pixel + u) / 256`` with ``u ~ U(0, 1)`` drawn once per
part with its fixed seed, then ``y = logit(lam + (1 - 2 lam) x)``, ``lam = LOGIT_LAMBDA``. A
log-density ``log p_y(y)`` fitted in logit space converts to the pixel cube ``[0, 1]^D`` by
the change of variables ``log p_x(x) = log p_y(y) + logit_log_jacobian(y)``, where
``logit_log_jacobian(y) = sum_d [log(1 - 2 lam) - log sigmoid(y_d) - log sigmoid(-y_d)]``,
and to bits per dimension of the 0..255 pixels as ``-(log p_x(x) - D log 256) / (D log 2)``.
The logit map itself lives in :mod:`models.flows.logit` (the flows need it too).

``mnist-dequantized`` (and ``digits-dequantized``, :mod:`experiments.data.digits`): the grey
levels made continuous in ``[0, 1]``, ``x = (level + u) / L`` with ``u ~ U(0, 1)`` drawn once
per part (fixed seed) and ``L`` = 256 (MNIST) or 17 (digits): data for real-valued decoders
(Gaussian VAE). A density ``p_x`` on ``[0, 1]^D`` bounds the discrete model's code length as
``-(log p_x(x) - D log L) / (D log 2)`` bits per dimension (``info["levels"] = L``).

Where the MNIST files come from: see :func:`~experiments.data.files.mnist_files`.
"""

from __future__ import annotations

import hashlib
import io
from importlib import resources
from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor

from experiments.data.dataset import DATASETS, SEED_OFFSETS, Dataset, _dequantize, _Request
from experiments.data.files import MNIST_SHA256, _mnist_arrays, mnist_files
from experiments.reporting import LevelsBitsPerDim, LogitBitsPerDim
from models.base import DataError, DataSpec
from models.flows.logit import LOGIT_LAMBDA, logit_log_jacobian  # noqa: F401  (re-exported)

MNIST_SPLITS: Dict[str, int] = {"59600/400": 400, "50000/10000": 10_000}
"""Train/val split of the 60,000 training images -> number of validation images (the tail)."""

BINARIZATIONS: Tuple[str, ...] = ("dynamic", "static", "none")

EMBEDDED_ASSET = "mnist_subset.npz"
EMBEDDED_SHA256 = "b0433ede7a31b888935a6a63ff014885515f793d3748ebad61934ffd59fe44f5"
"""SHA-256 of ``experiments/assets/mnist_subset.npz``; see ``experiments/assets/README.md``."""
EMBEDDED_TRAIN, EMBEDDED_TEST, EMBEDDED_VAL = 5_000, 1_000, 500
EMBEDDED_SEED = 0
"""Seed of ``numpy.random.default_rng`` that binarized the embedded subset (make_embedded.py)."""

_MNIST_SPEC = {"event_shape": (784,), "image_shape": (28, 28)}


def _mnist_parts(req: _Request) -> Tuple[Dict[str, np.ndarray], Dict[str, Tensor], dict]:
    """uint8 pixels ``[N, 784]`` and int64 labels of train/val/test, plus provenance."""
    folder = mnist_files(req.root, download=req.download)
    arrays = _mnist_arrays(folder)
    images = arrays["train-images-idx3-ubyte.gz"].reshape(-1, 784)
    labels = arrays["train-labels-idx1-ubyte.gz"]
    n_train = len(images) - MNIST_SPLITS[req.split]
    pixels = {
        "train": images[:n_train],
        "val": images[n_train:],
        "test": arrays["t10k-images-idx3-ubyte.gz"].reshape(-1, 784),
    }
    targets = {
        "train": labels[:n_train],
        "val": labels[n_train:],
        "test": arrays["t10k-labels-idx1-ubyte.gz"],
    }
    info = {
        "source": str(folder),
        "sha256_decompressed": dict(MNIST_SHA256),
        "split": f"{req.split}: train = first {n_train} of train-images, val = the last "
        f"{len(images) - n_train}; test = t10k-images",
        "seed": req.seed,
        "seed_offsets": dict(SEED_OFFSETS),
    }
    return pixels, {k: torch.from_numpy(v.astype(np.int64)) for k, v in targets.items()}, info


_MNIST_BINARIZATION = {  # binarization -> (parts kept as grey levels, how the rest was made)
    "dynamic": (
        ("train",),
        "dynamic (train resampled each epoch; val, test fixed: Bernoulli(x/255), seed + offset)",
    ),
    "static": ((), "static (train, val, test each Bernoulli(x/255) once, seed + offset)"),
    "none": (("train", "val", "test"), "none (grey levels x/255)"),
}


@DATASETS.register("mnist", "MNIST 28x28 from the canonical idx files; dynamic/static binarization or grey levels")
def _load_mnist(req: _Request) -> Dataset:
    pixels, labels, info = _mnist_parts(req)
    keep_grey, info["binarization"] = _MNIST_BINARIZATION[req.binarization]
    data = {}
    for part, p in pixels.items():
        grey = torch.from_numpy(p.astype(np.float32)).div_(255)
        keep = part in keep_grey
        data[part] = grey if keep else torch.bernoulli(grey, generator=req.generator(part))
    support = "real" if req.binarization == "none" else "binary"
    return Dataset(
        req.name,
        DataSpec(support=support, **_MNIST_SPEC),
        **data,
        **{f"{k}_labels": v for k, v in labels.items()},
        dynamic=req.binarization == "dynamic",
        info=info,
    )


# --- the embedded subset ------------------------------------------------------------------------


@DATASETS.register("mnist-embedded", "binarized MNIST subset shipped in the package (4,500/500/1,000); no download")
def _load_embedded(req: _Request) -> Dataset:
    """The binarized MNIST subset in ``experiments/assets``; needs neither files nor network."""
    raw = resources.files("experiments").joinpath("assets").joinpath(EMBEDDED_ASSET).read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != EMBEDDED_SHA256:
        raise DataError(
            f"experiments/assets/{EMBEDDED_ASSET} has SHA-256 {got}, expected {EMBEDDED_SHA256}; "
            "the installation is damaged: reinstall pyro-dgm (or regenerate it with "
            "`python -m experiments.make_embedded` and update EMBEDDED_SHA256)"
        )
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        train = np.unpackbits(npz["train_bits"], axis=1, count=784)
        test = np.unpackbits(npz["test_bits"], axis=1, count=784)
        train_y, test_y = npz["train_labels"], npz["test_labels"]
    n = len(train) - EMBEDDED_VAL
    x = {"train": train[:n], "val": train[n:], "test": test}
    y = {"train": train_y[:n], "val": train_y[n:], "test": test_y}
    info = {
        "source": f"experiments/assets/{EMBEDDED_ASSET} (first {EMBEDDED_TRAIN} train and "
        f"{EMBEDDED_TEST} test images of canonical MNIST)",
        "sha256": EMBEDDED_SHA256,
        "binarization": f"static (Bernoulli(grey/255) once, numpy default_rng({EMBEDDED_SEED}))",
        "split": f"train = first {n} of the subset, val = the last {EMBEDDED_VAL}",
    }
    return Dataset(
        req.name,
        DataSpec(support="binary", **_MNIST_SPEC),
        **{k: torch.from_numpy(v.astype(np.float32)) for k, v in x.items()},
        **{f"{k}_labels": torch.from_numpy(v.astype(np.int64)) for k, v in y.items()},
        info=info,
    )


# --- dequantized MNIST ----------------------------------------------------------------------------


def _dequantized_logit(pixels: np.ndarray, generator: torch.Generator, lam: float) -> Tensor:
    """``logit(lam + (1 - 2 lam) x)`` with ``x = (pixel + u) / 256``, ``u ~ U(0, 1)``.

    ``1 - s`` is formed from ``256 - pixel - u`` directly, so float32 keeps full relative
    precision for white pixels instead of cancelling ``1 - s`` near ``1e-6``. In-place ops:
    the training part is 47M values, and fresh temporaries would dominate the load time.
    """
    p = torch.from_numpy(pixels.astype(np.float32))
    u = torch.rand(p.shape, generator=generator)
    scale = (1 - 2 * lam) / 256
    s = torch.add(p, u).mul_(scale).add_(lam)
    one_minus_s = p.neg_().add_(256).sub_(u).mul_(scale).add_(lam)
    return s.log_().sub_(one_minus_s.log_())


@DATASETS.register("mnist-logit", "MNIST dequantized and mapped to logit space (MAF paper); real-valued")
def _load_mnist_logit(req: _Request) -> Dataset:
    """MNIST dequantized with fixed noise, in logit space; see the module docstring."""
    pixels, labels, info = _mnist_parts(req)
    data = {part: _dequantized_logit(p, req.generator(part), LOGIT_LAMBDA) for part, p in pixels.items()}
    info.update(
        binarization="none (dequantized: x = (pixel + u) / 256, u ~ U(0, 1) fixed, seed + offset)",
        lam=LOGIT_LAMBDA,
        transform="y = logit(lam + (1 - 2 lam) x); log p_x = log p_y + logit_log_jacobian(y)",
    )
    return Dataset(
        req.name,
        DataSpec(support="real", **_MNIST_SPEC),
        **data,
        **{f"{k}_labels": v for k, v in labels.items()},
        info=info,
        measures=(LogitBitsPerDim(),),
    )


@DATASETS.register(
    "mnist-dequantized", "MNIST grey levels dequantized to [0, 1]: (pixel + u) / 256, fixed noise; real-valued"
)
def _load_mnist_dequantized(req: _Request) -> Dataset:
    """MNIST grey levels dequantized to ``[0, 1]``; see the module docstring."""
    pixels, labels, info = _mnist_parts(req)
    data = {
        part: _dequantize(torch.from_numpy(p.astype(np.float32)), req.generator(part), 256)
        for part, p in pixels.items()
    }
    info.update(binarization="none (dequantized: x = (pixel + u) / 256, u ~ U(0, 1) fixed, seed + offset)", levels=256)
    return Dataset(
        req.name,
        DataSpec(support="real", **_MNIST_SPEC),
        **data,
        **{f"{k}_labels": v for k, v in labels.items()},
        info=info,
        measures=(LevelsBitsPerDim(256),),
    )
