"""Mixture of multivariate Bernoullis (the finite-mixture base class is ``mixture.py``).

Generative program, for ``K`` components and binary ``x`` in ``{0, 1}^D``::

    z ~ Categorical(pi)
    x | z ~ prod_d Bernoulli(x_d; mu_{z d})

Everything is exact: ``log p(x) = logsumexp_k [log pi_k + sum_d log Bernoulli(x_d; mu_kd)]``
and the posterior ``p(z | x)`` is the normalized table of the same terms (the
responsibilities). EM (Dempster, Laird & Rubin 1977) alternates them with the closed-form
M-step; with pseudo-counts ``alpha`` (weights) and ``beta`` (pixels) it is MAP-EM under a
``Dirichlet(1 + alpha)`` prior on ``pi`` and ``Beta(1 + beta, 1 + beta)`` priors on the
means, so that a pixel never seen on in a component keeps a non-zero probability::

    N_k   = sum_n r_nk
    pi_k  = (N_k + alpha) / (N + K alpha)
    mu_kd = (sum_n r_nk x_nd + beta) / (N_k + 2 beta)

With ``alpha = beta = 0`` it is maximum-likelihood EM and the log-likelihood never
decreases; otherwise the log posterior (``log_prob(x).sum() + log_prior()``) never does.

The model site ``z`` is marked ``infer={"enumerate": "parallel"}``: the enumerated ELBO
(``elbo-enum``) sums it out exactly, so with ``encoder=False`` (an empty guide) training
maximises the exact marginal likelihood by gradient. The default guide is an amortized
``q(z | x) = Categorical(softmax(encoder(x)))``, also marked for enumeration; the sampling
objectives (``elbo``, ``elbo-sf``, ``iwae``) sample it with score-function gradients.

Published test NLL on binarized MNIST: 137.64 nats for K = 500 (Salakhutdinov & Murray
2008; quoted by Larochelle & Murray 2011).

References: A. P. Dempster, N. M. Laird and D. B. Rubin, "Maximum likelihood from
incomplete data via the EM algorithm", JRSS B 39(1), 1977; C. M. Bishop, *Pattern
Recognition and Machine Learning*, section 9.3.3, 2006; R. Salakhutdinov and I. Murray,
"On the quantitative analysis of deep belief networks", ICML 2008.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import DataError, DataSpec, DGMError
from models.latent.mixture import MixtureModel
from models.nn import likelihood_for
from models.registry import register_model

__all__ = ["BernoulliMixture", "BernoulliMixtureConfig", "PRESETS"]


@dataclass
class BernoulliMixtureConfig:
    """``num_components``: K; ``pixel_pseudocount`` (beta) and ``weight_pseudocount`` (alpha):
    EM's smoothing pseudo-counts (0 for maximum likelihood); ``encoder``: learn an amortized
    guide ``q(z | x)`` (an MLP with ``encoder_hidden`` layers, linear when empty);
    ``init_scale``: spread of the random initial pixel logits."""

    num_components: int = 500
    pixel_pseudocount: float = 1.0
    weight_pseudocount: float = 1.0
    encoder: bool = True
    encoder_hidden: Tuple[int, ...] = ()
    init_scale: float = 0.5


PRESETS = {
    "mnist": BernoulliMixtureConfig(num_components=500),
    # no encoder: z is enumerated in the model, so elbo-enum trains on the exact log p(x)
    "mnist-exact": BernoulliMixtureConfig(num_components=500, encoder=False),
    "small": BernoulliMixtureConfig(num_components=20),
}


@register_model
class BernoulliMixture(MixtureModel):
    """Mixture of ``K`` product-Bernoulli components, parameterized by pixel logits ``[K, D]``."""

    name = "bernoulli_mixture"
    config_class = BernoulliMixtureConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[BernoulliMixtureConfig] = None):
        config = config or BernoulliMixtureConfig()
        if data_spec.support != "binary":
            raise DataError(
                f"a Bernoulli mixture models binary pixels, not {data_spec.describe()}; binarize the data "
                "(e.g. --binarization dynamic), or use gaussian_mixture for real vectors"
            )
        if config.pixel_pseudocount < 0:
            raise DGMError(f"pixel_pseudocount must be >= 0, got {config.pixel_pseudocount}")
        super().__init__(
            data_spec, config.num_components, config.weight_pseudocount, config.encoder, config.encoder_hidden
        )
        self.config = config
        self.likelihood = likelihood_for(data_spec)
        self.logits = nn.Parameter(config.init_scale * torch.randn(config.num_components, data_spec.dim))

    @property
    def means(self) -> Tensor:
        """``mu [K, D]``, the pixel probabilities of each component."""
        return torch.sigmoid(self.logits)

    def component(self, z: Tensor) -> dist.TorchDistribution:
        return self.likelihood(self.logits[z])

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``sum_d x_d l_kd - softplus(l_kd)`` for every component: one ``[B, D] x [D, K]``
        product instead of a ``[B, K, D]`` tensor."""
        return x @ self.logits.T - F.softplus(self.logits).sum(-1)

    def m_step(self, x: Tensor, r: Tensor, counts: Tensor) -> None:
        beta = self.config.pixel_pseudocount
        means = (r.T @ x + beta) / (counts.unsqueeze(-1) + 2 * beta)
        eps = torch.finfo(means.dtype).eps  # only bites when beta = 0: keeps logits finite
        self.logits.copy_(torch.logit(means.clamp(eps, 1 - eps)))

    def log_prior_components(self) -> Tensor:
        """``beta sum_kd [log mu_kd + log (1 - mu_kd)]`` (the Beta(1 + beta, 1 + beta) prior)."""
        beta = self.config.pixel_pseudocount
        return -beta * (F.softplus(-self.logits) + F.softplus(self.logits)).sum()
