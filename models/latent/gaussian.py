"""The Gaussian pieces the VAE-family models share: the standard normal prior and the
encoder's diagonal Gaussian posterior."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["diagonal_normal", "standard_normal"]


def standard_normal(like: Tensor, dim: int) -> dist.TorchDistribution:
    """``N(0, I_dim)`` as one event of size ``dim``, on the device and dtype of ``like``."""
    zeros = like.new_zeros(dim)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def diagonal_normal(params: Tensor, min_scale: float) -> dist.TorchDistribution:
    """``N(loc, diag(scale^2))`` from an encoder output ``[..., 2 L]`` holding ``loc`` and a
    raw scale: ``scale = softplus(raw) + min_scale`` (positive, bounded away from 0)."""
    loc, raw_scale = params.chunk(2, dim=-1)
    return dist.Normal(loc, F.softplus(raw_scale) + min_scale).to_event(1)
