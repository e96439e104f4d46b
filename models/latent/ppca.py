"""Probabilistic PCA (Tipping & Bishop, 1999): the suite's exactly tractable latent model.

Generative process, for ``x`` in ``R^D`` and ``z`` in ``R^q`` (``q < D``)::

    z ~ N(0, I_q)
    x | z ~ N(W z + mu, sigma^2 I_D)

Everything about it is Gaussian and closed-form, which is why it is the ground truth
for every estimator and objective test in the suite:

* marginal: ``p(x) = N(x; mu, C)`` with ``C = W W^T + sigma^2 I_D``;
* posterior: ``p(z | x) = N(M^{-1} W^T (x - mu), sigma^2 M^{-1})`` with
  ``M = W^T W + sigma^2 I_q``;
* maximum likelihood: ``mu_ml`` is the data mean, ``sigma^2_ml`` the mean of the
  ``D - q`` smallest eigenvalues of the sample covariance ``S`` and
  ``W_ml = U_q (L_q - sigma^2_ml I)^{1/2} R`` for any rotation ``R``;
* EM: the collapsed E+M step of eqs. 29-30, which never decreases the likelihood.

Reference: M. E. Tipping and C. M. Bishop, "Probabilistic principal component analysis",
J. R. Statist. Soc. B 61(3):611-622, 1999.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from models.base import DataError, DataSpec, DGMError, GenerativeModel
from models.registry import register_model

__all__ = ["LinearGaussianEncoder", "PPCA", "PPCAConfig"]


@dataclass(frozen=True)
class PPCAConfig:
    """``latent_dim`` is ``q`` (``1 <= q < D``); ``init_scale`` is the standard deviation of
    the random initial entries of ``W`` and of the encoder's linear map."""

    latent_dim: int = 2
    init_scale: float = 0.1


def _lower_cholesky(a: Tensor) -> Tensor:
    """Cholesky factor of a matrix that is symmetric positive definite up to roundoff."""
    return torch.linalg.cholesky(0.5 * (a + a.transpose(-1, -2)))


class LinearGaussianEncoder(nn.Module):
    """Amortized guide ``q(z | x) = N(A x + b, L L^T)`` with one ``L`` for all datapoints.

    ``L`` is lower triangular with a positive diagonal, stored as an unconstrained matrix
    whose diagonal holds ``log diag L``. The exact PPCA posterior is in this family
    (``A = M^{-1} W^T``, ``b = -A mu``, ``L L^T = sigma^2 M^{-1}``), so the amortization
    gap of this guide can be driven to zero.
    """

    def __init__(self, data_dim: int, latent_dim: int, init_scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(init_scale * torch.randn(latent_dim, data_dim))
        self.b = nn.Parameter(torch.zeros(latent_dim))
        self.scale_tril_raw = nn.Parameter(torch.zeros(latent_dim, latent_dim))

    @property
    def scale_tril(self) -> Tensor:
        raw = self.scale_tril_raw
        return torch.tril(raw, diagonal=-1) + torch.diag_embed(raw.diagonal().exp())

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(loc [..., q], scale_tril [q, q])`` of ``q(z | x)``."""
        return x @ self.A.T + self.b, self.scale_tril

    @torch.no_grad()
    def set_affine(self, A: Tensor, b: Tensor, scale_tril: Tensor) -> None:
        """Set ``q(z | x) = N(A x + b, scale_tril scale_tril^T)`` in place."""
        self.A.copy_(A)
        self.b.copy_(b)
        self.scale_tril_raw.copy_(torch.tril(scale_tril, diagonal=-1) + torch.diag_embed(scale_tril.diagonal().log()))


@register_model
class PPCA(GenerativeModel):
    """Probabilistic PCA: ``z ~ N(0, I_q)``, ``x | z ~ N(W z + mu, sigma^2 I_D)``.

    Parameters: ``W [D, q]``, ``mu [D]`` and ``log_sigma`` (scalar, ``sigma = exp(log_sigma)``).
    The default guide is a linear Gaussian encoder (:class:`LinearGaussianEncoder`);
    :meth:`exact_posterior_guide` samples the exact posterior instead, which makes every
    importance weight equal to ``p(x)`` and every ELBO tight.
    """

    name = "ppca"
    config_class = PPCAConfig
    has_exact_log_prob = True

    def __init__(self, data_spec: DataSpec, config: Optional[PPCAConfig] = None) -> None:
        super().__init__(data_spec)
        config = config if config is not None else PPCAConfig()
        if data_spec.support != "real":
            raise DataError(
                f"PPCA is a Gaussian model of real-valued data; got {data_spec.describe()}. "
                "Use a Bernoulli or categorical model for discrete data"
            )
        if len(data_spec.event_shape) != 1:
            raise DataError(
                f"PPCA needs vector data of event shape (D,); got {tuple(data_spec.event_shape)}. "
                "Flatten each datapoint first"
            )
        D, q = data_spec.event_shape[0], config.latent_dim
        if not 1 <= q < D:
            raise DGMError(f"PPCA needs 1 <= latent_dim < D = {D}; got latent_dim = {q}")
        self.config = config
        self.data_dim = D
        self.latent_dim = q
        self.W = nn.Parameter(config.init_scale * torch.randn(D, q))
        self.mu = nn.Parameter(torch.zeros(D))
        self.log_sigma = nn.Parameter(torch.zeros(()))
        self.encoder = LinearGaussianEncoder(D, q, config.init_scale)

    # --- parameters ---------------------------------------------------------------------
    @property
    def sigma2(self) -> Tensor:
        return torch.exp(2.0 * self.log_sigma)

    @torch.no_grad()
    def set_params(self, W: Tensor, mu: Tensor, sigma2: Tensor | float) -> None:
        """Set ``(W, mu, sigma^2)`` in place, e.g. to the output of :meth:`mle`."""
        sigma2 = torch.as_tensor(sigma2, dtype=self.log_sigma.dtype, device=self.log_sigma.device)
        if not bool(sigma2 > 0):
            raise DGMError(f"sigma^2 must be positive, got {float(sigma2.detach()):g}")
        self.W.copy_(W)
        self.mu.copy_(mu)
        self.log_sigma.copy_(0.5 * torch.log(sigma2))

    def _as_param_dtype(self, x: Tensor) -> Tensor:
        return x.to(dtype=self.W.dtype, device=self.W.device)

    # --- the Pyro program ---------------------------------------------------------------
    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        """``z ~ N(0, I_q)``, ``x | z ~ N(W z + mu, sigma^2 I_D)``, one ``z`` per datapoint."""
        q = self.latent_dim
        zero = self.W.new_zeros(())
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", dist.Normal(zero, 1.0).expand([q]).to_event(1))
            loc = z @ self.W.T + self.mu
            pyro.sample("x", dist.Normal(loc, self.log_sigma.exp()).to_event(1), obs=x)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        """Amortized linear Gaussian encoder ``q(z | x) = N(A x + b, L L^T)``."""
        loc, scale_tril = self.encoder(x)
        with self.data_plate(x, idx, size):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    def exact_posterior_guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        """Guide whose site ``z`` samples the exact posterior ``p(z | x)``.

        With it ``log p(x, z) - log q(z | x) = log p(x)`` for every sample: importance
        weights have zero variance and the ELBO equals ``log p(x)``.
        """
        with self.data_plate(x, idx, size):
            pyro.sample("z", self.posterior(x))

    # --- closed forms -------------------------------------------------------------------
    def marginal(self) -> dist.MultivariateNormal:
        """``p(x) = N(mu, W W^T + sigma^2 I_D)``, with a Cholesky ``scale_tril``."""
        W = self.W
        C = W @ W.T + self.sigma2 * torch.eye(self.data_dim, dtype=W.dtype, device=W.device)
        return dist.MultivariateNormal(self.mu, scale_tril=_lower_cholesky(C))

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x) = log N(x; mu, W W^T + sigma^2 I)`` per row, in nats."""
        return self.marginal().log_prob(self._as_param_dtype(x))

    def posterior_affine(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(A, b, L)`` with ``p(z | x) = N(A x + b, L L^T)``.

        ``A = M^{-1} W^T``, ``b = -A mu`` and ``L L^T = sigma^2 M^{-1}``, where
        ``M = W^T W + sigma^2 I_q`` (Tipping & Bishop 1999). Solves go through the
        Cholesky factor of the ``q x q`` matrix ``M``.
        """
        W, sigma2 = self.W, self.sigma2
        M = W.T @ W + sigma2 * torch.eye(self.latent_dim, dtype=W.dtype, device=W.device)
        L_M = _lower_cholesky(M)
        A = torch.cholesky_solve(W.T, L_M)
        b = -(A @ self.mu)
        scale_tril = _lower_cholesky(sigma2 * torch.cholesky_inverse(L_M))
        return A, b, scale_tril

    def posterior(self, x: Tensor) -> dist.MultivariateNormal:
        """Exact ``p(z | x) = N(M^{-1} W^T (x - mu), sigma^2 M^{-1})``, batch ``x.shape[:-1]``."""
        A, _, scale_tril = self.posterior_affine()
        loc = (self._as_param_dtype(x) - self.mu) @ A.T
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Ancestral samples ``x = W z + mu + sigma * eps``, shape ``[n, D]``."""
        W = self.W
        z = torch.randn(n, self.latent_dim, dtype=W.dtype, device=W.device, generator=generator)
        eps = torch.randn(n, self.data_dim, dtype=W.dtype, device=W.device, generator=generator)
        return z @ W.T + self.mu + self.log_sigma.exp() * eps

    # --- maximum likelihood -------------------------------------------------------------
    @torch.no_grad()
    def em_update(self, x: Tensor) -> None:
        """One EM step in place (Tipping & Bishop 1999, eqs. 29-30), ``mu`` set to the data mean.

        With ``S`` the sample covariance (divided by ``N``) and ``M = W^T W + sigma^2 I``::

            W_new      = S W (sigma^2 I + M^{-1} W^T S W)^{-1}
            sigma2_new = tr(S - S W M^{-1} W_new^T) / D

        Setting ``mu`` to the data mean maximises the likelihood over ``mu`` for any
        ``(W, sigma^2)``; the step on ``(W, sigma^2)`` is then exact EM with ``mu`` fixed,
        so the log-likelihood never decreases. ``S`` is never formed: ``S W = X_c^T X_c W / N``.
        """
        x = self._as_param_dtype(x)
        N, D = x.shape[0], self.data_dim
        W, sigma2 = self.W, self.sigma2
        mean = x.mean(0)
        xc = x - mean
        SW = xc.T @ (xc @ W) / N
        trace_S = xc.pow(2).sum() / N
        eye = torch.eye(self.latent_dim, dtype=W.dtype, device=W.device)
        L_M = _lower_cholesky(W.T @ W + sigma2 * eye)
        Minv_WtSW = torch.cholesky_solve(W.T @ SW, L_M)
        W_new = torch.linalg.solve(sigma2 * eye + Minv_WtSW, SW, left=False)
        SW_Minv = torch.cholesky_solve(SW.T, L_M).T  # S W M^{-1} (M is symmetric)
        sigma2_new = (trace_S - (SW_Minv * W_new).sum()) / D
        if not bool(sigma2_new > 0):
            raise DGMError(
                f"EM drove sigma^2 to {float(sigma2_new):g}: the data lie (numerically) in a "
                f"{self.latent_dim}-dimensional subspace; use a smaller latent_dim"
            )
        self.set_params(W_new, mean, sigma2_new)

    @staticmethod
    def mle(x: Tensor, latent_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Closed-form maximum-likelihood ``(W_ml [D, q], mu_ml [D], sigma2_ml [])``.

        With ``S = X_c^T X_c / N`` = ``U diag(lambda) U^T``, eigenvalues in decreasing order
        (Tipping & Bishop 1999, taking the rotation ``R = I``)::

            mu_ml     = mean of x
            sigma2_ml = mean(lambda_{q+1}, ..., lambda_D)
            W_ml      = U_q (diag(lambda_1..q) - sigma2_ml I)^{1/2}

        ``W`` is identified only up to a rotation ``W R``; ``W_ml W_ml^T`` is unique when
        ``lambda_q > lambda_{q+1}``.
        """
        if x.dim() != 2:
            raise DataError(f"mle: expected data of shape [N, D], got {list(x.shape)}")
        N, D = x.shape
        if not 1 <= latent_dim < D:
            raise DGMError(f"mle: needs 1 <= latent_dim < D = {D}; got {latent_dim}")
        mu = x.mean(0)
        xc = x - mu
        S = xc.T @ xc / N
        evals, evecs = torch.linalg.eigh(0.5 * (S + S.T))
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        sigma2 = evals[latent_dim:].mean()
        if not bool(sigma2 > 0):
            raise DGMError(
                "mle: the data lie in a subspace of dimension <= latent_dim, so sigma^2 = 0; use a smaller latent_dim"
            )
        W = evecs[:, :latent_dim] * (evals[:latent_dim] - sigma2).clamp_min(0).sqrt()
        return W, mu, sigma2
