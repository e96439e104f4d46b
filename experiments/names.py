"""First names as END-padded character sequences (the char-RNN's classic data set).

Source: the ``names`` package ships the 1990 US census lists of first names,
``dist.male.first`` and ``dist.female.first`` (upper case, with frequencies). We keep each
distinct name once, lower-cased, sorted, and split the set by a fixed permutation
(``NAMES_SPLIT_SEED``, independent of the run's seed, as for digits) into 80 % train, 10 %
val and 10 % test. Frequencies are ignored: every name counts once.

Encoding (a categorical :class:`~models.base.DataSpec`, no special contract): a name of
``n`` characters becomes a row of ``L`` levels stored as float32,

    ``c_1 ... c_n END END ... END``,   token ``END = 0``, characters ``1 .. V-1``,

where character ``alphabet[k - 1]`` has token ``k`` and ``L`` is the longest name plus one
(every row has room for its END). Everything after the first END is END again, so a row
is a name and its padding is deterministic; sequence models score the END (it says where
the name stops) and nothing after it (see ``models.autoregressive.sequence``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from experiments.data import Dataset
from experiments.reporting import NatsPerChar, TextSamples
from models.base import DataError, DataSpec

END = 0
"""The END (and padding) token."""

NAMES_FILES = ("dist.male.first", "dist.female.first")
NAMES_SPLIT_SEED = 0
NAMES_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def read_names() -> tuple[List[str], str]:
    """``(names, folder)``: the sorted distinct lower-cased first names of the census lists."""
    try:
        import names as names_package
    except ImportError:
        raise DataError("the names dataset needs the `names` package: pip install names") from None
    folder = os.path.dirname(names_package.__file__)
    found = set()
    for file in NAMES_FILES:
        path = os.path.join(folder, file)
        try:
            with open(path) as f:
                found.update(line.split()[0].lower() for line in f if line.strip())
        except FileNotFoundError:
            raise DataError(f"{path} is missing; reinstall the names package: pip install --force-reinstall names")
    return sorted(found), folder


def encode_names(names: Sequence[str], alphabet: str, length: int) -> Tensor:
    """``[N, length]`` float32 tokens: ``alphabet[k - 1] -> k``, then END (0) to the end."""
    index = {c: k + 1 for k, c in enumerate(alphabet)}
    out = torch.full((len(names), length), float(END))
    for row, name in enumerate(names):
        if len(name) >= length:
            raise DataError(f"name {name!r} has {len(name)} characters; length {length} leaves no room for END")
        unknown = sorted(set(name) - set(index))
        if unknown:
            raise DataError(f"name {name!r} has characters {unknown} outside the alphabet {alphabet!r}")
        out[row, : len(name)] = torch.tensor([float(index[c]) for c in name])
    return out


def decode_names(tokens: Tensor, alphabet: str) -> List[str]:
    """The strings of ``[N, L]`` tokens, each read up to its first END."""
    names = []
    for row in tokens.long().tolist():
        chars = []
        for t in row:
            if t == END:
                break
            if not 1 <= t <= len(alphabet):
                raise DataError(f"token {t} is outside 0..{len(alphabet)} (END and the alphabet {alphabet!r})")
            chars.append(alphabet[t - 1])
        names.append("".join(chars))
    return names


def split_sizes(n: int) -> Dict[str, int]:
    """``{"train": ..., "val": ..., "test": ...}`` for ``n`` names (train takes the remainder)."""
    val, test = int(n * NAMES_FRACTIONS["val"]), int(n * NAMES_FRACTIONS["test"])
    return {"train": n - val - test, "val": val, "test": test}


def load_names() -> Dataset:
    """The ``names`` :class:`~experiments.data.Dataset`; ``info`` holds the alphabet,
    the split and the source files."""
    names, folder = read_names()
    alphabet = "".join(sorted(set("".join(names))))
    length = max(map(len, names)) + 1
    sizes = split_sizes(len(names))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(NAMES_SPLIT_SEED))
    parts = dict(zip(sizes, order.split(list(sizes.values()))))
    tokens = encode_names(names, alphabet, length)
    info = {
        "source": f"names package: {', '.join(NAMES_FILES)} in {folder} ({len(names)} distinct first names, "
        "lower-cased; frequencies ignored)",
        "alphabet": alphabet,
        "encoding": f"token 0 = END (and padding), tokens 1..{len(alphabet)} = alphabet; length {length} = "
        "longest name + 1",
        "split": f"fixed permutation, torch seed {NAMES_SPLIT_SEED}: "
        + " / ".join(f"{n} {part}" for part, n in sizes.items()),
        "binarization": "none (character tokens)",
    }
    spec = DataSpec((length,), "categorical", num_levels=len(alphabet) + 1)
    return Dataset(
        "names",
        spec,
        **{part: tokens[i] for part, i in parts.items()},
        info=info,
        samples=TextSamples(alphabet),
        measures=(NatsPerChar(),),
    )
