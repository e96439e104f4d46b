"""VAE whose decoder output layer is Bayesian: a model with global latent variables.

Generative program (``H`` the last decoder hidden width, ``O`` the likelihood's outputs)::

    W ~ N(0, s^2 I),  b ~ N(0, s^2 I)            global: W [H, O], b [O], outside the data plate
    z_n ~ N(0, I_L)                               local, one per datapoint
    x_n | z_n, W, b ~ likelihood(h(z_n) W + b)    h: the decoder's hidden layers (point estimates)

Default guide: the amortized encoder for the local latents and a mean-field Gaussian for
the global ones (Blundell et al. 2015's "Bayes by backprop" on the output layer)::

    q(W, b) = prod_ij N(W_ij; mu_ij, sigma_ij^2) ...,   q(z | x) = N(mu(x), diag(sigma(x)^2))

Training with ``elbo`` maximizes ``E_q[log p(X | W, b, Z)] - KL(q(Z | X) || p(Z)) -
KL(q(W, b) || p(W, b))``: the local terms scaled by N / B, the global KL counted once per
step (``inference.objectives``), so the KL of the weights per datapoint shrinks as 1 / N.
``iwae`` shares one weight draw over its K samples. Evaluate with the ``nested`` estimator
(``--estimator nested``, or ``auto``): the log predictive density with the weights drawn
from their guide. ``sample(n)`` draws the weights once from their guide, then ``n``
datapoints: samples of the (approximate) posterior predictive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.gaussian import diagonal_normal, standard_normal
from models.nn import MLP, likelihood_for
from models.nn.mlp import ACTIVATIONS
from models.registry import register_model

__all__ = ["BayesVAE", "BayesVAEConfig", "PRESETS"]


@dataclass
class BayesVAEConfig:
    """``decoder_hidden`` must have at least one layer (its last feeds the Bayesian output
    layer); ``prior_scale`` is ``s``; ``init_posterior_scale`` the initial sigma of q(W, b)."""

    latent_dim: int = 16
    encoder_hidden: Tuple[int, ...] = (200,)
    decoder_hidden: Tuple[int, ...] = (200,)
    activation: str = "tanh"
    prior_scale: float = 1.0
    init_posterior_scale: float = 0.01
    gaussian_scale: Optional[float] = None  # real data: initial (or fixed) decoder scale
    learn_scale: bool = True
    min_posterior_scale: float = 1e-4


PRESETS = {
    "small": BayesVAEConfig(),
    "iwae-1layer": BayesVAEConfig(latent_dim=50, encoder_hidden=(200, 200), decoder_hidden=(200, 200)),
}


def output_layer(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h W + b`` for ``h [..., B, H]`` and weights with leading batch dims (``[P, 1, H, O]``
    under a particle plate of P draws, ``[1, 1, H, O]`` for one shared draw, ``[H, O]``):
    one matrix product when the draw is shared, a batched one when each particle has its own
    (never a copy of the weights per datapoint)."""
    hidden, out = w.shape[-2:]
    w, b = w.reshape(-1, hidden, out), b.reshape(-1, 1, out)
    if w.shape[0] == 1:
        return h @ w[0] + b[0, 0]
    p = w.shape[0]
    return torch.baddbmm(b, h.reshape(p, -1, hidden), w).reshape(h.shape[:-1] + (out,))


@register_model
class BayesVAE(GenerativeModel):
    """VAE with a Bayesian decoder output layer: global weights W, b outside the data plate."""

    name = "bayes_vae"
    config_class = BayesVAEConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[BayesVAEConfig] = None):
        super().__init__(data_spec)
        config = config or BayesVAEConfig()
        if config.latent_dim < 1:
            raise DGMError(f"latent_dim must be >= 1, got {config.latent_dim}")
        if not config.decoder_hidden:
            raise DGMError("bayes_vae needs at least one decoder hidden layer to feed its Bayesian output layer")
        if not (config.prior_scale > 0 and config.init_posterior_scale > 0):
            raise DGMError("prior_scale and init_posterior_scale must be > 0")
        self.config = config
        self.likelihood = likelihood_for(data_spec, config.gaussian_scale, config.learn_scale)
        hidden, out = config.decoder_hidden[-1], self.likelihood.num_outputs()
        self.hidden = nn.Sequential(
            MLP(config.latent_dim, config.decoder_hidden[:-1], hidden, config.activation),
            ACTIVATIONS[config.activation](),
        )
        self.encoder = MLP(data_spec.dim, config.encoder_hidden, 2 * config.latent_dim, config.activation)
        init = nn.Linear(hidden, out)  # the usual initialization, as q(W, b)'s means
        raw = torch.tensor(config.init_posterior_scale).expm1().log().item()  # softplus^-1
        self.w_loc = nn.Parameter(init.weight.detach().T.clone())
        self.b_loc = nn.Parameter(init.bias.detach().clone())
        self.w_raw_scale = nn.Parameter(torch.full((hidden, out), raw))
        self.b_raw_scale = nn.Parameter(torch.full((out,), raw))

    # --- Pyro program -----------------------------------------------------------------
    def weight_prior(self) -> Tuple[dist.TorchDistribution, dist.TorchDistribution]:
        s = self.config.prior_scale
        return (
            dist.Normal(torch.zeros_like(self.w_loc), s).to_event(2),
            dist.Normal(torch.zeros_like(self.b_loc), s).to_event(1),
        )

    def weight_posterior(self) -> Tuple[dist.TorchDistribution, dist.TorchDistribution]:
        """The mean-field Gaussian guide ``q(W), q(b)``."""
        return (
            dist.Normal(self.w_loc, F.softplus(self.w_raw_scale)).to_event(2),
            dist.Normal(self.b_loc, F.softplus(self.b_raw_scale)).to_event(1),
        )

    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        p_w, p_b = self.weight_prior()
        w = pyro.sample("decoder_w", p_w)
        b = pyro.sample("decoder_b", p_b)
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", standard_normal(x, self.config.latent_dim))
            pyro.sample("x", self.likelihood(output_layer(self.hidden(z), w, b)), obs=x)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        """The encoder's ``q(z | x)``, a diagonal Gaussian with batch shape ``[B]``."""
        return diagonal_normal(self.encoder(x.reshape(x.shape[0], -1)), self.config.min_posterior_scale)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        q_w, q_b = self.weight_posterior()
        pyro.sample("decoder_w", q_w)
        pyro.sample("decoder_b", q_b)
        q = self.posterior(x)
        with self.data_plate(x, idx, size):
            pyro.sample("z", q)

    # --- everything else ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` datapoints given one draw of the output layer from its guide (``mean=True``:
        the decoder means instead of samples)."""
        q_w, q_b = self.weight_posterior()
        z = standard_normal(self.w_loc, self.config.latent_dim).sample((n,))
        raw = output_layer(self.hidden(z), q_w.sample(), q_b.sample())
        return self.likelihood.mean(raw) if mean else self.likelihood(raw).sample()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Posterior means ``E_q[z | x]``."""
        return self.posterior(x).mean
