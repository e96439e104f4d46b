"""Regenerate ``experiments/assets/mnist_subset.npz``, the embedded binarized MNIST subset.

    python -m experiments.make_embedded PATH_TO_MNIST_DIR [--out FILE]

Takes the first ``EMBEDDED_TRAIN`` training and first ``EMBEDDED_TEST`` test images of the
canonical (checksum-verified) MNIST files, binarizes each pixel once as
``U < grey / 255`` with ``U = numpy.random.default_rng(EMBEDDED_SEED).random(...)`` drawn
for the train images first, then the test images, and stores them bit-packed
(``np.packbits(axis=1)``, 98 bytes per image) with their labels (uint8).

The npz has the layout ``np.savez_compressed`` writes (a deflated zip of ``.npy`` files,
read by ``np.load``) but fixed zip timestamps, so the same inputs give the same bytes and
the SHA-256 recorded in ``experiments/assets/README.md`` and ``EMBEDDED_SHA256`` can be
checked by rerunning this script.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from experiments.data import (
    EMBEDDED_ASSET,
    EMBEDDED_SEED,
    EMBEDDED_TEST,
    EMBEDDED_TRAIN,
    mnist_files,
    read_idx,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / EMBEDDED_ASSET


def build_subset(mnist_dir: str | Path) -> Dict[str, np.ndarray]:
    """The arrays of the embedded subset, derived from the canonical files in ``mnist_dir``."""
    folder = mnist_files(root=mnist_dir, download=False)  # verifies the checksums
    rng = np.random.default_rng(EMBEDDED_SEED)
    arrays = {}
    for part, prefix, n in (("train", "train", EMBEDDED_TRAIN), ("test", "t10k", EMBEDDED_TEST)):
        grey = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:n].reshape(n, 784)
        bits = rng.random(grey.shape) < grey / 255.0
        arrays[f"{part}_bits"] = np.packbits(bits, axis=1)
        arrays[f"{part}_labels"] = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")[:n].astype(np.uint8)
    return arrays


def write_npz(path: str | Path, arrays: Dict[str, np.ndarray]) -> str:
    """Write ``arrays`` as a deflated npz with fixed timestamps, atomically; return its SHA-256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, array in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, npy.getvalue(), compresslevel=9)
    data = buffer.getvalue()
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_dir", help="folder holding the four canonical MNIST .gz files")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output npz (default: %(default)s)")
    args = parser.parse_args(argv)
    digest = write_npz(args.out, build_subset(args.mnist_dir))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size} bytes, sha256 {digest}")
    print("update EMBEDDED_SHA256 in experiments/data/mnist.py and experiments/assets/README.md if it changed")


if __name__ == "__main__":
    main()
