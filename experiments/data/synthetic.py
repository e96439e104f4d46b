"""Synthetic data with known densities: 2-D toy densities (``moons``, ``rings``,
``checkerboard``, ``8gaussians``, ``spiral``) and 10-D data from a fixed probabilistic PCA
model (``ppca``, the truth in ``info`` and :func:`ppca_parameters`). Every sample is drawn
with the part's fixed seed, ``seed + SEED_OFFSETS[part]``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from experiments.data.dataset import DATASETS, SEED_OFFSETS, Dataset, _Request
from models.base import DataSpec

TOY_SIZES = {"train": 20_000, "val": 2_000, "test": 2_000}

PPCA_DIM, PPCA_LATENT, PPCA_SIGMA, PPCA_MODEL_SEED = 10, 3, 0.5, 1234
PPCA_SIZES = {"train": 5_000, "val": 500, "test": 1_000}


# --- 2-D toy densities ----------------------------------------------------------------------------


def _moons(n: int, g: torch.Generator) -> Tensor:
    t = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t)) - 0.5
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t)) - 0.25
    return torch.stack([x, y], -1) + 0.1 * torch.randn(n, 2, generator=g)


def _rings(n: int, g: torch.Generator) -> Tensor:
    """Radii 0.5, 1, 1.5, 2, each picked with probability proportional to its length."""
    radii = torch.tensor([0.5, 1.0, 1.5, 2.0])
    r = radii[torch.multinomial(radii, n, replacement=True, generator=g)]
    t = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], -1) + 0.05 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 dark unit squares of [-2, 2]^2 (as in FFJORD)."""
    x = torch.rand(n, generator=g) * 4 - 2
    y = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g) + torch.floor(x) % 2
    return torch.stack([x, y], -1)


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    angle = torch.randint(0, 8, (n,), generator=g) * (2 * math.pi / 8)
    centers = 2 * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return centers + 0.2 * torch.randn(n, 2, generator=g)


def _spiral(n: int, g: torch.Generator) -> Tensor:
    """Two arms ``±(-r cos r, r sin r) / 3`` with ``r = 3 pi sqrt(U)``, plus noise 0.1."""
    r = 3 * math.pi * torch.sqrt(torch.rand(n, generator=g))
    arm = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    points = arm[:, None] * torch.stack([-r * torch.cos(r), r * torch.sin(r)], -1) / 3
    return points + 0.1 * torch.randn(n, 2, generator=g)


_TOY: Dict[str, Tuple[Callable[[int, torch.Generator], Tensor], str]] = {
    "moons": (_moons, "2-D toy: two interleaving half circles"),
    "rings": (_rings, "2-D toy: four concentric circles"),
    "checkerboard": (_checkerboard, "2-D toy: uniform on the dark squares of a 4x4 checkerboard"),
    "8gaussians": (_eight_gaussians, "2-D toy: eight Gaussians on a circle of radius 2"),
    "spiral": (_spiral, "2-D toy: two interleaved spiral arms"),
}
"""Toy name -> (its sampler ``(n, generator) -> [n, 2]``, its description)."""


def _load_toy(req: _Request) -> Dataset:
    sampler = _TOY[req.name][0]
    data = {part: sampler(n, req.generator(part)).float() for part, n in TOY_SIZES.items()}
    info = {
        "source": f"sampled by {__name__}.{sampler.__name__}",
        "seed": req.seed,
        "seed_offsets": dict(SEED_OFFSETS),
    }
    return Dataset(req.name, DataSpec((2,), "real"), **data, info=info)


for _name, (_, _description) in _TOY.items():
    DATASETS.add(_name, _load_toy, _description)


# --- probabilistic PCA --------------------------------------------------------------------------


def ppca_parameters() -> Tuple[Tensor, Tensor, float]:
    """The fixed true model ``(W [D, q], mu [D], sigma)``; x ~ N(mu, W W^T + sigma^2 I)."""
    g = torch.Generator().manual_seed(PPCA_MODEL_SEED)
    w = torch.randn(PPCA_DIM, PPCA_LATENT, generator=g)
    mu = torch.randn(PPCA_DIM, generator=g)
    return w, mu, PPCA_SIGMA


@DATASETS.register("ppca", "10-D data from a fixed probabilistic PCA model (q=3, sigma=0.5); truth in info")
def _load_ppca(req: _Request) -> Dataset:
    w, mu, sigma = ppca_parameters()

    def sample(n: int, g: torch.Generator) -> Tensor:
        z = torch.randn(n, PPCA_LATENT, generator=g)
        return z @ w.T + mu + sigma * torch.randn(n, PPCA_DIM, generator=g)

    data = {part: sample(n, req.generator(part)) for part, n in PPCA_SIZES.items()}
    info = {
        "source": "x = W z + mu + sigma eps, z ~ N(0, I_q), eps ~ N(0, I_D)",
        "W": w.tolist(),
        "mu": mu.tolist(),
        "sigma": sigma,
        "latent_dim": PPCA_LATENT,
        "model_seed": PPCA_MODEL_SEED,
        "seed": req.seed,
        "seed_offsets": dict(SEED_OFFSETS),
    }
    return Dataset(req.name, DataSpec((PPCA_DIM,), "real"), **data, info=info)
