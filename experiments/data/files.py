"""The MNIST files: reading idx files (:func:`read_idx`), locating the four canonical files,
checking their SHA-256 and downloading them from mirrors (:func:`mnist_files`).

Where the MNIST files come from: see :func:`mnist_files`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import shutil
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from experiments.data.dataset import PathLike
from models.base import DataError

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
