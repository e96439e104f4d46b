"""Mixture of Gaussians for real vectors (the 2-D toy densities in particular).

Generative program, for ``K`` components and ``x`` in ``R^D``::

    z ~ Categorical(pi)
    x | z ~ N(m_z, L_z L_z^T)

with ``L_k`` lower triangular with a positive diagonal (``covariance="full"``) or diagonal
(``covariance="diag"``). ``log p(x) = logsumexp_k [log pi_k + log N(x; m_k, L_k L_k^T)]`` is
exact, and so is the posterior over ``z``. EM (Bishop 2006, section 9.2.2), from
responsibilities ``r [N, K]`` and ``N_k = sum_n r_nk``::

    pi_k    = (N_k + alpha) / (N + K alpha)
    m_k     = sum_n r_nk x_n / N_k
    Sigma_k = sum_n r_nk (x_n - m_k)(x_n - m_k)^T / N_k + reg I     (diagonal part only for "diag")

``reg`` (``reg_covar``) keeps a component that collapses onto one point from a singular
covariance, as scikit-learn's ``GaussianMixture`` does; with ``alpha = reg = 0`` it is
maximum-likelihood EM, which never decreases the log-likelihood.

The model site ``z`` is enumerable and the guide is the amortized categorical
``q(z | x)`` (see :class:`~models.latent.mixture.MixtureModel`).

Reference: C. M. Bishop, *Pattern Recognition and Machine Learning*, chapter 9, 2006.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from models.base import DataError, DataSpec, DGMError
from models.latent.mixture import MixtureModel
from models.registry import register_model

__all__ = ["GaussianMixture", "GaussianMixtureConfig", "PRESETS"]

COVARIANCES = ("full", "diag")


@dataclass
class GaussianMixtureConfig:
    """``covariance``: ``full`` or ``diag``; ``reg_covar``: added to every covariance's
    diagonal in the M-step; ``init_loc_scale``: spread of the random initial means (unit
    initial covariances); other fields as :class:`BernoulliMixtureConfig`."""

    num_components: int = 8
    covariance: str = "full"
    reg_covar: float = 1e-6
    weight_pseudocount: float = 0.0
    encoder: bool = True
    encoder_hidden: Tuple[int, ...] = (64,)
    init_loc_scale: float = 1.0


PRESETS = {
    "toy": GaussianMixtureConfig(num_components=8),
    "small": GaussianMixtureConfig(num_components=4),
    "toy-diag": GaussianMixtureConfig(num_components=16, covariance="diag"),
}


@register_model
class GaussianMixture(MixtureModel):
    """Mixture of ``K`` Gaussians with full or diagonal covariances, given by ``scale_tril``."""

    name = "gaussian_mixture"
    config_class = GaussianMixtureConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[GaussianMixtureConfig] = None):
        config = config or GaussianMixtureConfig()
        if data_spec.support != "real" or len(data_spec.event_shape) != 1:
            raise DataError(
                f"a Gaussian mixture models real vectors of event shape (D,), not {data_spec.describe()}; "
                "use bernoulli_mixture for binary data"
            )
        if config.covariance not in COVARIANCES:
            raise DGMError(f"unknown covariance {config.covariance!r}; choose from {', '.join(COVARIANCES)}")
        if config.reg_covar < 0:
            raise DGMError(f"reg_covar must be >= 0, got {config.reg_covar}")
        super().__init__(
            data_spec, config.num_components, config.weight_pseudocount, config.encoder, config.encoder_hidden
        )
        self.config = config
        k, d = config.num_components, data_spec.dim
        self.loc = nn.Parameter(config.init_loc_scale * torch.randn(k, d))
        # unconstrained: strict lower triangle as is, diagonal as log; "diag" ignores the rest
        self.raw_scale_tril = nn.Parameter(torch.zeros(k, d, d))

    @property
    def scale_tril(self) -> Tensor:
        """``L [K, D, D]``: lower triangular with a positive diagonal (diagonal for ``diag``)."""
        raw = self.raw_scale_tril
        diag = torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
        return diag if self.config.covariance == "diag" else diag + torch.tril(raw, diagonal=-1)

    @torch.no_grad()
    def set_covariance(self, cov: Tensor) -> None:
        """Set ``L_k L_k^T = cov_k`` in place (``cov [K, D, D]``, only the diagonal for ``diag``)."""
        if self.config.covariance == "diag":
            cov = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
        tril, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.transpose(-1, -2)))
        if info.any():
            raise DGMError(
                "a component's covariance is singular (it collapsed onto too few points); raise reg_covar "
                "or use fewer components"
            )
        diag = tril.diagonal(dim1=-2, dim2=-1)
        self.raw_scale_tril.copy_(torch.tril(tril, diagonal=-1) + torch.diag_embed(diag.log()))

    def component(self, z: Tensor) -> dist.TorchDistribution:
        return dist.MultivariateNormal(self.loc[z], scale_tril=self.scale_tril[z])

    def component_log_prob(self, x: Tensor) -> Tensor:
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril).log_prob(x.unsqueeze(-2))

    def m_step(self, x: Tensor, r: Tensor, counts: Tensor) -> None:
        counts = counts.clamp_min(torch.finfo(counts.dtype).tiny)
        loc = (r.T @ x) / counts.unsqueeze(-1)  # [K, D]
        centred = x.unsqueeze(0) - loc.unsqueeze(1)  # [K, N, D]
        cov = torch.einsum("nk,knd,kne->kde", r, centred, centred) / counts[:, None, None]
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        self.loc.copy_(loc)
        self.set_covariance(cov + self.config.reg_covar * eye)
