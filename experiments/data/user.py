"""A user's own data file: ``dgm train MODEL --data path.npz`` (``load("path.npz")``).

Formats, told apart by the file's extension:

* ``.npz``: arrays named ``train``, ``val`` and ``test`` are used as given, and so are
  optional integer labels ``train_labels``, ``val_labels``, ``test_labels``. Without ``val``,
  a fixed 10% of ``train`` (at least one row) becomes the validation split. An ``.npz`` with a
  single array, whatever its name, is split like an ``.npy`` file.
* ``.npy``: one array ``[N, ...]``, split by a fixed permutation
  (``torch.Generator().manual_seed(USER_SPLIT_SEED)``, independent of ``--seed``, so every run
  on the file is evaluated on the same rows) into 80% train, 10% validation and 10% test
  (:data:`USER_FRACTIONS`; at least one row each, so ``N >= 3``).
* ``.csv``: one datapoint per line, comma-separated numbers, the same number on every line;
  a first line that is not all numbers is a header and skipped. Split like ``.npy``.

Rows. Datapoints are the rows of the first axis: ``[N]`` is ``N`` scalars (event ``(1,)``),
``[N, D]`` vectors, ``[N, H, W]`` images (flattened to ``H * W`` values, ``image_shape (H, W)``
kept for drawing samples), higher ranks flattened.

Support. ``--data-spec`` (``DataConfig.spec``) says it: ``binary`` (values 0 and 1),
``categorical:K`` (integers ``0..K-1``) or ``real``. Without it the support is inferred
from all three splits: every value 0 or 1 is ``binary``; every value a non-negative integer
up to 255 (with some value above 1) is ``categorical:K`` with ``K = max + 1`` (give
``categorical:K`` yourself when the file does not contain the top level, e.g. 256 for 8-bit
pixels); anything else is ``real``. A file that does not fit is refused with a one-line
:class:`~models.base.DataError` naming the file and what was expected.

A run records the file's absolute path and SHA-256 (``DataConfig.sha256``); reloading it
for ``dgm eval`` / ``sample`` / ``score`` warns when the file changed since.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from experiments.data.dataset import Dataset
from models.base import DataError, DataSpec, DGMWarning

SUFFIXES = (".npy", ".npz", ".csv")
USER_SPLIT_SEED = 0
USER_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
"""The split of an ``.npy`` / ``.csv`` file (and of an ``.npz`` file with one array)."""
NPZ_VAL_FRACTION = 0.1
"""The share of ``train`` that becomes the validation split of an ``.npz`` without ``val``."""
MAX_INFERRED_LEVELS = 256

SPLITS = ("train", "val", "test")


def is_data_file(name: str) -> bool:
    """Whether a ``--data`` value names a file rather than a registered dataset: it has a
    suffix or a path separator (an unsupported suffix is then refused by :func:`load_file`)."""
    path = Path(name)
    return bool(path.suffix) or len(path.parts) > 1


def resolve_file(name: str) -> Path:
    """The absolute path of the data file ``name``, refused in one line when its type is
    unknown or it does not exist."""
    path = Path(name).expanduser().resolve()
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"{name}: unknown data file type {path.suffix!r}; use .npy, .npz or .csv (or a dataset from `dgm list`)"
        )
    if not path.is_file():
        raise DataError(f"{name}: no such data file")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_spec(text: str, path: Path) -> Tuple[str, Optional[int]]:
    """``binary`` / ``categorical:K`` / ``real`` as ``(support, num_levels)``."""
    if text in ("binary", "real"):
        return text, None
    kind, _, levels = text.partition(":")
    if kind == "categorical" and levels.isdigit() and int(levels) >= 2:
        return "categorical", int(levels)
    raise DataError(f"{path}: unknown --data-spec {text!r}; use binary, categorical:K (K >= 2) or real")


def load_file(name: str, spec: Optional[str] = None) -> Dataset:
    """The dataset in the file ``name`` (see the module docstring); ``spec`` is
    ``--data-spec`` (``None``: inferred)."""
    path = resolve_file(name)
    given = parse_spec(spec, path) if spec is not None else None
    suffix = path.suffix.lower()
    labels: Dict[str, Optional[np.ndarray]] = {}
    if suffix == ".npz":
        arrays, labels, how = _read_npz(path)
    else:
        whole = _read_npy(path) if suffix == ".npy" else _read_csv(path)
        arrays, how = _split(whole, path), None
    if how is None:
        how = (
            f"fixed permutation (torch seed {USER_SPLIT_SEED}): "
            + " / ".join(f"{len(arrays[s])} {s}" for s in SPLITS)
            + " (80% / 10% / 10%)"
        )
    x = {s: _as_rows(a, path, s) for s, a in arrays.items()}
    event = x["train"].shape[1:]
    for s in ("val", "test"):
        if x[s].shape[1:] != event:
            raise DataError(
                f"{path}: {s} rows have shape {list(x[s].shape[1:])} but train rows {list(event)}; use one shape"
            )
    support, levels, said = _support(x, given, path)
    image = tuple(event) if len(event) == 2 else None
    dim = int(np.prod(event)) if event else 1
    tensors = {
        s: torch.from_numpy(np.ascontiguousarray(v.reshape(len(v), dim), dtype=np.float32)) for s, v in x.items()
    }
    data_spec = DataSpec((dim,), support, levels, image)
    info = {
        "source": str(path),
        "sha256": file_sha256(path),
        "split": how,
        "support": said,
        "binarization": "none (the file's values)",
    }
    label_tensors = {
        f"{s}_labels": None if labels.get(s) is None else torch.from_numpy(labels[s].astype(np.int64)) for s in SPLITS
    }
    return Dataset(path.name, data_spec, **tensors, **label_tensors, info=info)


def warn_if_changed(path: str, sha256: Optional[str], where: str) -> None:
    """Warn when the data file ``path`` no longer has the SHA-256 recorded in ``where``."""
    if sha256 is None or not Path(path).is_file():
        return
    now = file_sha256(Path(path))
    if now != sha256:
        warnings.warn(
            f"the data file {path} changed since {where} was written (SHA-256 {sha256[:12]}... then, "
            f"{now[:12]}... now); its numbers are not the run's",
            DGMWarning,
            stacklevel=2,
        )


# --- reading ------------------------------------------------------------------------------------
def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a plain numeric .npy array ({_first(e)}); save it with numpy.save") from None
    except OSError as e:
        raise DataError(f"{path}: not a .npy file ({_first(e)}); save it with numpy.save") from None


def _read_npz(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, Optional[np.ndarray]], Optional[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"{path}: not a readable .npz of numeric arrays ({_first(e)}); save it with numpy.savez"
        ) from None
    if len(arrays) == 1:
        return _split(next(iter(arrays.values())), path), {}, None
    missing = [s for s in ("train", "test") if s not in arrays]
    if missing:
        raise DataError(
            f"{path}: an .npz needs arrays named train and test (optionally val, train_labels, val_labels, "
            f"test_labels), or a single array to split; it has {', '.join(sorted(arrays)) or 'none'}"
        )
    known = set(SPLITS) | {f"{s}_labels" for s in SPLITS}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{path}: unknown array(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    labels = {s: arrays.get(f"{s}_labels") for s in SPLITS}
    if "val" in arrays:
        how = "the file's train / val / test arrays"
    else:
        n = len(arrays["train"])
        if n < 2:
            raise DataError(f"{path}: train has {n} row(s); without a val array it needs at least 2 to split off one")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(USER_SPLIT_SEED)).numpy()
        n_val = max(1, int(round(NPZ_VAL_FRACTION * n)))
        val, train = order[:n_val], order[n_val:]
        arrays["val"], arrays["train"] = arrays["train"][val], arrays["train"][train]
        if labels["train"] is not None:
            labels["val"], labels["train"] = labels["train"][val], labels["train"][train]
        how = (
            f"the file's train / test arrays; val: a fixed {NPZ_VAL_FRACTION:.0%} of train "
            f"(torch seed {USER_SPLIT_SEED}, {n_val} rows)"
        )
    for s in SPLITS:
        y = labels[s]
        if y is None:
            continue
        if y.dtype.kind not in "iu" or y.shape != (len(arrays[s]),):
            raise DataError(
                f"{path}: {s}_labels must be integers, one per {s} row ({len(arrays[s])}), "
                f"got {y.dtype} of shape {list(y.shape)}"
            )
    return {s: arrays[s] for s in SPLITS}, labels, how


def _read_csv(path: Path) -> np.ndarray:
    rows, width, first_line = [], None, None
    try:
        with open(path, newline="") as f:
            for line_no, fields in enumerate(csv.reader(f), start=1):
                if not fields or all(not v.strip() for v in fields):
                    continue
                try:
                    values = [float(v) for v in fields]
                except ValueError:
                    if not rows and width is None:  # a header line
                        width = len(fields)
                        first_line = line_no
                        continue
                    bad = next(v for v in fields if not _is_number(v))
                    raise DataError(f"{path}, line {line_no}: {bad!r} is not a number") from None
                if width is None:
                    width, first_line = len(values), line_no
                elif len(values) != width:
                    raise DataError(
                        f"{path}, line {line_no}: {len(values)} value(s), but line {first_line} has {width}; "
                        "every row needs the same number of columns"
                    )
                rows.append(values)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; a .csv holds comma-separated numbers") from None
    if not rows:
        raise DataError(f"{path}: no rows of numbers")
    return np.asarray(rows, dtype=np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


# --- checking -----------------------------------------------------------------------------------
def _split(whole: np.ndarray, path: Path) -> Dict[str, np.ndarray]:
    n = len(whole) if whole.ndim else 0
    if n < 3:
        raise DataError(f"{path}: {n} row(s); splitting into train / val / test needs at least 3")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(USER_SPLIT_SEED)).numpy()
    n_val = max(1, int(round(USER_FRACTIONS["val"] * n)))
    n_test = max(1, int(round(USER_FRACTIONS["test"] * n)))
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {s: whole[parts[s]] for s in SPLITS}


def _as_rows(a: np.ndarray, path: Path, split: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise DataError(f"{path}: {split} holds {a.dtype} values; expected numbers (bool, integer or float)")
    if a.ndim == 0 or len(a) == 0:
        raise DataError(f"{path}: {split} is empty; expected an array of rows [N, ...]")
    a = a.reshape(len(a), 1) if a.ndim == 1 else a
    a = a.astype(np.float64)
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise DataError(f"{path}: {split} has {bad} NaN or infinite values; clean the data first")
    return a


def _support(x: Dict[str, np.ndarray], given, path: Path) -> Tuple[str, Optional[int], str]:
    """``(support, num_levels, how it was decided)``, refusing values outside a given support."""
    lo = min(float(v.min()) for v in x.values())
    hi = max(float(v.max()) for v in x.values())
    integers = all(bool(np.all(v == np.round(v))) for v in x.values())
    binary = all(bool(np.all((v == 0) | (v == 1))) for v in x.values())
    if given is None:
        if binary:
            return "binary", None, "binary (inferred: every value is 0 or 1)"
        if integers and lo >= 0 and hi < MAX_INFERRED_LEVELS:
            k = int(hi) + 1
            return "categorical", k, f"categorical:{k} (inferred: integers 0..{k - 1}; --data-spec overrides)"
        return "real", None, "real (inferred)"
    support, levels = given
    if support == "binary" and not binary:
        raise DataError(f"{path}: --data-spec binary needs values 0 and 1, found values in [{lo:g}, {hi:g}]")
    if support == "categorical" and not (integers and lo >= 0 and hi <= levels - 1):
        raise DataError(
            f"{path}: --data-spec categorical:{levels} needs integers 0..{levels - 1}, "
            f"found {'values' if integers else 'non-integer values'} in [{lo:g}, {hi:g}]"
        )
    spec = support if levels is None else f"{support}:{levels}"
    return support, levels, f"{spec} (given by --data-spec)"
