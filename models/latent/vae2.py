"""VAE with two stochastic layers (Burda, Grosse & Salakhutdinov 2016, section 5).

Generative program (top-down)::

    h2 ~ N(0, I_L2)
    h1 | h2 ~ N(mu_p(h2), diag(sigma_p(h2)^2))      # MLP L2 -> 100 -> 100 -> 2 L1
    x  | h1 ~ likelihood(decoder(h1))                # MLP L1 -> 200 -> 200 -> D (Bernoulli on MNIST)

Guide (bottom-up, the same direction as the encoder)::

    q(h1 | x)  = N(mu_1(x),  diag(sigma_1(x)^2))     # MLP D -> 200 -> 200 -> 2 L1
    q(h2 | h1) = N(mu_2(h1), diag(sigma_2(h1)^2))    # MLP L1 -> 100 -> 100 -> 2 L2

so ``log w = log p(x | h1) + log p(h1 | h2) + log p(h2) - log q(h1 | x) - log q(h2 | h1)``.
The preset ``iwae-2layer`` is the paper's MNIST architecture (L1 = 100, L2 = 50, tanh
hidden layers), for which Burda et al. report test NLL 85.33 (VAE, K = 1), 83.89 (IWAE,
K = 5) and 82.90 (IWAE, K = 50) under a K = 5000 importance-sampling estimate. Scales
are ``softplus(raw) + min_scale`` (the paper used ``exp``; softplus is gentler on
long runs). Active units are counted per layer (``inference.diagnostics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from models.base import DataSpec, DGMError, GenerativeModel
from models.nn import MLP, likelihood_for
from models.registry import register_model


@dataclass
class VAE2Config:
    h1_dim: int = 100
    h2_dim: int = 50
    hidden1: Tuple[int, ...] = (200, 200)  # x <-> h1, both ways
    hidden2: Tuple[int, ...] = (100, 100)  # h1 <-> h2, both ways
    activation: str = "tanh"
    gaussian_scale: Optional[float] = None  # real data: initial (or fixed) decoder scale
    learn_scale: bool = True
    decoder_scale: str = "shared"  # real data: shared | per-pixel | per-datapoint
    min_scale: float = 1e-4  # floor on the scales of q(h1|x), q(h2|h1) and p(h1|h2)


PRESETS = {
    "iwae-2layer": VAE2Config(),
    "small": VAE2Config(h1_dim=16, h2_dim=8, hidden1=(64,), hidden2=(32,)),
}


class ConditionalGaussian(nn.Module):
    """``N(loc(u), diag(scale(u)^2))`` with ``(loc, raw scale) = MLP(u)`` and
    ``scale = softplus(raw) + min_scale``; event dimension 1."""

    def __init__(self, in_dim: int, hidden: Tuple[int, ...], out_dim: int, activation: str, min_scale: float):
        super().__init__()
        self.net = MLP(in_dim, hidden, 2 * out_dim, activation)
        self.min_scale = min_scale

    def forward(self, u: Tensor) -> dist.TorchDistribution:
        loc, raw = self.net(u).chunk(2, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(raw) + self.min_scale).to_event(1)


@register_model
class VAE2(GenerativeModel):
    """VAE with two Gaussian stochastic layers h2 -> h1 -> x (Burda et al. 2016)."""

    name = "vae2"
    config_class = VAE2Config
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[VAE2Config] = None):
        super().__init__(data_spec)
        config = config or VAE2Config()
        self.config = config
        if config.h1_dim < 1 or config.h2_dim < 1:
            raise DGMError(f"h1_dim and h2_dim must be >= 1, got {config.h1_dim} and {config.h2_dim}")
        c = config
        self.likelihood = likelihood_for(data_spec, c.gaussian_scale, c.learn_scale, c.decoder_scale)
        self.decoder = MLP(c.h1_dim, c.hidden1, self.likelihood.num_outputs(), c.activation)
        self.p_h1 = ConditionalGaussian(c.h2_dim, c.hidden2, c.h1_dim, c.activation, c.min_scale)
        self.q_h1 = ConditionalGaussian(data_spec.dim, c.hidden1, c.h1_dim, c.activation, c.min_scale)
        self.q_h2 = ConditionalGaussian(c.h1_dim, c.hidden2, c.h2_dim, c.activation, c.min_scale)

    # --- Pyro program -----------------------------------------------------------------
    def prior(self, like: Tensor) -> dist.TorchDistribution:
        zeros = like.new_zeros(self.config.h2_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            h2 = pyro.sample("h2", self.prior(x))
            h1 = pyro.sample("h1", self.p_h1(h2))
            pyro.sample("x", self.likelihood(self.decoder(h1)), obs=x)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        q1 = self.q_h1(x.reshape(x.shape[0], -1))
        with self.data_plate(x, idx, size):
            h1 = pyro.sample("h1", q1)
            pyro.sample("h2", self.q_h2(h1))

    # --- everything else ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` ancestral samples; ``mean=True`` returns the decoder means instead."""
        ref = next(self.parameters())
        h2 = self.prior(ref).sample((n,))
        h1 = self.p_h1(h2).sample()
        raw = self.decoder(h1)
        return self.likelihood.mean(raw) if mean else self.likelihood(raw).sample()
