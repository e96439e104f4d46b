"""The :class:`Dataset` every loader returns, the dataset registry :data:`DATASETS` and
what the loaders share: the options of one ``load`` call (:class:`_Request`), the fixed
seeds of each part and dequantization.

Seeds. Every fixed random draw uses its own ``torch.Generator`` seeded with
``seed + SEED_OFFSETS[part]``: train ``+0``, test ``+1``, val ``+2``. So the MNIST test set
is binarized by ``torch.Generator().manual_seed(seed + 1)`` whether training is dynamic or
static, and test numbers are comparable across binarization schemes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from experiments.reporting import Measure, SampleFormat, default_format
from models.base import DataError, DataSpec
from models.registry import Registry

PathLike = Union[str, Path]

DATASETS = Registry("dataset")
"""Dataset name -> its loader (a function of a :class:`_Request` returning a :class:`Dataset`)
and a one-line description; every loader registers itself where it is defined."""

SEED_OFFSETS: Dict[str, int] = {"train": 0, "test": 1, "val": 2}
"""Each part's fixed draws use ``torch.Generator().manual_seed(seed + SEED_OFFSETS[part])``."""


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
    samples: Optional[SampleFormat] = None  # how samples are written (default: from the spec)
    measures: Tuple[Measure, ...] = ()  # metrics that only mean something for this data
    source: Optional[dict] = None  # how to load it again (``load`` sets it): the run config's data section + seed

    def __post_init__(self) -> None:
        if self.samples is None:
            self.samples = default_format(self.spec)
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

    def report(self, model, summary: dict, x_test: Tensor) -> dict:
        """This dataset's metrics of a trained ``model`` (``{"test": {...}, ...}``) from the
        run's ``summary`` and the test split ``x_test`` (its first ``summary["test"]["n"]``
        rows were evaluated)."""
        out: dict = {"test": {}}
        for measure in self.measures:
            values = dict(measure(model, self, summary, x_test))
            out.update(values.pop("run", {}))
            out["test"].update(values)
        return out

    def write_run_outputs(self, model, run_dir: PathLike, title: str) -> None:
        """What a finished run writes besides its summary: samples (and a 2-D density)."""
        self.samples.write_run_outputs(model, self, Path(run_dir), title)

    def describe(self) -> str:
        """One line: name, sizes, binarization and support."""
        sizes = f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test"
        binarization = self.info.get("binarization", "none")
        return f"{self.name}: {sizes}; {self.spec.describe()}; binarization: {binarization}"


@dataclass(frozen=True)
class _Request:
    """The options of one ``load`` call, passed whole to the dataset's loader."""

    name: str
    root: Optional[PathLike]
    binarization: str
    split: str
    seed: int
    download: bool

    def generator(self, part: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + SEED_OFFSETS[part])


def _dequantize(levels: Tensor, generator: torch.Generator, num_levels: int) -> Tensor:
    """``(level + u) / L`` with ``u ~ U(0, 1)``: values in ``[0, 1)``, one cell per level."""
    return (levels + torch.rand(levels.shape, generator=generator)) / num_levels
