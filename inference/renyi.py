"""The variational Renyi bound (Li and Turner 2016), per datapoint, from K samples::

    VR_alpha,K(x) = 1 / (1 - alpha) * log (1/K) sum_k w_k^(1 - alpha),   w_k = p(x, z_k) / q(z_k | x)

``1 / (1 - alpha) log`` of a power mean of the weights: ``alpha = 0`` is IWAE exactly
(``inference.objectives.IWAE``), ``alpha -> 1`` the ELBO ``mean_k log w_k`` (taken as the
ELBO at ``alpha = 1``); for the same samples the bound does not increase with alpha (power
means grow with their exponent ``1 - alpha``). Its expectation is at most the Renyi
divergence bound ``L_alpha = 1 / (1 - alpha) log E_q[w^(1 - alpha)] <= log p(x)`` for
``alpha >= 0`` (Jensen), the only range taken here: below zero it is no longer a lower bound.

Per datapoint, unlike Pyro's ``RenyiELBO``, which sums the minibatch's log-weights before the
power mean (a joint bound over the batch; pyro issues 2220, 3104). Gradients: pathwise
through reparameterized sites, weighted by the normalized ``w_k^(1 - alpha)``;
non-reparameterized sites get the score-function term ``VR(x) * sum_k grad log q(z_k)``, as
IWAE's (no baseline).

Reference: Y. Li and R. E. Turner, "Renyi divergence variational inference", NeurIPS 2016.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from inference.config import ConfigError, ObjectiveConfig, finite
from inference.logweights import LogWeights
from inference.objective import OBJECTIVES
from inference.objectives import ELBO, IWAE
from models.base import DataSpec


class RenyiBound(IWAE):
    """``VR_alpha,K`` per datapoint (module docstring); ``alpha = 1`` is the ELBO."""

    supports_schedule = False
    supports_globals = False
    global_draws = None

    def __init__(self, num_particles: int = 1, alpha: float = 0.5, **kwargs):
        if not finite(alpha) or alpha < 0:
            raise ConfigError(f"--alpha must be a finite number >= 0 (0: IWAE, 1: ELBO), got {alpha!r}")
        super().__init__(num_particles, **kwargs)
        self.alpha = float(alpha)
        self._elbo = ELBO(num_particles) if self.alpha == 1 else None

    def per_datapoint(self, lw: LogWeights) -> Tensor:
        if self._elbo is not None:
            return self._elbo.per_datapoint(lw)
        power = 1.0 - self.alpha
        return (torch.logsumexp(power * lw.log_w, dim=0) - math.log(lw.num_particles)) / power

    def reduce(self, lw: LogWeights) -> Tuple[Tensor, Tensor]:
        return super().reduce(lw) if self._elbo is None else self._elbo.reduce(lw)


@OBJECTIVES.register("renyi", "variational Renyi bound with --alpha (0: IWAE, 1: ELBO) and K samples per datapoint")
def _renyi(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> RenyiBound:
    return RenyiBound(config.k, alpha=config.alpha)
