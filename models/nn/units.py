"""Output units of autoregressive conditionals: the one place binary and categorical
pixels differ (FVSBN, NADE and MADE share them).

Shapes: ``x`` holds levels as floats ``[..., D]``; ``features(x)`` is what the network
reads, ``[..., D, levels]`` (the bit itself, or a one-hot code); logits come out of a
network as ``[..., D, levels]`` and ``natural`` drops the level axis for bits, so
``log_prob`` and ``sample`` take ``[..., D]`` (bits) or ``[..., D, K]`` (levels).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from models.base import DataSpec, DGMError


class BinaryUnits:
    """``p(x_i = 1 | x_<i) = sigmoid(logit_i)``; the network sees the bit itself."""

    levels = 1

    def features(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-1)

    def natural(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1)

    def log_prob(self, logits: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")

    def sample(self, logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)


class CategoricalUnits:
    """``p(x_i = k | x_<i) = softmax(logits_i)_k`` over ``K`` levels; the network sees
    one-hot codes."""

    def __init__(self, levels: int):
        self.levels = levels

    def features(self, x: Tensor) -> Tensor:
        return F.one_hot(x.long(), self.levels).to(x.dtype)

    def natural(self, logits: Tensor) -> Tensor:
        return logits

    def log_prob(self, logits: Tensor, x: Tensor) -> Tensor:
        return logits.log_softmax(-1).gather(-1, x.long().unsqueeze(-1)).squeeze(-1)

    def sample(self, logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1).to(logits.dtype)


def units_for(spec: DataSpec, model: str):
    """The units for data of this spec; real data has no discrete units."""
    if spec.support == "binary":
        return BinaryUnits()
    if spec.support == "categorical":
        return CategoricalUnits(spec.num_levels)
    raise DGMError(
        f"{model} models binary or categorical data, not {spec.describe()}; use RNADE for real "
        "values, or quantize the data into levels"
    )
