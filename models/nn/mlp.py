"""A plain multilayer perceptron with a configurable activation."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """``in -> hidden[0] -> ... -> hidden[-1] -> out`` with ``activation`` between layers
    (none after the output layer)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "tanh"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        layers = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 (documented by the class)
        return super().forward(x)
