"""Variational autoencoder with one stochastic layer (Kingma & Welling 2014).

Generative program::

    z ~ N(0, I_L)
    x | z ~ likelihood(decoder(z))     # Bernoulli, Gaussian or categorical pixels

For real data (``mnist-logit``, ``--binarization none``) the likelihood is
``N(x | decoder(z), diag(sigma^2))`` with ``sigma`` learned (``decoder_scale``: one
``shared`` scalar, one ``per-pixel`` vector, or ``per-datapoint`` from the decoder's second
half of outputs) or fixed at ``gaussian_scale`` (``learn_scale=False``).

Default guide (the amortized encoder)::

    q(z | x) = N(mu(x), diag(sigma(x)^2)),  (mu, log sigma) = encoder(x)

The IWAE paper's one-layer architecture (Burda et al. 2016: 784-200-200-50 with tanh, both
ways) is the preset ``iwae-1layer``; ``mlp-400-20`` is the 784-400-20 ReLU VAE of the
benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.gaussian import diagonal_normal, standard_normal
from models.nn import MLP, likelihood_for
from models.registry import register_model


@dataclass
class VAEConfig:
    latent_dim: int = 50
    encoder_hidden: Tuple[int, ...] = (200, 200)
    decoder_hidden: Tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    gaussian_scale: Optional[float] = None  # initial (or fixed) decoder scale for real data
    learn_scale: bool = True  # learn the decoder scale for real data (False: fixed at gaussian_scale)
    decoder_scale: str = "shared"  # real data: shared | per-pixel | per-datapoint (decoder outputs)
    min_posterior_scale: float = 1e-4


PRESETS = {
    "iwae-1layer": VAEConfig(),
    "mlp-400-20": VAEConfig(latent_dim=20, encoder_hidden=(400,), decoder_hidden=(400,), activation="relu"),
    "small": VAEConfig(latent_dim=16, encoder_hidden=(200,), decoder_hidden=(200,), activation="tanh"),
}


@register_model
class VAE(GenerativeModel):
    """Single-stochastic-layer VAE with an MLP encoder and decoder."""

    name = "vae"
    config_class = VAEConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[VAEConfig] = None):
        super().__init__(data_spec)
        config = config or VAEConfig()
        self.config = config
        if config.latent_dim < 1:
            raise DGMError(f"latent_dim must be >= 1, got {config.latent_dim}")
        self.likelihood = likelihood_for(data_spec, config.gaussian_scale, config.learn_scale, config.decoder_scale)
        d = data_spec.dim
        self.decoder = MLP(config.latent_dim, config.decoder_hidden, self.likelihood.num_outputs(), config.activation)
        self.encoder = MLP(d, config.encoder_hidden, 2 * config.latent_dim, config.activation)

    # --- Pyro program -----------------------------------------------------------------
    def prior(self, like: Tensor) -> dist.TorchDistribution:
        return standard_normal(like, self.config.latent_dim)

    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        """The encoder's ``q(z | x)``, a diagonal Gaussian with batch shape ``[B]``."""
        return diagonal_normal(self.encoder(x.reshape(x.shape[0], -1)), self.config.min_posterior_scale)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        q = self.posterior(x)
        with self.data_plate(x, idx, size):
            pyro.sample("z", q)

    # --- everything else ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` ancestral samples; ``mean=True`` returns the decoder means instead."""
        ref = next(self.parameters())
        z = self.prior(ref).sample((n,))
        raw = self.decoder(z)
        return self.likelihood.mean(raw) if mean else self.likelihood(raw).sample()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Posterior means ``E_q[z | x]``."""
        return self.posterior(x).mean
