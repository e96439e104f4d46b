"""Datasets: MNIST (canonical idx files, with checksums), the embedded MNIST subset,
scikit-learn digits, 2-D toy densities, a known PPCA model and MNIST in logit space.

``load(name, ...)`` returns a :class:`Dataset`: train / val / test tensors ``[N, *event]``
in float32, their labels where the data has them, the :class:`~models.base.DataSpec` a
model checks them against, and ``info`` recording where every number came from.

Seeds. Every fixed random draw uses its own ``torch.Generator`` seeded with
``seed + SEED_OFFSETS[part]``: train ``+0``, test ``+1``, val ``+2``. So the MNIST test set
is binarized by ``torch.Generator().manual_seed(seed + 1)`` whether training is dynamic or
static, and test numbers are comparable across binarization schemes.

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

``mnist-dequantized`` and ``digits-dequantized``: the grey levels made continuous in
``[0, 1]``, ``x = (level + u) / L`` with ``u ~ U(0, 1)`` drawn once per part (fixed seed) and
``L`` = 256 (MNIST) or 17 (digits): data for real-valued decoders (Gaussian VAE). A density
``p_x`` on ``[0, 1]^D`` bounds the discrete model's code length as
``-(log p_x(x) - D log L) / (D log 2)`` bits per dimension (``info["levels"] = L``).

Where the MNIST files come from: see :func:`mnist_files`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import shutil
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.base import DataError, DataSpec

PathLike = Union[str, Path]

# --- documented constants ---------------------------------------------------------------

MNIST_SHA256: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""The four canonical MNIST files -> SHA-256 of their *decompressed* content. Hashing the
content, not the gzip bytes, accepts any mirror's recompression of the same data."""

MNIST_MIRRORS: Tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""Base URLs tried in order; overridden by ``mirrors=`` or ``$DGM_MNIST_MIRRORS`` (space-separated)."""

MNIST_SPLITS: Dict[str, int] = {"59600/400": 400, "50000/10000": 10_000}
"""Train/val split of the 60,000 training images -> number of validation images (the tail)."""

BINARIZATIONS: Tuple[str, ...] = ("dynamic", "static", "none")

SEED_OFFSETS: Dict[str, int] = {"train": 0, "test": 1, "val": 2}
"""Each part's fixed draws use ``torch.Generator().manual_seed(seed + SEED_OFFSETS[part])``."""

LOGIT_LAMBDA = 1e-6
"""``mnist-logit``: y = logit(lam + (1 - 2 lam) x), as in the MAF paper (Papamakarios et al. 2017)."""

EMBEDDED_ASSET = "mnist_subset.npz"
EMBEDDED_SHA256 = "b0433ede7a31b888935a6a63ff014885515f793d3748ebad61934ffd59fe44f5"
"""SHA-256 of ``experiments/assets/mnist_subset.npz``; see ``experiments/assets/README.md``."""
EMBEDDED_TRAIN, EMBEDDED_TEST, EMBEDDED_VAL = 5_000, 1_000, 500
EMBEDDED_SEED = 0
"""Seed of ``numpy.random.default_rng`` that binarized the embedded subset (make_embedded.py)."""

DIGITS_SPLIT_SEED = 0
DIGITS_SIZES = {"train": 1_257, "val": 180, "test": 360}
"""Digits are split once by a fixed permutation, independent of ``seed``, so every run is
evaluated on the same 360 test images."""

TOY_SIZES = {"train": 20_000, "val": 2_000, "test": 2_000}

PPCA_DIM, PPCA_LATENT, PPCA_SIGMA, PPCA_MODEL_SEED = 10, 3, 0.5, 1234
PPCA_SIZES = {"train": 5_000, "val": 500, "test": 1_000}

DATASETS: Dict[str, str] = {
    "mnist": "MNIST 28x28 from the canonical idx files; dynamic/static binarization or grey levels",
    "mnist-embedded": "binarized MNIST subset shipped in the package (4,500/500/1,000); no download",
    "mnist-logit": "MNIST dequantized and mapped to logit space (MAF paper); real-valued",
    "mnist-dequantized": "MNIST grey levels dequantized to [0, 1]: (pixel + u) / 256, fixed noise; real-valued",
    "digits": "scikit-learn 8x8 digits, binarized at pixel >= 8 (1,257/180/360)",
    "digits-dequantized": "scikit-learn digits dequantized to [0, 1]: (level + u) / 17, fixed noise; real-valued",
    "digits17": "scikit-learn 8x8 digits with their 17 grey levels 0..16 (categorical)",
    "names": "census first names as END-padded character tokens (4,131/516/516); needs `pip install names`",
    "speech": "35 spoken words synthesized by espeak-ng, 8 kHz mu-law 256 levels, 0.5 s clips; needs espeak-ng",
    "moons": "2-D toy: two interleaving half circles",
    "rings": "2-D toy: four concentric circles",
    "checkerboard": "2-D toy: uniform on the dark squares of a 4x4 checkerboard",
    "8gaussians": "2-D toy: eight Gaussians on a circle of radius 2",
    "spiral": "2-D toy: two interleaved spiral arms",
    "ppca": "10-D data from a fixed probabilistic PCA model (q=3, sigma=0.5); truth in info",
}


# --- the dataset --------------------------------------------------------------------------


@dataclass
class Dataset:
    """Train / val / test tensors ``[N, *event]`` in float32, ready for a model's ``DataSpec``.

    If ``dynamic``, ``train`` holds Bernoulli probabilities (MNIST grey levels in [0, 1]) and
    :meth:`train_epoch` binarizes afresh each epoch; ``val`` and ``test`` are always ready.
    Construction checks these promises, so a ``Dataset`` never holds data its spec rejects.
    """

    name: str
    spec: DataSpec
    train: Tensor
    val: Tensor
    test: Tensor
    train_labels: Optional[Tensor] = None
    val_labels: Optional[Tensor] = None
    test_labels: Optional[Tensor] = None
    dynamic: bool = False
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in ("val", "test") if self.dynamic else ("train", "val", "test"):
            self.spec.check(getattr(self, part), f"{self.name} {part}")
        if self.dynamic:
            probs = DataSpec(self.spec.event_shape, "real")
            probs.check(self.train, f"{self.name} train")
            if not ((self.train >= 0) & (self.train <= 1)).all():
                raise DataError(f"{self.name} train: dynamic binarization needs probabilities in [0, 1]")
        for part in ("train", "val", "test"):
            labels = getattr(self, f"{part}_labels")
            if labels is not None and labels.shape != (len(getattr(self, part)),):
                raise DataError(f"{self.name} {part}_labels: expected shape [{len(getattr(self, part))}]")

    def train_epoch(self, generator: torch.Generator) -> Tensor:
        """Training data for one epoch: a fresh binarization if ``dynamic``, else ``train``."""
        if self.dynamic:
            return torch.bernoulli(self.train, generator=generator)
        return self.train

    def describe(self) -> str:
        """One line: name, sizes, binarization and support."""
        sizes = f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test"
        binarization = self.info.get("binarization", "none")
        return f"{self.name}: {sizes}; {self.spec.describe()}; binarization: {binarization}"


# --- idx files ------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


def read_idx(path: PathLike) -> np.ndarray:
    """Parse an idx file (gzip-compressed or not) into a native-endian array.

    The magic number (two zero bytes, a type code, the number of dimensions) and the data
    length are checked, so a truncated download or a wrong file fails here with the path in
    the message instead of producing garbage images.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open if compressed else open)(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: cannot read it ({e}); expected a gzip-compressed idx file") from None
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, where: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{where}: not an idx file: magic number {raw[:4].hex() or 'missing'}, expected "
            "0000, a type code 08/09/0b/0c/0d/0e and the number of dimensions"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}: idx header truncated ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{where}: idx header says shape {shape} ({expected} bytes) but the file has "
            f"{len(raw)} bytes; it is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable native-endian copy


# --- locating, verifying and downloading MNIST ----------------------------------------------

_VERIFIED: set = set()
"""(resolved path, size, mtime_ns) of files whose checksum passed in this process."""


def _file_key(path: Path) -> Tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _checksum_problem(path: Path, name: str) -> Optional[str]:
    """None if ``path`` decompresses to the canonical content of ``name``, else what is wrong."""
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except _GZIP_ERRORS as e:
        return f"checksum failed: not a valid gzip file ({e}), expected SHA-256 {MNIST_SHA256[name]}"
    got = h.hexdigest()
    if got != MNIST_SHA256[name]:
        return f"checksum mismatch: SHA-256 of the decompressed content is {got}, expected {MNIST_SHA256[name]}"
    return None


def _verify(folder: Path) -> Path:
    """Check every MNIST file in ``folder`` (once per process per file); return ``folder``."""
    for name in MNIST_SHA256:
        _verify_file(folder / name, name)
    return folder


def _verify_file(path: Path, name: str) -> None:
    key = _file_key(path)
    if key in _VERIFIED:
        return
    problem = _checksum_problem(path, name)
    if problem:
        raise DataError(
            f"{path}: {problem}. It is not the canonical MNIST file {name}: delete it or "
            "replace it with the canonical file (or set DGM_DATA to a folder holding the "
            "four canonical files)."
        )
    _VERIFIED.add(key)


def _complete(folders: Sequence[Path]) -> Optional[Path]:
    """The first folder holding all four MNIST files."""
    for folder in folders:
        if all((folder / name).is_file() for name in MNIST_SHA256):
            return folder
    return None


def mnist_cache_dir() -> Path:
    """The user cache, ``${XDG_CACHE_HOME:-~/.cache}/pyro-dgm/mnist``: where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro-dgm" / "mnist"


def _mirror_list(mirrors: Optional[Sequence[str]]) -> list:
    if mirrors is not None:
        return list(mirrors)
    env = os.environ.get("DGM_MNIST_MIRRORS", "").split()
    return env or list(MNIST_MIRRORS)


def mnist_files(
    root: Optional[PathLike] = None,
    download: bool = True,
    mirrors: Optional[Sequence[str]] = None,
) -> Path:
    """The folder holding the four canonical MNIST ``.gz`` files, each SHA-256-verified.

    Looked for, in order: ``root`` (or ``root/mnist``), ``$DGM_DATA`` (or ``$DGM_DATA/mnist``),
    the user cache :func:`mnist_cache_dir`, and finally downloaded into the user cache if
    ``download``. An explicit ``root`` must hold the files: a wrong path is an error, never a
    silent download. Downloads try ``mirrors`` (default ``$DGM_MNIST_MIRRORS``, then
    :data:`MNIST_MIRRORS`) in order per file and are all-or-nothing: files are staged in a
    temporary folder inside the cache, checked, and only moved into place (``os.replace``)
    once all four are good.
    """
    if root is not None:
        folder = _complete([Path(root), Path(root) / "mnist"])
        if folder is None:
            raise DataError(
                f"root={str(root)!r} holds no complete set of MNIST files ({', '.join(MNIST_SHA256)}), "
                "neither directly nor in its mnist/ subfolder"
            )
        return _verify(folder)
    env = os.environ.get("DGM_DATA")
    searched = [Path(env), Path(env) / "mnist"] if env else []
    searched.append(mnist_cache_dir())
    folder = _complete(searched)
    if folder is not None:
        return _verify(folder)
    if not download:
        raise DataError(
            f"MNIST not found in {', '.join(map(str, searched))} and download=False. Set DGM_DATA "
            f"to a folder holding the canonical files ({', '.join(MNIST_SHA256)}) or allow the download."
        )
    return _download(mnist_cache_dir(), _mirror_list(mirrors))


def _download(cache: Path, mirrors: Sequence[str]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    present = [name for name in MNIST_SHA256 if (cache / name).is_file()]
    for name in present:  # put there by hand (our downloads are all-or-nothing): check them
        _verify_file(cache / name, name)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        staged = [_fetch(name, mirrors, staging, cache) for name in MNIST_SHA256 if name not in present]
        for path in staged:
            os.replace(path, cache / path.name)
            _VERIFIED.add(_file_key(cache / path.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _fetch(name: str, mirrors: Sequence[str], staging: Path, cache: Path) -> Path:
    """Download ``name`` into ``staging`` from the first mirror that serves the right content."""
    dest, tried = staging / name, []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            _http_get(url, dest)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            if isinstance(e, urllib.error.HTTPError):
                e.close()  # it holds the open response
            tried.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        problem = _checksum_problem(dest, name)
        if problem is None:
            return dest
        tried.append(f"{url}: {problem}")
    raise DataError(
        f"could not download a verified copy of MNIST file {name}. Tried:\n  "
        + ("\n  ".join(tried) or "no mirrors (the mirror list is empty)")
        + f"\nNothing was cached in {cache}. Fix: set DGM_DATA to a folder holding the four "
        f"canonical MNIST files ({', '.join(MNIST_SHA256)}), or point DGM_MNIST_MIRRORS at a good mirror."
    )


def _http_get(url: str, dest: Path) -> None:
    print(f"downloading {url}", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            file=sys.stderr,
            disable=None,
            leave=False,
        ) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


_MNIST_ARRAYS: Dict[tuple, Dict[str, np.ndarray]] = {}
"""Decoded MNIST of the last folder read, keyed by file identities: repeated loads are cheap."""


def _mnist_arrays(folder: Path) -> Dict[str, np.ndarray]:
    key = tuple(_file_key(folder / name) for name in MNIST_SHA256)
    if key not in _MNIST_ARRAYS:
        arrays = {name: read_idx(folder / name) for name in MNIST_SHA256}
        for array in arrays.values():
            array.setflags(write=False)
        _MNIST_ARRAYS.clear()
        _MNIST_ARRAYS[key] = arrays
    return _MNIST_ARRAYS[key]


# --- MNIST datasets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """The options of one ``load`` call, passed whole to the dataset's builder."""

    name: str
    root: Optional[PathLike]
    binarization: str
    split: str
    seed: int
    download: bool

    def generator(self, part: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + SEED_OFFSETS[part])


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


def logit_log_jacobian(y: Tensor, lam: float = LOGIT_LAMBDA) -> Tensor:
    """Per-datapoint ``sum_d log |dy_d / dx_d|`` of ``y = logit(lam + (1 - 2 lam) x)``.

    With ``x`` the dequantized pixels in ``[0, 1]``, ``dy/dx = (1 - 2 lam) / (s (1 - s))``,
    ``s = sigmoid(y)``, so ``log p_x(x) = log p_y(y) + logit_log_jacobian(y)``. Computed from
    ``y`` through log-sigmoids, which stay accurate where ``s`` is within ``lam`` of 0 or 1.
    """
    terms = math.log1p(-2 * lam) - torch.nn.functional.logsigmoid(y) - torch.nn.functional.logsigmoid(-y)
    return terms.flatten(1).sum(-1)


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
    )


def _dequantize(levels: Tensor, generator: torch.Generator, num_levels: int) -> Tensor:
    """``(level + u) / L`` with ``u ~ U(0, 1)``: values in ``[0, 1)``, one cell per level."""
    return (levels + torch.rand(levels.shape, generator=generator)) / num_levels


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
    )


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


# --- scikit-learn digits -----------------------------------------------------------------------


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
    )


# --- 2-D toy densities ----------------------------------------------------------------------------


def _moons(n: int, g: torch.Generator) -> Tensor:
    t = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t)) - 0.5
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t)) - 0.25
    return torch.stack([x, y], -1) + 0.1 * torch.randn(n, 2, generator=g)


def _rings(n: int, g: torch.Generator) -> Tensor:
    """Radii 0.5, 1, 1.5, 2, each picked with probability proportional to its length."""
    radii = torch.tensor([0.5, 1.0, 1.5, 2.0])
    r = radii[torch.multinomial(radii, n, replacement=True, generator=g)]
    t = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], -1) + 0.05 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 dark unit squares of [-2, 2]^2 (as in FFJORD)."""
    x = torch.rand(n, generator=g) * 4 - 2
    y = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g) + torch.floor(x) % 2
    return torch.stack([x, y], -1)


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    angle = torch.randint(0, 8, (n,), generator=g) * (2 * math.pi / 8)
    centers = 2 * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return centers + 0.2 * torch.randn(n, 2, generator=g)


def _spiral(n: int, g: torch.Generator) -> Tensor:
    """Two arms ``±(-r cos r, r sin r) / 3`` with ``r = 3 pi sqrt(U)``, plus noise 0.1."""
    r = 3 * math.pi * torch.sqrt(torch.rand(n, generator=g))
    arm = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    points = arm[:, None] * torch.stack([-r * torch.cos(r), r * torch.sin(r)], -1) / 3
    return points + 0.1 * torch.randn(n, 2, generator=g)


_TOY: Dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": _moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "spiral": _spiral,
}


def _load_toy(req: _Request) -> Dataset:
    data = {part: _TOY[req.name](n, req.generator(part)).float() for part, n in TOY_SIZES.items()}
    info = {
        "source": f"sampled by experiments.data.{_TOY[req.name].__name__}",
        "seed": req.seed,
        "seed_offsets": dict(SEED_OFFSETS),
    }
    return Dataset(req.name, DataSpec((2,), "real"), **data, info=info)


# --- probabilistic PCA --------------------------------------------------------------------------


def ppca_parameters() -> Tuple[Tensor, Tensor, float]:
    """The fixed true model ``(W [D, q], mu [D], sigma)``; x ~ N(mu, W W^T + sigma^2 I)."""
    g = torch.Generator().manual_seed(PPCA_MODEL_SEED)
    w = torch.randn(PPCA_DIM, PPCA_LATENT, generator=g)
    mu = torch.randn(PPCA_DIM, generator=g)
    return w, mu, PPCA_SIGMA


def _load_ppca(req: _Request) -> Dataset:
    w, mu, sigma = ppca_parameters()

    def sample(n: int, g: torch.Generator) -> Tensor:
        z = torch.randn(n, PPCA_LATENT, generator=g)
        return z @ w.T + mu + sigma * torch.randn(n, PPCA_DIM, generator=g)

    data = {part: sample(n, req.generator(part)) for part, n in PPCA_SIZES.items()}
    info = {
        "source": "x = W z + mu + sigma eps, z ~ N(0, I_q), eps ~ N(0, I_D)",
        "W": w.tolist(),
        "mu": mu.tolist(),
        "sigma": sigma,
        "latent_dim": PPCA_LATENT,
        "model_seed": PPCA_MODEL_SEED,
        "seed": req.seed,
        "seed_offsets": dict(SEED_OFFSETS),
    }
    return Dataset(req.name, DataSpec((PPCA_DIM,), "real"), **data, info=info)


def _load_names(req: _Request) -> Dataset:
    """First names as character tokens; see :mod:`experiments.names`."""
    from experiments.names import load_names

    return load_names()


def _load_speech(req: _Request) -> Dataset:
    """Spoken words synthesized with espeak-ng; see :mod:`experiments.speech`."""
    from experiments.speech import load_speech

    return load_speech()


# --- entry point ----------------------------------------------------------------------------------

_BUILDERS: Dict[str, Callable[[_Request], Dataset]] = {
    "mnist": _load_mnist,
    "mnist-embedded": _load_embedded,
    "mnist-logit": _load_mnist_logit,
    "mnist-dequantized": _load_mnist_dequantized,
    "digits": _load_digits,
    "digits17": _load_digits,
    "digits-dequantized": _load_digits,
    **{name: _load_toy for name in _TOY},
    "ppca": _load_ppca,
    "names": _load_names,
    "speech": _load_speech,
}


def load(
    name: str,
    *,
    root: Optional[PathLike] = None,
    binarization: str = "dynamic",
    split: str = "59600/400",
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    ``root``, ``download``, ``binarization`` and ``split`` concern the datasets read from the
    MNIST files (see the module docstring and :func:`mnist_files`); ``seed`` sets every
    fixed random draw (binarization, dequantization, toy and PPCA samples) as
    ``seed + SEED_OFFSETS[part]``.
    """
    if name not in _BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if binarization not in BINARIZATIONS:
        raise DataError(f"unknown binarization {binarization!r}; choose one of: {', '.join(BINARIZATIONS)}")
    if split not in MNIST_SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(MNIST_SPLITS)}")
    return _BUILDERS[name](_Request(name, root, binarization, split, int(seed), download))
