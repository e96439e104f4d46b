"""Masked layers for autoregressive networks (Germain et al. 2015, MADE).

Masks are buffers built by pure functions and applied functionally
(``F.linear(x, mask * weight, bias)``), never by editing the weights in place, so the
weights' gradients are masked too and a new mask can be swapped in at any step
(order- and connectivity-agnostic training).

Degrees: input ``i`` in the order has degree ``order[i]`` (1..D). A hidden unit of degree
``m`` may see inputs of degree <= m; an output of degree ``d`` may see hidden units (or
inputs) of degree < d (strict), so output ``d`` depends only on inputs earlier in the order.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def connectivity_mask(in_degrees: Tensor, out_degrees: Tensor, strict: bool) -> Tensor:
    """``[out, in]`` 0/1 mask: ``out_degree > in_degree`` if ``strict`` else ``>=``."""
    if strict:
        return (out_degrees[:, None] > in_degrees[None, :]).float()
    return (out_degrees[:, None] >= in_degrees[None, :]).float()


def hidden_degrees(
    sizes: Sequence[int], dim: int, generator: Optional[torch.Generator] = None, random: bool = True
) -> List[Tensor]:
    """Degrees of each hidden layer's units, in 1..dim-1 (a unit of degree dim would feed
    no output). ``random``: each unit's degree is drawn uniformly from [min of the layer
    below, dim - 1] (MADE's connectivity sampling); otherwise spread evenly."""
    degrees, low = [], 1
    for size in sizes:
        if dim == 1:
            d = torch.ones(size, dtype=torch.long)
        elif random:
            d = torch.randint(low, dim, (size,), generator=generator)
        else:
            d = (torch.arange(size) % max(1, dim - low)) + low
        degrees.append(d)
        low = int(d.min()) if size else low
    return degrees


def order_degrees(order: Tensor) -> Tensor:
    """Degree of each input position: ``order`` lists positions in generation order, so
    position ``order[k]`` gets degree ``k + 1``."""
    degrees = torch.empty_like(order)
    degrees[order] = torch.arange(1, len(order) + 1, dtype=order.dtype)
    return degrees


class MaskedLinear(nn.Linear):
    """``y = x @ (mask * W)^T + b`` with ``mask`` a buffer of shape ``[out, in]``."""

    def __init__(self, in_features: int, out_features: int, mask: Optional[Tensor] = None, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", torch.ones(out_features, in_features) if mask is None else mask.float().clone())

    def set_mask(self, mask: Tensor) -> None:
        self.mask.copy_(mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.mask * self.weight, self.bias)
