"""Mu-law companding and quantization of audio (ITU-T G.711; WaveNet Section 2.2): a pure
codec shared by WaveNet (:mod:`models.autoregressive.wavenet`) and the speech data
(:mod:`experiments.speech`).

``F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)`` with ``mu = K - 1``, then ``F`` in [-1, 1]
is rounded to ``K`` evenly spaced levels (:func:`mu_law_encode`); :func:`mu_law_decode`
maps each level back to audio in [-1, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.base import DataError, DGMError

__all__ = ["mu_law_encode", "mu_law_decode"]


def mu_law_encode(x: Tensor, levels: int = 256) -> Tensor:
    """Levels ``0..K-1`` (as floats) of audio ``x`` in ``[-1, 1]``: ``F(x)`` (see the module
    docstring) rounded to the nearest of ``K`` evenly spaced points of ``[-1, 1]``."""
    if levels < 2:
        raise DGMError(f"mu-law needs at least 2 levels, got {levels}")
    if not torch.isfinite(x).all() or (x.abs() > 1).any():
        raise DataError("mu_law_encode needs finite audio in [-1, 1]; normalize it first (x / max|x|)")
    mu = levels - 1
    companded = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.round((companded + 1) / 2 * mu)


def mu_law_decode(q: Tensor, levels: int = 256) -> Tensor:
    """Audio in ``[-1, 1]`` of levels ``q``: the inverse of ``F`` at each level's point,
    ``sign(y) ((1 + mu)^|y| - 1) / mu`` with ``y = 2 q / mu - 1``."""
    mu = levels - 1
    y = 2 * q / mu - 1
    return torch.sign(y) * (torch.pow(float(1 + mu), y.abs()) - 1) / mu  # pow: exactly +-1 at the ends
